"""Demos of what riverbed does, run by ``riverbed demo``."""

from __future__ import annotations

from riverbed.demo.log_demo import DemoResult, run_log_demo

__all__ = ["DemoResult", "run_log_demo"]
