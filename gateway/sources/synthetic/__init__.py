"""Synthetic source (the demo): config.py (the model), source.py (the plugin)."""
