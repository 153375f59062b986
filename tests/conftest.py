"""Shared fixtures. `infra`: the real Tansu broker and redis-server, started once per session on
free loopback ports in a private run directory, only when some test asks for it, and stopped
at the end of the session (exactly the pids it started)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.services import LocalInfra


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that uses the real broker/Redis is an `infra` test, marked or not, so that
    # `-m "not infra"` deselects it rather than starting servers behind the user's back.
    for item in items:
        if "infra" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.infra)


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalInfra]:
    local = LocalInfra.start(tmp_path_factory.mktemp("infra-run"), partitions=4)
    try:
        yield local
    finally:
        local.stop()
