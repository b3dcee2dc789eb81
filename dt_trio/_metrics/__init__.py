"""Metrics and HTTP probes: what a hub counts (`_tally.py`, plain ints on the hot path), the
Prometheus collector that reads it at scrape time (`_collector.py`), and /metrics, /healthz,
/readyz (`_http.py`). Only `_tally` is imported by the engine and the stores; the rest (and
prometheus-client) only where a hub serves HTTP."""
