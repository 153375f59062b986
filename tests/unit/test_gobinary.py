"""probe_agent.gobinary on a freshly built Go binary, checked against independent tools:
binutils' readelf (DWARF of runtime.g), `go tool nm` (symbols) and `go tool objdump` (RETs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from probe_agent.gobinary import (
    NEWPROC1,
    PC_ROUNDTRIP,
    REQUEST_WRITE,
    GoBinaryCache,
    GoBinaryError,
    buildinfo_version,
    inspect,
    ret_offsets,
)
from tests.workloads.servers import HERE


def _build(out: Path, *ldflags: str) -> Path:
    env = {**os.environ, "GO111MODULE": "off", "GOCACHE": str(out.parent / "gocache")}
    subprocess.run(["go", "build", *ldflags, "-o", str(out), str(HERE / "go_fanout.go")], check=True, env=env)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("gobin")
    return _build(d / "go_fanout"), _build(d / "go_fanout_stripped", "-ldflags=-s -w")


def readelf_member_offset(binary: Path, struct_name: str, member: str) -> int:
    """The member's DW_AT_data_member_location as binutils prints it."""
    out = subprocess.run(["readelf", "--debug-dump=info", str(binary)], check=True,
                         capture_output=True, text=True).stdout
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if "(DW_TAG_structure_type)" in line and lines[i + 1].split(":", 1)[-1].strip() == struct_name:
            name = None
            for follow in lines[i + 2:]:
                if re.match(r"\s*<1>", follow):
                    break
                if "DW_AT_name" in follow:
                    name = follow.split(":", 1)[1].strip()
                elif "DW_AT_data_member_location" in follow and name == member:
                    return int(follow.split(":", 1)[1].strip())
    raise AssertionError(f"readelf shows no {struct_name}.{member}")


def go_tool_version() -> str:
    out = subprocess.run(["go", "env", "GOVERSION"], check=True, capture_output=True, text=True).stdout
    return out.strip()


def go_tool(*args: str) -> str:
    return subprocess.run(["go", "tool", *args], check=True, capture_output=True, text=True).stdout


def test_offsets_symbols_and_rets_agree_with_binutils_and_go_tools(built: tuple[Path, Path]) -> None:
    binary, _ = built
    info = inspect(binary)
    assert info.go_version == go_tool_version()
    assert info.goid_offset == readelf_member_offset(binary, "runtime.g", "goid")
    assert info.stack_offset == readelf_member_offset(binary, "runtime.g", "stack")
    assert info.m_offset == readelf_member_offset(binary, "runtime.g", "m")
    assert info.curg_offset == readelf_member_offset(binary, "runtime.m", "curg")

    rows = (line.split(maxsplit=2) for line in go_tool("nm", str(binary)).splitlines())
    nm = {parts[2]: int(parts[0], 16) for parts in rows if len(parts) == 3 and parts[1] == "T"}
    for symbol in (NEWPROC1, PC_ROUNDTRIP, REQUEST_WRITE):
        assert info.functions[symbol][0] == nm[symbol], symbol

    dump = go_tool("objdump", "-s", f"^{re.escape(NEWPROC1)}$", str(binary))
    start = info.functions[NEWPROC1][0]
    rets = tuple(int(m, 16) - start for m in re.findall(r"\t0x([0-9a-f]+)\t+[0-9a-f]+\t+RET\b", dump))
    assert rets and info.newproc1_rets == rets


def test_stripped_and_non_go_binaries_are_refused_with_a_reason(built: tuple[Path, Path]) -> None:
    _, stripped = built
    with pytest.raises(GoBinaryError, match="stripped"):
        inspect(stripped)
    with pytest.raises(GoBinaryError, match="no Go build information"):
        inspect(sys.executable)
    with pytest.raises(GoBinaryError, match="ELF"):
        inspect(__file__)


def test_cache_reads_each_file_once_and_remembers_failures(built: tuple[Path, Path]) -> None:
    binary, stripped = built
    cache = GoBinaryCache(max_entries=1)
    key, first, fresh = cache.get(binary)
    assert fresh and not isinstance(first, GoBinaryError)
    assert cache.get(binary) == (key, first, False)
    _, failed, fresh = cache.get(stripped)
    assert fresh and isinstance(failed, GoBinaryError)
    assert cache.get(stripped)[2] is False and len(cache) == 1   # bounded: the other was evicted
    assert cache.get(binary)[2] is True and cache.reads == 3


def test_ret_offsets_of_hand_assembled_code() -> None:
    # mov rbx, rax; ret; nop; ret imm16 (counts: it returns too); int3
    code = bytes.fromhex("4889c3" "c3" "90" "c20800" "cc")
    assert ret_offsets(code, 0x1000) == (3, 5)
    with pytest.raises(GoBinaryError, match="decoded"):
        ret_offsets(bytes.fromhex("c3" "0f0b0f"), 0)   # ret, ud2, then a truncated instruction


def _buildinfo(flags: int, version: bytes) -> bytes:
    return b"\xff Go buildinf:" + bytes([8, flags]) + bytes(16) + bytes([len(version)]) + version


def test_buildinfo_version_refuses_what_the_probes_cannot_read() -> None:
    assert buildinfo_version(_buildinfo(2, b"go1.22.3")) == "go1.22.3"
    assert buildinfo_version(_buildinfo(2, b"go1.23rc1")) == "go1.23rc1"
    with pytest.raises(GoBinaryError, match=re.escape("older than 1.18")):
        buildinfo_version(_buildinfo(0, b""))           # pointer format: Go 1.13-1.17
    with pytest.raises(GoBinaryError, match=re.escape("go1.16.2, older than Go 1.18")):
        buildinfo_version(_buildinfo(2, b"go1.16.2"))
    with pytest.raises(GoBinaryError, match="no Go build information"):
        buildinfo_version(b"\x7fELF")
