"""Fixtures of the fault tests: a Redis of the test's own (it gets flushed or killed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.procs import free_port, stop_daemon
from infra.redis_server import redis_url, start_redis


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis only this test uses: flushing it can not disturb any other test."""
    daemon = start_redis(tmp_path / "redis", free_port())
    try:
        yield redis_url(int(daemon.facts["port"]))
    finally:
        stop_daemon(daemon)
