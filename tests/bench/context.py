"""Shared state for benchmark modules: the real broker and Redis, started once per run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console


@dataclass
class BenchContext:
    quick: bool = False
    console: Console = field(default_factory=Console)
    _cleanups: list[Callable[[], None]] = field(default_factory=list)
    _cache: dict[str, object] = field(default_factory=dict)

    def once(self, key: str, start: Callable[[], tuple[object, Callable[[], None]]]) -> object:
        """Start a shared resource (broker, Redis, ...) at most once per run; stopped by close()."""
        if key not in self._cache:
            value, stop = start()
            self._cache[key] = value
            self._cleanups.append(stop)
        return self._cache[key]

    def close(self) -> None:
        while self._cleanups:
            self._cleanups.pop()()
