"""Real servers for the tests, started on free loopback ports in temp dirs and stopped after."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

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


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Until every thread of the process has stopped (or the process ended): SIGSTOP takes
    effect as each thread is next scheduled, and a thread still running could answer a request
    sent meanwhile. A process that ended as its parent was stopped (a server process whose
    client had just closed its connection) stays a zombie, which answers nothing either."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except FileNotFoundError:
            return
        for task in tasks:
            try:
                stat = (task / "stat").read_text()
            except FileNotFoundError:  # a thread that ended
                continue
            states.append(stat.rsplit(")", 1)[1].split()[0])
        if states and all(state in "tTZX" for state in states):  # stopped, zombie, dead
            return
        time.sleep(0.005)
    raise TimeoutError(f"process {pid} did not stop within {timeout} s of SIGSTOP")
