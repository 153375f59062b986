"""Shared fixtures. `infra`: the real Tansu broker and redis-server, started once per session on
free loopback ports in a private run directory, only when some test asks for it, and stopped
at the end of the session (exactly the pids it started)."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.services import LocalInfra
from tests.redis_cluster import LocalCluster, running_cluster
from tests.tls import TestPki

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that uses the real broker/Redis is an `infra` test, marked or not, so that
    # `-m "not infra"` deselects it rather than starting servers behind the user's back.
    for item in items:
        if {"infra", "redis_cluster"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.infra)


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalInfra]:
    local = LocalInfra.start(tmp_path_factory.mktemp("infra-run"), partitions=4)
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real three-primary, password-protected Redis Cluster for the session."""
    with running_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def tls_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The same, speaking only TLS (clients and cluster bus) with a CA of the session's own."""
    work = tmp_path_factory.mktemp("redis-cluster-tls")
    with running_cluster(work, pki=TestPki.make(work / "pki")) as cluster:
        yield cluster


@pytest.fixture
def reachable_by_nobody() -> Iterator[None]:
    """Let an unprivileged user (tests run `weft` as `nobody`) reach this checkout and its venv.

    A clone under a private directory (mktemp -d is 0700) is not traversable by others; grant
    search permission (o+x, no listing) on each such ancestor for the test, then restore it.
    """
    changed: list[tuple[Path, int]] = []
    for directory in [ROOT, *ROOT.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            changed.append((directory, stat.S_IMODE(mode)))
    try:
        yield
    finally:
        for directory, mode in changed:
            directory.chmod(mode)
