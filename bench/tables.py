"""Figures in the benchmarks' markdown tables."""

from __future__ import annotations


def fig(row: dict, key: str, digits: int = 1) -> str:
    """A row's figure, or "-" where it has none (results of an older bench lack some)."""
    value = row.get(key)
    return "-" if value is None else f"{value:.{digits}f}"
