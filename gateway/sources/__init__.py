"""Sources: one module per kind of device, behind the protocol in ``base.py``."""
