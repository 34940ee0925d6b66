"""Exceptions shared by every layer. Each message names the thing, the problem and the fix."""

from __future__ import annotations


class RiverbedError(Exception):
    """Base class of every error riverbed raises on purpose."""


class InvalidUrlError(RiverbedError, ValueError):
    """A backend URL that cannot be parsed or names an unknown scheme or option."""


class MissingExtraError(RiverbedError, ImportError):
    """A backend whose optional dependency is not installed."""

    def __init__(self, what: str, extra: str, module: str) -> None:
        super().__init__(
            f"{what} needs the '{module}' package; install it with: pip install 'riverbed[{extra}]'"
        )
