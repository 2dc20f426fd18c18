"""The monitor role: /metrics (Prometheus text) for every process of this host; the status page comes next."""
