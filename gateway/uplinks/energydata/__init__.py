"""Energydata.dk (MQTT QoS 1 plus batch CSV import for backfill): config.py (the model),
uplink.py (the plugin), messages.py (pure MQTT messages), mqtt.py (the windowed publisher),
csvimport.py (the import API client and batcher)."""
