"""The embedded log backend: ``sqlite:///path``."""

from riverbed.log.sqlite.log import SqliteLog

__all__ = ["SqliteLog"]
