"""Vanda Hydro API (HTTP, OAuth2 client credentials): config.py (the model), uplink.py (the
plugin), auth.py (tokens), tables.py (the document's tables), answer.py (reading its answers)."""
