"""NILU sensors (HTTP inbound, fixed and GPS): config.py (the model), uplink.py (the plugin),
packets.py and sensor.py (pure packet building), pushtest.py (check-uplink)."""
