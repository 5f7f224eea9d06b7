"""Local stand-ins for the five services and the field devices (see DESIGN.md, "Test stand-ins").

The emulators enforce their service documents and record what they accepted, so the same code
serves tests, benchmarks and ``fieldgate demo``. Shared machinery: :mod:`.emulator` (server,
recording, ``wait_for``, auth, rate limit) and :mod:`.faults` (fault injection).
"""
