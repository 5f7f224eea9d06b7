"""Soak and power-cut tests: the daemon killed many times against every emulator at once."""
