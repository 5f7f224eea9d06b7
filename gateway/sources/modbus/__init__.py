"""Modbus sources (TCP, RTU over RS-485, RTU over TCP): config.py (the model and device
profiles), source.py (the poller), link.py (one connection), decode.py (register types and
byte/word orders)."""
