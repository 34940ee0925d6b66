"""State stores of stateful operators: where they live on each log backend, and how they commit.

``StateBackend`` loads one store partition and commits a batch's state changes together with its
output records and input offsets: SQLite tables in the log's own database on the embedded log
(one transaction), a local SQLite file per partition plus a compacted changelog topic on Kafka.
"""

from riverbed.streams.state.backend import Changes, StateBackend, state_backend_for

__all__ = ["Changes", "StateBackend", "state_backend_for"]
