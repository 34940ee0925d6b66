"""Digests of modules' source files, for the snapshots' schemas (repository.py): each module's
is read once, the first time riverbed meets the module, which an aggregate class defined in it
or deriving from its classes does while the module is imported. A file replaced on disk later
(a deploy while the process still runs) must not pass for the code the process runs."""

from __future__ import annotations

import hashlib
import sys

_digests: dict[str, str | None] = {}


def source_digest(module: str, *, executing: bool = False) -> str | None:
    """The digest of ``module``'s source file as first read, if it has one; ``executing``: the
    module is being imported (or reloaded) now, so its file is read again."""
    if executing or module not in _digests:
        _digests[module] = _read(module)
    return _digests[module]


def _read(module: str) -> str | None:
    path = getattr(sys.modules.get(module), "__file__", None)
    if not isinstance(path, str):
        return None
    try:
        with open(path, "rb") as source:
            return hashlib.sha256(source.read()).hexdigest()
    except OSError:  # in a zip, say
        return None
