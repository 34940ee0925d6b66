"""Brokers for the task tests, one per backend: a SQLite file in the test's temp dir, or a key
prefix of the test's own on the shared test Redis."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from riverbed.tasks.brokers import Broker, connect_broker

OpenBroker = Callable[..., Broker]

BROKERS = ["sqlite", "redis"]


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        server: str = request.getfixturevalue("redis_url")
        return f"{server}?prefix=test-{uuid.uuid4().hex[:12]}"
    return f"sqlite:///{tmp_path}/tasks.db"


@pytest.fixture
def open_broker(broker_url: str) -> Iterator[OpenBroker]:
    """``open_broker(result_ttl="0.5")``: another broker on the test's store (as another process
    would open it), with extra URL options; all are closed when the test ends."""
    opened: list[Broker] = []

    def open_broker(**options: str) -> Broker:
        url = broker_url
        if options:
            url += ("&" if "?" in url else "?") + urlencode(options)
        broker = connect_broker(url)
        opened.append(broker)
        return broker

    yield open_broker
    for broker in opened:
        broker.close()


@pytest.fixture
def broker(open_broker: OpenBroker) -> Broker:
    return open_broker()
