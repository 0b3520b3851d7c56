"""Match counts per fusion, accumulated over every graph the pass rewrote."""

from __future__ import annotations

import threading
from collections import Counter

_lock = threading.Lock()
_counts: Counter = Counter()
_graphs = 0


def record(counts: dict[str, int]) -> None:
    global _graphs
    with _lock:
        _counts.update(counts)
        _graphs += 1


def match_report() -> dict[str, int]:
    """Matches per fusion since the last :func:`reset_match_report` (every fusion listed)."""
    from .passes import FUSIONS

    with _lock:
        return {name: int(_counts.get(name, 0)) for name in FUSIONS}


def graphs_seen() -> int:
    """How many graphs the pass ran on since the last reset."""
    with _lock:
        return _graphs


def reset_match_report() -> None:
    global _graphs
    with _lock:
        _counts.clear()
        _graphs = 0
