"""Qatium Ingest (HTTP): config.py (the model), uplink.py (the plugin)."""
