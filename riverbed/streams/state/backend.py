"""The state backend contract, and the choice of backend for a log."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from riverbed.log.api import Consumer, Log, Producer, TopicPartition

# Per (store, partition): the keys written (value bytes) or deleted (None) by a batch.
Changes = dict[tuple[str, int], dict[bytes, bytes | None]]


CHANGELOG_SUFFIX = "-changelog"


class StateBackend(Protocol):
    def load(self, store: str, partition: int) -> dict[bytes, bytes]:
        """Every key and value of one store partition, restored and current."""
        ...

    def commit(
        self,
        producer: Producer,
        consumer: Consumer,
        offsets: Mapping[TopicPartition, int],
        changes: Changes,
        exactly_once: bool,
    ) -> None:
        """Make the batch's outputs (already sent on ``producer``), ``changes`` and ``offsets``
        durable: atomically with ``exactly_once`` (``producer`` is then transactional, with a
        transaction open), else outputs first, then state, then offsets (at least once)."""
        ...

    def release(self, partitions: set[int]) -> None:
        """This process no longer owns ``partitions`` (of every store)."""
        ...

    def close(self) -> None: ...


def state_backend_for(log: Log, app: str, state_dir: Path) -> StateBackend:
    from riverbed.log.sqlite.log import SqliteLog

    if isinstance(log, SqliteLog):
        from riverbed.streams.state.sqlite import SqliteState

        return SqliteState(log, app)
    from riverbed.log.kafka import KafkaLog
    from riverbed.streams.state.kafka import KafkaState

    assert isinstance(log, KafkaLog), f"no state backend for {type(log).__name__}"
    return KafkaState(log, app, state_dir)


def changelog_topics(log: Log, stores: Mapping[str, int]) -> dict[str, int]:
    """The compacted topics that back ``stores`` (name -> partitions) on ``log``: none on the
    embedded log, whose state tables are durable themselves."""
    from riverbed.log.sqlite.log import SqliteLog

    if isinstance(log, SqliteLog):
        return {}
    return {store + CHANGELOG_SUFFIX: partitions for store, partitions in stores.items()}
