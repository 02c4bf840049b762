"""The control side: the control API (server) and the CLI's client of it, its token, the
Prometheus metrics and the status page."""
