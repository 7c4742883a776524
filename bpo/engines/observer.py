"""What an engine reports about its calls to a remote endpoint, for metrics.

Engines take an ``EndpointObserver`` bound to one endpoint and call it as requests happen; the platform's metrics
implement it (``bpo.metrics.EndpointMetrics.observer``). This module imports no metrics library: the optimizer
workers must load their engines before ``prometheus_client`` is imported (its multiprocess mode is chosen then).
"""

from __future__ import annotations

from typing import Protocol

# How one HTTP request to an endpoint ended (a bounded label set: classes, never the error's text).
ENDPOINT_OUTCOMES = ("ok", "rate_limited", "client_error", "server_error", "timeout", "connection_error", "error")


class EndpointObserver(Protocol):
    def request_done(self, outcome: str, seconds: float) -> None:
        """One request (an attempt: every retry is its own) ended with ``outcome`` after ``seconds``."""

    def retrying(self) -> None:
        """A failed request is about to be retried."""

    def rate_limit_waited(self, seconds: float) -> None:
        """A request waited ``seconds`` for the endpoint's rate limiter before it was sent."""
