"""Watching the platform: the Prometheus side of a one-machine platform (``prometheus``), the Grafana dashboards
(``dashboards``) and the checked-in files generated from code (``artifacts``; ``python -m bpo.observability``).

The alert rules live in ``bpo/resources/prometheus/alerts.yaml``, the dashboards' JSON in
``bpo/resources/grafana/``."""
