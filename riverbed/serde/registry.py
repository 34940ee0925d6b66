"""The schema registry, stored with the log in a compacted topic, so it exists on every backend.

Each registered schema is one record keyed ``subject#<sha256 of the schema>``: registering the same
schema again finds it instead of adding a version, and compaction never drops a version. Versions
are numbered 1, 2, ... in log order, so every reader agrees on them. A new schema is checked
against the latest one under the subject's compatibility mode; the first registration of a
subject sets the mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time

import msgspec

from riverbed.errors import RiverbedError
from riverbed.log.api import Log
from riverbed.log.errors import TopicExistsError
from riverbed.serde.compat import Compatibility, Schema, incompatibilities

REGISTRY_TOPIC = "_riverbed-schemas"


class IncompatibleSchemaError(RiverbedError, ValueError):
    """A new schema version that breaks the subject's compatibility mode."""


class SchemaVersion(msgspec.Struct, frozen=True):
    subject: str
    version: int
    schema: Schema
    compatibility: Compatibility


class _Entry(msgspec.Struct, frozen=True):
    subject: str
    schema: Schema
    compatibility: Compatibility


class SchemaRegistry:
    """Register and look up versions of each subject's schema (a subject is usually a topic)."""

    def __init__(self, log: Log, topic: str = REGISTRY_TOPIC) -> None:
        self._log = log
        self._topic = topic
        # Created by an earlier run or another process: that is the registry.
        with contextlib.suppress(TopicExistsError):
            log.create_topic(topic, partitions=1, compact=True)

    def _read(self) -> dict[str, list[SchemaVersion]]:
        """Every subject's versions, read from the registry topic up to its current end."""
        end = self._log.end_offsets(self._topic)[0]
        entries: list[_Entry] = []
        if end:
            with self._log.consumer(topics=[self._topic], from_beginning=True) as consumer:
                deadline = time.monotonic() + 30
                position = 0
                while position < end and time.monotonic() < deadline:
                    for record in consumer.poll(timeout=0.5):
                        position = record.offset + 1
                        if record.value is not None:
                            entries.append(msgspec.json.decode(record.value, type=_Entry))
                if position < end:
                    raise RiverbedError(
                        f"could not read the schema registry topic '{self._topic}' to its end"
                    )
        versions: dict[str, list[SchemaVersion]] = {}
        for entry in entries:
            existing = versions.setdefault(entry.subject, [])
            mode = existing[0].compatibility if existing else entry.compatibility
            existing.append(SchemaVersion(entry.subject, len(existing) + 1, entry.schema, mode))
        return versions

    def versions(self, subject: str) -> list[SchemaVersion]:
        return self._read().get(subject, [])

    def get(self, subject: str, version: int) -> SchemaVersion:
        found = self.versions(subject)
        if not 1 <= version <= len(found):
            raise RiverbedError(
                f"subject '{subject}' has no schema version {version}; "
                f"it has {len(found)} version(s)"
            )
        return found[version - 1]

    def register(
        self,
        subject: str,
        schema: Schema,
        compatibility: Compatibility = Compatibility.BACKWARD,
    ) -> SchemaVersion:
        """The version of ``schema``: an existing one if it was registered before, else a new one
        if it is compatible with the latest under the subject's mode."""
        existing = self.versions(subject)
        canonical = _canonical(schema)
        for version in existing:
            if _canonical(version.schema) == canonical:
                return version
        mode = existing[0].compatibility if existing else compatibility
        if existing:
            problems = incompatibilities(existing[-1].schema, schema, mode)
            if problems:
                raise IncompatibleSchemaError(
                    f"schema for '{subject}' is not {mode.value}-compatible with version "
                    f"{existing[-1].version}: " + "; ".join(problems)
                )
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        with self._log.producer() as producer:
            producer.send(
                self._topic,
                msgspec.json.encode(_Entry(subject, schema, mode)),
                key=f"{subject}#{digest}".encode(),
            ).result(timeout=30)
        # Read back: a registration racing ours from another process may have come first.
        for version in self.versions(subject):
            if _canonical(version.schema) == canonical:
                return version
        raise RiverbedError(f"schema for '{subject}' was written but cannot be read back")


def _canonical(schema: Schema) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))
