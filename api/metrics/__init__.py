"""GET /metrics: Prometheus text, the fleet's figures read from Redis at scrape
time (collector.py) beside this API process's own instruments (instruments.py)."""
