"""Uplinks: one module per service, behind the protocol in ``base.py``; shared machinery in
``dispatch.py`` (batching, rate limits, retries, outcome bookkeeping)."""
