"""Private cgroup v2 directories for tests that start processes in their own cgroup."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from probe_agent.enrich import cgroup2_mount


@contextmanager
def private_cgroup(name: str) -> Iterator[Path]:
    """A new cgroup under the v2 mount, removed afterwards with everything created below it."""
    path = cgroup2_mount() / f"{name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    path.mkdir()
    try:
        yield path
    finally:
        remove_cgroup(path)


def remove_cgroup(path: Path) -> None:
    """Remove a cgroup and its descendants, deepest first; a cgroup can only go once the
    processes that were in it are reaped, so each removal is retried for up to 5 s."""
    below = [p for p in path.rglob("*") if p.is_dir()]
    for cgroup in [*sorted(below, key=lambda p: len(p.parts), reverse=True), path]:
        for _ in range(100):
            try:
                cgroup.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)
