"""Serving a Prometheus registry's ``/metrics`` over HTTP, for every kind of worker."""

from __future__ import annotations

from typing import Any

from riverbed.errors import RiverbedError


def serve_metrics(port: int, registry: Any) -> None:
    """Serve ``registry`` on ``port`` from a daemon thread; ``RiverbedError`` naming the port
    when it cannot (one in use, say), before the worker starts anything else."""
    from prometheus_client import start_http_server  # the caller's module checked the extra

    try:
        start_http_server(port, addr="0.0.0.0", registry=registry)
    except OSError as error:
        raise RiverbedError(
            f"cannot serve metrics on port {port}: {error.strerror or error}; give a free port "
            "(--metrics-port)"
        ) from None
