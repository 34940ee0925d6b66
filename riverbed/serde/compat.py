"""Schema compatibility between versions of a topic's type, as a schema registry checks it.

Schemas are JSON Schema documents (``schema_of`` makes them from a type). BACKWARD (the default):
consumers with the new schema read data written with the old one; FORWARD: consumers with the old
schema read data written with the new one; FULL: both; NONE: no check. The answer is a list of
problems, each naming the field, empty when the change is compatible.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import msgspec

Schema = dict[str, Any]


class Compatibility(enum.StrEnum):
    BACKWARD = "BACKWARD"
    FORWARD = "FORWARD"
    FULL = "FULL"
    NONE = "NONE"


def schema_of(tp: object) -> Schema:
    """The JSON Schema of a codec's type (raw bytes and text have trivial ones)."""
    if tp is None or tp is bytes:
        return {"type": "string", "contentEncoding": "binary"}
    if isinstance(tp, type) and hasattr(tp, "model_json_schema"):  # pydantic
        schema: Schema = tp.model_json_schema(ref_template="#/$defs/{model}")
        return schema
    return msgspec.json.schema(tp)


def incompatibilities(old: Schema, new: Schema, mode: Compatibility) -> list[str]:
    """Why ``new`` may not follow ``old`` under ``mode``; empty if it may."""
    problems: list[str] = []
    if mode in (Compatibility.BACKWARD, Compatibility.FULL):
        problems += _Reading(reader=new, writer=old, reader_is="new").check()
    if mode in (Compatibility.FORWARD, Compatibility.FULL):
        problems += _Reading(reader=old, writer=new, reader_is="old").check()
    return problems


class _Reading:
    """Whether data written with ``writer`` decodes with ``reader``."""

    def __init__(self, reader: Schema, writer: Schema, reader_is: str) -> None:
        self._reader_doc = reader
        self._writer_doc = writer
        self._reader_is = reader_is
        self._writer_is = "old" if reader_is == "new" else "new"
        self._seen: set[tuple[int, int]] = set()

    def check(self) -> list[str]:
        return self._compare(self._reader_doc, self._writer_doc, "")

    def _resolve(self, schema: Schema, doc: Schema) -> Schema:
        while "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            schema = doc.get("$defs", {}).get(name, {})
        return schema

    def _compare(self, reader: Schema, writer: Schema, path: str) -> list[str]:
        reader = self._resolve(reader, self._reader_doc)
        writer = self._resolve(writer, self._writer_doc)
        if (id(reader), id(writer)) in self._seen:  # recursive types
            return []
        self._seen.add((id(reader), id(writer)))
        where = f"field '{path}'" if path else "the value"
        reader_types, writer_types = _types(reader), _types(writer)
        if not reader_types:  # a reader that accepts anything
            return []
        if not writer_types:
            return [
                f"{where}: the {self._reader_is} schema accepts {_names(reader_types)} but data "
                f"written with the {self._writer_is} schema may hold any value"
            ]
        unreadable = writer_types - reader_types
        if "number" in reader_types:
            unreadable.discard("integer")  # a JSON integer is a number
        if unreadable:
            return [
                f"{where}: the {self._reader_is} schema accepts {_names(reader_types)} but data "
                f"written with the {self._writer_is} schema may hold {_names(unreadable)}"
            ]
        if "enum" in reader and "enum" in writer:
            missing = [v for v in writer["enum"] if v not in reader["enum"]]
            if missing:
                return [f"{where}: the {self._reader_is} schema lacks enum values {missing}"]
        readers = self._members(reader, self._reader_doc)
        writers = self._members(writer, self._writer_doc)
        if len(readers) > 1 or len(writers) > 1:  # a union (X | None, say): member by member
            return self._compare_members(readers, writers, path)
        problems: list[str] = []
        if writer.get("contentEncoding") == "binary" != reader.get("contentEncoding"):
            problems.append(
                f"{where}: data written with the {self._writer_is} schema is raw bytes, which "
                f"the {self._reader_is} schema reads as text (they need not be UTF-8)"
            )
        unmet = _unmet_constraints(reader, writer)
        if unmet:
            problems.append(
                f"{where}: the {self._reader_is} schema requires {', '.join(unmet)}, which data "
                f"written with the {self._writer_is} schema need not meet"
            )
        if "object" in writer_types and "properties" in reader:
            problems += self._compare_fields(reader, writer, path)
        problems += self._compare_values(reader, writer, path)
        items = reader.get("items")
        if isinstance(items, dict):  # a list's items: against the writer's, whatever they were
            written = writer.get("items")
            if isinstance(written, dict) or "prefixItems" not in writer:
                problems += self._compare(items, written if isinstance(written, dict) else {},
                                          f"{path}[]")  # fmt: skip
            else:  # a tuple written, a list read
                for index, item in enumerate(writer["prefixItems"]):
                    problems += self._compare(items, item, f"{path}[{index}]")
        if "prefixItems" in reader and "prefixItems" in writer:  # a tuple's items
            problems += self._compare_items(reader["prefixItems"], writer["prefixItems"], path)
        return problems

    def _compare_values(self, reader: Schema, writer: Schema, path: str) -> list[str]:
        """A dict's values read against what the writer's dict (or object) held, and a reader
        that forbids unknown fields against the fields written."""
        values = reader.get("additionalProperties")
        written_fields: dict[str, Schema] = writer.get("properties", {})
        if isinstance(values, dict):
            written = writer.get("additionalProperties")
            if isinstance(written, dict) or not written_fields:
                written = written if isinstance(written, dict) else {}
                return self._compare(values, written, f"{path}[...]")
            return [
                problem
                for name, field in written_fields.items()
                for problem in self._compare(values, field, f"{path}[{name!r}]")
            ]
        if values is not False or "properties" not in reader:
            return []
        if writer.get("additionalProperties") is not False and not written_fields:
            where = f"field '{path}'" if path else "the value"
            return [
                f"{where} forbids unknown fields in the {self._reader_is} schema, but data "
                f"written with the {self._writer_is} schema may hold any field"
            ]
        unknown = sorted(set(written_fields) - set(reader["properties"]))
        return [
            f"field '{f'{path}.{name}' if path else name}' of data written with the "
            f"{self._writer_is} schema is refused by the {self._reader_is} schema, which forbids "
            "unknown fields"
            for name in unknown
        ]

    def _members(self, schema: Schema, doc: Schema) -> list[Schema]:
        members: list[Schema] = schema.get("anyOf") or schema.get("oneOf") or [schema]
        return [self._resolve(member, doc) for member in members]

    def _compare_members(
        self, readers: list[Schema], writers: list[Schema], path: str
    ) -> list[str]:
        """Each member the writer may have written must be read by a reader member of its
        kind; the problems of the closest one when none reads it."""
        problems: list[str] = []
        for written in writers:
            kinds = _types(written)
            if "integer" in kinds:
                kinds = kinds | {"number"}
            candidates = [r for r in readers if not _types(r) or _types(r) & kinds]
            found = [self._compare(candidate, written, path) for candidate in candidates]
            if found and all(found):
                problems += found[0]
        return problems

    def _compare_items(self, reader: list[Schema], writer: list[Schema], path: str) -> list[str]:
        if len(reader) != len(writer):
            return [
                f"field '{path}' is a tuple of {len(reader)} items in the {self._reader_is} "
                f"schema but of {len(writer)} in data written with the {self._writer_is} one"
            ]
        problems: list[str] = []
        for index, (read, written) in enumerate(zip(reader, writer, strict=True)):
            problems += self._compare(read, written, f"{path}[{index}]")
        return problems

    def _compare_fields(self, reader: Schema, writer: Schema, path: str) -> list[str]:
        problems: list[str] = []
        written = writer.get("properties", {})
        for name, field in reader.get("properties", {}).items():
            field_path = f"{path}.{name}" if path else name
            if name in written:
                problems += self._compare(field, written[name], field_path)
            elif name in reader.get("required", ()):
                problems.append(
                    f"field '{field_path}' is required by the {self._reader_is} schema but "
                    f"missing from data written with the {self._writer_is} schema; "
                    "give it a default"
                )
        return problems


