"""Serial sources: config.py (the models), port.py (shared serial plumbing), lines.py (ASCII
line loggers), parsers.py (line formats), nmea.py (GPS), sdi12.py (SDI-12 through an adapter)."""
