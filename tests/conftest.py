"""Fixtures shared by every test suite: a log per backend, unique topic names, waiting helpers."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator

import pytest

import riverbed
from tests.support import Worker

pytest_plugins = ["tests.services.kafka", "tests.services.postgres", "tests.services.redis"]

BACKENDS = ["sqlite", pytest.param("kafka", marks=pytest.mark.kafka)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def log_url(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> str:
    if backend == "kafka":
        url: str = request.getfixturevalue("kafka_url")
        return url
    return f"sqlite:///{tmp_path_factory.mktemp('log')}/log.db"


@pytest.fixture
def log(log_url: str) -> Iterator[riverbed.Log]:
    with riverbed.connect(log_url) as opened:
        yield opened


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Unique topic names, so tests can share one Kafka broker."""
    test = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:80]

    def make(suffix: str = "t") -> str:
        return f"{test}-{suffix}-{uuid.uuid4().hex[:8]}"

    return make


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Worker subprocesses a test started; killed at its end if still running."""
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()
