"""Datacooee (HTTP JSON:API): config.py (the model), uplink.py (the plugin)."""
