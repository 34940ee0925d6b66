"""Digests of modules' source files, for the snapshots' schemas (snapshots.py): an aggregate
class reads its own module's, its bases' and those of the modules and classes its module
imported while the module is imported, each once (a file changed since this process started
using riverbed is not read). A file replaced on disk later (a deploy while the process still
runs) must not pass for the code the process runs: a module met later is described from
memory instead."""

from __future__ import annotations

import hashlib
import os
import sys
import time
import types

_digests: dict[str, str | None] = {}
# The modules whose files were read as an aggregate's module was imported, by its name: only
# theirs describe its code, so that which other modules the process imported first (whose
# digests another aggregate's import read) does not change its snapshots' schema.
_read_with: dict[str, frozenset[str]] = {}
# Files changed after this are not taken for the code this process imported.
_STARTED = time.time()


def source_digest(module: str, *, executing: bool = False) -> str | None:
    """The digest of ``module``'s source file as first read, if it has one; ``executing``: the
    module is being imported (or reloaded) now, so its file is read again."""
    if executing or module not in _digests:
        _digests[module] = _read(module, trusted=executing)
    return _digests[module]


def digest_read_at_import(module: str, aggregate_module: str) -> str | None:
    """The digest of ``module``'s source file if it was read as ``aggregate_module`` was
    imported (``read_at_import``); None otherwise: its file may have been replaced since the
    process imported the module."""
    return _digests.get(module) if module in _read_with.get(aggregate_module, ()) else None


def read_at_import(module: str, bases: list[str]) -> None:
    """As an aggregate class of ``module`` is defined: read its source file, its bases'
    (``bases``: their modules), those of the modules it has imported so far, and of those its
    imported classes come from (each file once: a later read would not be what was imported)."""
    source_digest(module, executing=True)
    read = {module, *bases}
    found = sys.modules.get(module)
    for value in list(vars(found).values()) if found is not None else []:
        if isinstance(value, types.ModuleType):
            read.add(value.__name__)
        elif isinstance(value, type):
            read.add(value.__module__)
    for name in read - {module}:
        source_digest(name)
    _read_with[module] = _read_with.get(module, frozenset()) | read


def _read(module: str, trusted: bool) -> str | None:
    """``trusted``: the module is being imported, so its file is the code it runs."""
    path = getattr(sys.modules.get(module), "__file__", None)
    if not isinstance(path, str):
        return None
    try:
        if not trusted and os.stat(path).st_mtime > _STARTED:
            return None  # maybe not what the process imported: its classes' code instead
        with open(path, "rb") as source:
            return hashlib.sha256(source.read()).hexdigest()
    except OSError:  # in a zip, say
        return None
