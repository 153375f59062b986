"""probe_agent.gobinary on Go release binaries built by toolchains this machine does not have.

The local Go is 1.19; real fleets run every later Go. Stripped (`-s -w`) release binaries from
the npm registry (a registry this machine kind reaches), pinned to versions built by each Go
minor release from 1.20 to 1.27, are read from their function table and type descriptors (the
offsets differ between releases: goid 152 or 160, gopc 280, 288 or 296), and every answer is
checked against the machine code itself: `runtime.newproc1` must store the new goroutine's
`gopc` and `goid` at the offsets read, the spawn probe must sit on a CALL to runtime.runqput,
and the entry probes on a conditional jump. The binaries are only read, never run.
"""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import capstone  # type: ignore[import-untyped]
import pytest
from elftools.elf.elffile import ELFFile

from probe_agent.gobinary import NEWPROC1, NEWPROC_FUNC1, PC_ROUNDTRIP, REQUEST_WRITE, RUNQPUT, inspect
from probe_agent.goruntime_data import pclntab_functions

SAVE_ANCESTORS = "runtime.saveAncestors"
# package@version, path in its tarball, the version inspect reports (esbuild removes its build
# information, but the toolchain's version string is still in the file), the Go that built it
# (one per Go minor release from 1.20 on; 1.19 is the local toolchain, tested by building)
RELEASES = [
    ("@esbuild/linux-x64@0.17.19", "package/bin/esbuild", "go1.20.4", "go1.20.4"),
    ("lefthook-linux-x64@1.5.0", "package/bin/lefthook", "go1.21.1", "go1.21.1"),
    ("@esbuild/linux-x64@0.23.1", "package/bin/esbuild", "go1.22.5", "go1.22.5"),
    ("@esbuild/linux-x64@0.24.2", "package/bin/esbuild", "go1.23.1", "go1.23.1"),
    ("lefthook-linux-x64@1.12.0", "package/bin/lefthook", "go1.24.4", "go1.24.4"),
    ("@esbuild/linux-x64@0.27.0", "package/bin/esbuild", "go1.20+", "go1.25.4"),
    ("@esbuild/linux-x64@0.28.2", "package/bin/esbuild", "go1.20+", "go1.26.5"),
    ("lefthook-linux-x64@2.2.4", "package/bin/lefthook", "go1.27.4", "go1.27.4"),
]


def fetch(spec: str, member: str, into: Path) -> Path:
    done = subprocess.run(["npm", "pack", "--silent", spec, "--pack-destination", str(into)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"npm pack {spec} failed: {done.stderr[-500:]}"
    (tarball,) = into.glob("*.tgz")
    with tarfile.open(tarball) as tar:
        data = tar.extractfile(member)
        assert data is not None, f"{spec} has no {member}"
        out = into / Path(member).name
        out.write_bytes(data.read())
    return out


def code(binary: Path, addr: int, size: int) -> list[capstone.CsInsn]:
    """The function's instructions, its bytes read from the section that holds them."""
    with open(binary, "rb") as fh:
        for section in ELFFile(fh).iter_sections():
            start, end = section["sh_addr"], section["sh_addr"] + section["sh_size"]
            if section["sh_type"] == "SHT_PROGBITS" and start <= addr and addr + size <= end:
                fh.seek(section["sh_offset"] + addr - start)
                raw = fh.read(size)
                break
        else:
            raise AssertionError(f"no section holds {addr:#x}")
    return list(capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64).disasm(raw, addr))


def at(insns: list[capstone.CsInsn], address: int) -> capstone.CsInsn:
    (insn,) = [i for i in insns if i.address == address]
    return insn


@pytest.mark.parametrize(("spec", "member", "version", "built_by"), RELEASES,
                         ids=[release[3] for release in RELEASES])
def test_a_current_go_release_build_reads_and_agrees_with_its_machine_code(
        spec: str, member: str, version: str, built_by: str, tmp_path: Path) -> None:
    binary = fetch(spec, member, tmp_path)
    info = inspect(binary)
    assert info.read_from == ".gopclntab, type descriptors"   # stripped: no .symtab, no DWARF
    assert info.go_version == version and built_by.encode() in binary.read_bytes()
    assert (info.stack_offset, info.m_offset) == (0, 48)

    # newproc1 (Go source order: `newg.parentGoid = callergp.goid` (1.21+); `newg.gopc =
    # callerpc; newg.ancestors = saveAncestors(callergp)`, and `newg.goid = pp.goidcache`
    # later) reads and writes goids, and writes gopc just before that call, at the offsets read
    insns = code(binary, *info.functions[NEWPROC1])
    with open(binary, "rb") as fh:
        (save_ancestors, _) = pclntab_functions(ELFFile(fh), (SAVE_ANCESTORS,))[SAVE_ANCESTORS]
    call = next(k for k, i in enumerate(insns) if i.mnemonic == "call" and i.op_str == hex(save_ancestors))
    # the last store to memory before that call (Go 1.20 then loads the call's argument)
    before = next(i for i in reversed(insns[:call])
                  if i.mnemonic == "mov" and i.op_str.startswith("qword ptr ["))
    assert f"+ {info.gopc_offset:#x}]" in before.op_str, before.op_str
    goid = f"+ {info.goid_offset:#x}]"
    goid_moves = [i.op_str for i in insns if i.mnemonic == "mov" and goid in i.op_str]
    assert any(op.startswith("qword ptr [") for op in goid_moves)        # newg.goid = ...
    if int(built_by.split(".")[1]) >= 21:   # parentGoid exists from Go 1.21 on
        assert any(not op.startswith("qword ptr [") for op in goid_moves)  # ... = callergp.goid

    # the fast spawn probe: on the CALL to runqput in newproc's closure
    assert info.spawn_site is not None
    closure = info.functions[NEWPROC_FUNC1]
    spawn = at(code(binary, *closure), closure[0] + info.spawn_site)
    assert spawn.mnemonic == "call" and int(spawn.op_str, 16) == info.functions[RUNQPUT][0]

    # entry probes (net/http client, where the binary has it): on the prologue's conditional jump
    for symbol in (PC_ROUNDTRIP, REQUEST_WRITE):
        if symbol in info.functions:
            function = info.functions[symbol]
            jump = at(code(binary, *function), function[0] + info.entry_offsets[symbol])
            assert jump.mnemonic in ("jbe", "jb", "jae", "ja") and info.entry_offsets[symbol] > 0, symbol
