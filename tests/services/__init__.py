"""Real servers for the tests, started on free loopback ports in temp dirs and stopped after."""

from __future__ import annotations

import os
import socket

import pytest


def services_required() -> bool:
    return os.environ.get("RIVERBED_REQUIRE_SERVICES") == "1"


def unavailable(service: str, reason: str) -> None:
    """Skip on a laptop; fail in CI, where RIVERBED_REQUIRE_SERVICES=1 says the service must run."""
    message = f"{service} is not available: {reason}"
    if services_required():
        pytest.fail(message + " (RIVERBED_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
