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
from collections.abc import Iterable

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
        (version,) = self.register_many([(subject, schema, compatibility)])
        return version

    def register_many(
        self, schemas: Iterable[tuple[str, Schema, Compatibility]]
    ) -> list[SchemaVersion]:
        """``register`` for several subjects, reading the registry once (and once more to read
        back what was written, if anything was): an app registers all its topics at start."""
        wanted = list(schemas)
        known = self._read()
        found: dict[int, SchemaVersion] = {}
        new: list[_Entry] = []
        for index, (subject, schema, compatibility) in enumerate(wanted):
            existing = known.get(subject, [])
            canonical = _canonical(schema)
            match = next((v for v in existing if _canonical(v.schema) == canonical), None)
            if match is not None:
                found[index] = match
                continue
            mode = existing[0].compatibility if existing else compatibility
            if existing:
                problems = incompatibilities(existing[-1].schema, schema, mode)
                if problems:
                    declared = (
                        f" (the mode of its first registration; the {compatibility.value} "
                        "declared now applies to new subjects only: a breaking change takes a "
                        "new topic)"
                        if compatibility is not mode
                        else ""
                    )
                    raise IncompatibleSchemaError(
                        f"schema for '{subject}' is not {mode.value}-compatible with version "
                        f"{existing[-1].version}{declared}: " + "; ".join(problems)
                    )
            new.append(_Entry(subject, schema, mode))
        if new:
            with self._log.producer() as producer:
                for entry in new:
                    digest = hashlib.sha256(_canonical(entry.schema).encode()).hexdigest()
                    producer.send(
                        self._topic,
                        msgspec.json.encode(entry),
                        key=f"{entry.subject}#{digest}".encode(),
                    )
                producer.flush(timeout=30)
            # Read back: a registration racing ours from another process may have come first.
            known = self._read()
        out = []
        for index, (subject, schema, _) in enumerate(wanted):
            if index in found:
                out.append(found[index])
                continue
            canonical = _canonical(schema)
            match = next(
                (v for v in known.get(subject, []) if _canonical(v.schema) == canonical), None
            )
            if match is None:
                raise RiverbedError(f"schema for '{subject}' was written but cannot be read back")
            out.append(match)
        return out


def _canonical(schema: Schema) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))