# Constraints a reader may add only if the writer's implied them: a bound at least as tight, or
# the same pattern, format or multiple.
_LOWER_BOUNDS = ("minLength", "minItems", "minProperties")
_UPPER_BOUNDS = ("maxLength", "maxItems", "maxProperties")
_SAME = ("pattern", "format", "multipleOf")


def _unmet_constraints(reader: Schema, writer: Schema) -> list[str]:
    """The reader's constraints that the writer's do not imply, as ``minimum 0``."""
    unmet = [
        f"{key} {reader[key]!r}"
        for key in _SAME
        if key in reader and writer.get(key) != reader[key]
    ]
    unmet += [
        f"{key} {reader[key]}"
        for key in _LOWER_BOUNDS
        if key in reader and not writer.get(key, -math.inf) >= reader[key]
    ]
    unmet += [
        f"{key} {reader[key]}"
        for key in _UPPER_BOUNDS
        if key in reader and not writer.get(key, math.inf) <= reader[key]
    ]
    # Number bounds: a writer's exclusive bound implies an inclusive one at the same value.
    low = max(writer.get("minimum", -math.inf), writer.get("exclusiveMinimum", -math.inf))
    high = min(writer.get("maximum", math.inf), writer.get("exclusiveMaximum", math.inf))
    strict_low = writer.get("exclusiveMinimum", -math.inf) >= writer.get("minimum", -math.inf)
    strict_high = writer.get("exclusiveMaximum", math.inf) <= writer.get("maximum", math.inf)
    if "minimum" in reader and not low >= reader["minimum"]:
        unmet.append(f"minimum {reader['minimum']}")
    if "exclusiveMinimum" in reader and not (
        low > reader["exclusiveMinimum"] or (strict_low and low >= reader["exclusiveMinimum"])
    ):
        unmet.append(f"exclusiveMinimum {reader['exclusiveMinimum']}")
    if "maximum" in reader and not high <= reader["maximum"]:
        unmet.append(f"maximum {reader['maximum']}")
    if "exclusiveMaximum" in reader and not (
        high < reader["exclusiveMaximum"] or (strict_high and high <= reader["exclusiveMaximum"])
    ):
        unmet.append(f"exclusiveMaximum {reader['exclusiveMaximum']}")
    return unmet


def _types(schema: Schema) -> set[str]:
    members: list[Schema] = schema.get("anyOf") or schema.get("oneOf") or []
    if members:
        found: set[str] = set()
        for member in members:
            found |= _types(member)
        return found
    kind = schema.get("type")
    if kind is None:
        if "$ref" in schema or "properties" in schema:
            return {"object"}
        if "enum" in schema:
            return {type(v).__name__.replace("str", "string") for v in schema["enum"]}
        return set()
    return {kind} if isinstance(kind, str) else set(kind)


def _names(types: set[str]) -> str:
    return " or ".join(sorted(types))
