"""probe_agent.gobinary on a freshly built Go binary, checked against independent tools:
binutils' readelf (DWARF of runtime.g), `go tool nm` (symbols) and `go tool objdump` (RETs).
Its release build (`-ldflags=-s -w`: no .symtab, no DWARF) must give the same answers from the
data the Go runtime keeps (function table, type descriptors)."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from probe_agent.gobinary import (
    BACKGROUND_READ,
    NEWPROC1,
    NEWPROC_FUNC1,
    PC_ROUNDTRIP,
    REQUEST_WRITE,
    GoBinary,
    GoBinaryCache,
    GoBinaryError,
    buildinfo_version,
    entry_offset,
    inspect,
    ret_offsets,
    spawn_site,
)
from tests.workloads.servers import GO_STRIPPED, GO_STRIPPED_PIE, go_binary, unreadable_go_binary


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("gobin")
    return go_binary("go_fanout", d), go_binary("go_fanout", d, *GO_STRIPPED)


@pytest.fixture(scope="module")
def unreadable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unreadable_go_binary("go_fanout", tmp_path_factory.mktemp("gounreadable"))


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
    assert info.gopc_offset == readelf_member_offset(binary, "runtime.g", "gopc")

    rows = (line.split(maxsplit=2) for line in go_tool("nm", str(binary)).splitlines())
    nm = {parts[2]: int(parts[0], 16) for parts in rows if len(parts) == 3 and parts[1] == "T"}
    for symbol in (NEWPROC1, PC_ROUNDTRIP, REQUEST_WRITE, NEWPROC_FUNC1, BACKGROUND_READ):
        assert info.functions[symbol][0] == nm[symbol], symbol
    background = nm[BACKGROUND_READ]
    assert info.unreported_spawns() == (background, background + info.functions[BACKGROUND_READ][1])
    assert info.load_base is None and info.unreported_spawns(0x7F0000000000) == info.unreported_spawns()

    # the spawn probe: on the CALL runqput right after newproc1's result went to BX
    lines = objdump_lines(binary, NEWPROC_FUNC1)
    texts = [text for _, text in lines]
    first = next(i for i, text in enumerate(texts) if text.startswith("CALL runtime.newproc1("))
    call = next(i for i, text in enumerate(texts) if text.startswith("CALL runtime.runqput("))
    assert "MOVQ AX, BX" in texts[first:call]
    assert info.spawn_site == lines[call][0] - info.functions[NEWPROC_FUNC1][0]
    # entry probes: on the JBE of the stack-check prologue
    for symbol in (PC_ROUNDTRIP, REQUEST_WRITE):
        lines = objdump_lines(binary, symbol)
        jbe = next(addr for addr, text in lines[:3] if text.startswith("JBE"))
        assert info.entry_offsets[symbol] == jbe - info.functions[symbol][0] > 0, symbol

    dump = go_tool("objdump", "-s", f"^{re.escape(NEWPROC1)}$", str(binary))
    start = info.functions[NEWPROC1][0]
    rets = tuple(int(m, 16) - start for m in re.findall(r"\t0x([0-9a-f]+)\t+[0-9a-f]+\t+RET\b", dump))
    assert rets and info.newproc1_rets == rets


def objdump_lines(binary: Path, symbol: str) -> list[tuple[int, str]]:
    """(address, instruction text) of one function, as `go tool objdump` prints them."""
    dump = go_tool("objdump", "-s", f"^{re.escape(symbol)}$", str(binary))
    return [(int(m[1], 16), m[2].strip())
            for m in re.finditer(r"\t0x([0-9a-f]+)\t+[0-9a-f]+\t+([^\n]*)", dump)]


def _same_answers(got: GoBinary, want: GoBinary) -> None:
    """Everything the probes use, equal; function sizes may differ (the function table's run
    to the next function, alignment padding included), and the code in between is the same."""
    assert got.functions.keys() == want.functions.keys()
    for name, (addr, size) in want.functions.items():
        assert got.functions[name][0] == addr and got.functions[name][1] >= size, name
    assert (got.goid_offset, got.stack_offset, got.m_offset, got.curg_offset, got.gopc_offset) == \
        (want.goid_offset, want.stack_offset, want.m_offset, want.curg_offset, want.gopc_offset)
    assert (got.newproc1_rets, got.spawn_site, got.entry_offsets) == \
        (want.newproc1_rets, want.spawn_site, want.entry_offsets)


def test_a_stripped_binary_gives_the_same_answers_from_the_runtime_data(built: tuple[Path, Path]) -> None:
    binary, stripped = built
    assert subprocess.run(["readelf", "-S", str(stripped)], check=True, capture_output=True,
                          text=True).stdout.count(".debug_") == 0      # really no DWARF, no .symtab
    full, bare = inspect(binary), inspect(stripped)
    assert (full.read_from, bare.read_from) == (".symtab, DWARF", ".gopclntab, type descriptors")
    assert bare.go_version == full.go_version
    _same_answers(bare, full)
    assert bare.spawn_site is not None   # the fast spawn probe, not the single-stepped RETs


def test_a_stripped_pie_build_gives_the_same_answers(tmp_path: Path) -> None:
    # the type data sits in .data.rel.ro there, its pointers written at their link-time values
    pie, stripped_pie = go_binary("go_fanout", tmp_path, "-buildmode=pie"), \
        go_binary("go_fanout", tmp_path, *GO_STRIPPED_PIE)
    full, bare = inspect(pie), inspect(stripped_pie)
    assert bare.read_from == ".gopclntab, type descriptors"
    _same_answers(bare, full)
    # its code runs where it was loaded: the background reader's range moves with it
    assert bare.load_base is not None
    lo, hi = bare.unreported_spawns()
    bias = 0x55AA00000000 - bare.load_base
    assert bare.unreported_spawns(0x55AA00000000) == (lo + bias, hi + bias)


def test_a_binary_whose_build_info_was_removed_is_read_by_its_function_table(
        built: tuple[Path, Path], tmp_path: Path) -> None:
    _, stripped = built
    bare = tmp_path / "no_buildinfo"
    subprocess.run(["objcopy", "--remove-section", ".go.buildinfo", str(stripped), str(bare)], check=True)
    got = inspect(bare)
    assert got.go_version == "go1.18+"   # the Go here is 1.19: its table has the 1.18 layout
    _same_answers(got, inspect(stripped))


def test_unreadable_and_non_go_binaries_are_refused_with_a_reason(unreadable: Path) -> None:
    with pytest.raises(GoBinaryError, match=r"no symbol table, and it has no \.gopclntab"):
        inspect(unreadable)
    with pytest.raises(GoBinaryError, match="no Go build information"):
        inspect(sys.executable)
    with pytest.raises(GoBinaryError, match="ELF"):
        inspect(__file__)


def test_cache_reads_each_file_once_and_remembers_failures(built: tuple[Path, Path],
                                                           unreadable: Path) -> None:
    binary, _ = built
    cache = GoBinaryCache(max_entries=1)
    key, first, fresh = cache.get(binary)
    assert fresh and not isinstance(first, GoBinaryError)
    assert cache.get(binary) == (key, first, False)
    _, failed, fresh = cache.get(unreadable)
    assert fresh and isinstance(failed, GoBinaryError)
    assert cache.get(unreadable)[2] is False and len(cache) == 1   # bounded: the other was evicted
    assert cache.get(binary)[2] is True and cache.reads == 3


def test_ret_offsets_of_hand_assembled_code() -> None:
    # mov rbx, rax; ret; nop; ret imm16 (counts: it returns too); int3
    code = bytes.fromhex("4889c3" "c3" "90" "c20800" "cc")
    assert ret_offsets(code, 0x1000) == (3, 5)
    with pytest.raises(GoBinaryError, match="decoded"):
        ret_offsets(bytes.fromhex("c3" "0f0b0f"), 0)   # ret, ud2, then a truncated instruction


def _call(at: int, target: int) -> str:
    """`call target` placed at address `at`, as hex."""
    return "e8" + (target - at - 5).to_bytes(4, "little", signed=True).hex()


def test_spawn_site_needs_the_new_g_in_bx_at_the_runqput_call() -> None:
    newproc1, runqput = 0x100, 0x200
    mov_bx_ax, xor_ebx, mov_edx_1 = "4889c3", "31db", "ba01000000"
    code = _call(0, newproc1) + mov_bx_ax + _call(8, runqput)
    assert spawn_site(bytes.fromhex(code), 0, newproc1, runqput) == 8
    # BX (here EBX) written again after the move: the call does not see the new g
    code = _call(0, newproc1) + mov_bx_ax + xor_ebx + _call(10, runqput)
    assert spawn_site(bytes.fromhex(code), 0, newproc1, runqput) is None
    # no move at all
    code = _call(0, newproc1) + mov_edx_1 + _call(10, runqput)
    assert spawn_site(bytes.fromhex(code), 0, newproc1, runqput) is None


def test_entry_offset_is_the_prologue_jump_or_the_entry() -> None:
    small = "493b6610" "7657"                        # cmp rsp, [r14+0x10]; jbe
    big = "4c8da424b0feffff" "4d3b6610" "0f86930d0000"  # lea r12, [rsp-0x150]; cmp r12, [r14+0x10]; jbe
    assert entry_offset(bytes.fromhex(small + "90" * 8), 0x1000) == 4
    assert entry_offset(bytes.fromhex(big + "90" * 8), 0x1000) == 12
    assert entry_offset(bytes.fromhex("4889c3" + small), 0x1000) == 0   # anything else first: the entry
    assert entry_offset(bytes.fromhex("7657" + "90" * 8), 0x1000) == 0


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


def test_damaged_run_time_data_is_refused_with_a_reason_never_another_error(
        built: tuple[Path, Path], tmp_path: Path) -> None:
    """Seeded byte flips in the sections a stripped binary is read from: every answer is either
    an inspection or a GoBinaryError (the agent's worker would otherwise log a traceback)."""
    _, stripped = built
    original = stripped.read_bytes()
    with open(stripped, "rb") as fh:
        spans = [(s["sh_offset"], s["sh_size"]) for s in ELFFile(fh).iter_sections()
                 if s.name in (".gopclntab", ".rodata", ".noptrdata")]
    rng = random.Random(7)
    damaged = tmp_path / "damaged"
    refused = 0
    for _ in range(150):
        data = bytearray(original)
        offset, size = rng.choice(spans)
        for _ in range(rng.choice((1, 8, 64))):
            reach = min(size, 4096) if rng.random() < 0.7 else size   # the headers, or anywhere
            data[offset + rng.randrange(reach)] = rng.randrange(256)
        damaged.write_bytes(data)
        try:
            inspect(damaged)
        except GoBinaryError:
            refused += 1
    assert refused > 0
