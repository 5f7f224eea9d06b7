"""fieldgate: an edge gateway for field loggers.

Sources poll devices into a durable SQLite queue; uplinks drain it to the services. See
``gateway/app.py`` for how the parts are wired and DESIGN.md (shared) for the architecture.
"""

__version__ = "0.1.0"
