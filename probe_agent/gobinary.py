"""What the goroutine probe needs to know about one Go executable, read from the file itself.

* `runtime.g` / `runtime.m` field offsets (g.goid, g.stack, g.m, m.curg) from the binary's DWARF
  (`.debug_info`, compressed or not), so no Go version's layout is hard-coded;
* the addresses of the functions it hooks, from `.symtab`;
* where to put each uprobe, found by disassembling with capstone. The instruction under a
  uprobe decides its cost: x86 emulates jumps, calls and NOPs after the breakpoint trap, but
  single-steps anything else out of line, a second trap; measured here: ~1 µs per hit on a
  CALL or NOP, ~20 µs on a RET or MOV. So:
  - a `go` statement is seen at the `CALL runtime.runqput` of `runtime.newproc.func1`, just
    after `newproc1` returned the new g and the code moved it to BX (`spawn_site`); binaries
    where that pattern is not found fall back to every RET of `runtime.newproc1` (new g in AX).
    Never uretprobes: they rewrite the return address on the stack, which Go's movable stacks
    do not survive;
  - an entry probe sits on the conditional jump of the function's stack-check prologue
    (`CMPQ 0x10(R14), SP; JBE morestack`, or LEAQ/CMPQ/JBE for big frames): the arguments
    and R14 are untouched there (`entry_offsets`; 0 when the prologue has another shape).

A binary built with `-ldflags=-s -w` (the usual release build) has neither: its functions are
then read from the Go function table and the offsets from the runtime's own type descriptors
(probe_agent/goruntime_data.py), which every Go binary keeps. Where neither source reads,
`inspect` raises GoBinaryError saying why, and the agent traces that binary without goroutine
ids. `GoBinaryCache` keeps the answer per file ((device, inode, mtime, size)), bounded.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import capstone  # type: ignore[import-untyped]
from elftools.common.exceptions import DWARFError, ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from probe_agent.goruntime_data import (
    GoDataError,
    pclntab_functions,
    pclntab_go_version,
    struct_field_offsets,
)

NEWPROC1 = "runtime.newproc1"
# newproc runs `newg := newproc1(...); runqput(pp, newg, true)` in this closure on g0
NEWPROC_FUNC1 = "runtime.newproc.func1"
RUNQPUT = "runtime.runqput"
# Its `go cr.backgroundRead()` runs once per server request on a keep-alive connection; that
# goroutine only reads the next request's first byte: its spawn is not reported.
BACKGROUND_READ = "net/http.(*connReader).startBackgroundRead"
# net/http client: the caller's goroutine enters persistConn.roundTrip; the writeLoop goroutine
# then writes the request with Request.write (see bpf/go_runtime.bpf.c).
PC_ROUNDTRIP = "net/http.(*persistConn).roundTrip"
REQUEST_WRITE = "net/http.(*Request).write"
REQUIRED = (NEWPROC1,)
OPTIONAL = (PC_ROUNDTRIP, REQUEST_WRITE, NEWPROC_FUNC1, RUNQPUT, BACKGROUND_READ)
_EM_X86_64 = "EM_X86_64"
# Go 1.17 brought the register ABI (g in R14, arguments in AX, BX, ...) the probes rely on;
# 1.18 the inline version string in .go.buildinfo that tells the version without relocation.
MIN_GO = (1, 18)
_BUILDINFO_MAGIC = b"\xff Go buildinf:"


class GoBinaryError(ValueError):
    """This executable cannot be traced at goroutine level; the message says why."""


@dataclass(frozen=True)
class GoBinary:
    path: str
    go_version: str                        # "go1.19.8"
    goid_offset: int                       # offsetof(runtime.g, goid)
    stack_offset: int                      # offsetof(runtime.g, stack): {lo, hi uintptr}
    m_offset: int                          # offsetof(runtime.g, m)
    curg_offset: int                       # offsetof(runtime.m, curg)
    gopc_offset: int                       # offsetof(runtime.g, gopc)
    functions: dict[str, tuple[int, int]]  # symbol -> (address, size) for REQUIRED + found OPTIONAL
    newproc1_rets: tuple[int, ...]         # offsets of RET instructions from newproc1's start
    spawn_site: int | None                 # offset in NEWPROC_FUNC1 of CALL runqput (BX = new g)
    entry_offsets: dict[str, int]          # hooked function -> offset of its entry probe
    read_from: str = ".symtab, DWARF"      # where functions and offsets came from (for the log)
    load_base: int | None = None           # PIE: link-time address of the file's start (else None)

    def has(self, symbol: str) -> bool:
        return symbol in self.functions

    def unreported_spawns(self, mapped_at: int = 0) -> tuple[int, int]:
        """[lo, hi): code addresses whose `go` statements are not reported ((0, 0): none), in a
        process that mapped the file's start at `mapped_at` (matters for a PIE build only)."""
        addr, size = self.functions.get(BACKGROUND_READ, (0, 0))
        if not size:
            return 0, 0
        bias = mapped_at - self.load_base if self.load_base is not None and mapped_at else 0
        return addr + bias, addr + size + bias


_ELF64_SYM = struct.Struct("<IBBHQQ")  # st_name, st_info, st_other, st_shndx, st_value, st_size
_STT_FUNC = 2


def _symbols(elf: ELFFile, wanted: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """{name: (address, size)} of the wanted functions in .symtab. Read raw: pyelftools builds
    an object per symbol (~0.4 s for a small Go binary), this compares names as bytes."""
    symtab = elf.get_section_by_name(".symtab")
    if not isinstance(symtab, SymbolTableSection) or symtab["sh_entsize"] != _ELF64_SYM.size:
        return {}
    names = symtab.stringtable.data()
    todo = {name.encode(): name for name in wanted}
    found: dict[str, tuple[int, int]] = {}
    for st_name, st_info, _, _, value, size in _ELF64_SYM.iter_unpack(symtab.data()):
        if st_info & 0xF != _STT_FUNC:
            continue
        end = names.find(b"\0", st_name)
        name = todo.get(names[st_name:end])
        if name is not None and name not in found:
            found[name] = (value, size)
            if len(found) == len(todo):
                break
    return found


def go_version(elf: ELFFile) -> str:
    """The toolchain version written in .go.buildinfo ("go1.19.8"); GoBinaryError when it is
    not there or older than MIN_GO."""
    section = elf.get_section_by_name(".go.buildinfo")
    return buildinfo_version(section.data()[:64] if section is not None else b"")


def buildinfo_version(data: bytes) -> str:
    """The version in the head of a .go.buildinfo section (see go_version)."""
    if not data.startswith(_BUILDINFO_MAGIC) or len(data) < 33:
        raise GoBinaryError("it has no Go build information")
    if not data[15] & 2:  # no inline strings: written by Go < 1.18
        raise GoBinaryError(f"it was built by Go older than {MIN_GO[0]}.{MIN_GO[1]}")
    length, pos = 0, 32
    for shift in range(0, 35, 7):  # uvarint length, then the bytes
        byte = data[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    version = data[pos:pos + length].decode("ascii", "replace")
    numbers = version.removeprefix("go").split(".")
    try:
        major_minor = (int(numbers[0]), int(numbers[1].split("rc")[0].split("beta")[0]))
    except (ValueError, IndexError):
        raise GoBinaryError(f"its Go version {version!r} does not parse") from None
    if major_minor < MIN_GO:
        raise GoBinaryError(f"it was built by {version}, older than Go {MIN_GO[0]}.{MIN_GO[1]}")
    return version


def _function_bytes(elf: ELFFile, fh: BinaryIO, addr: int, size: int) -> bytes:
    for section in elf.iter_sections():
        start, end = section["sh_addr"], section["sh_addr"] + section["sh_size"]
        if section["sh_type"] == "SHT_PROGBITS" and start <= addr and addr + size <= end:
            fh.seek(section["sh_offset"] + addr - start)
            return fh.read(size)
    raise GoBinaryError(f"no section holds the function at {addr:#x}")


def ret_offsets(code: bytes, addr: int) -> tuple[int, ...]:
    """Offsets (from the function start) of every RET in the x86-64 machine code `code`."""
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    rets: list[int] = []
    covered = 0
    for insn in md.disasm(code, addr):
        covered += insn.size
        if insn.mnemonic == "ret":
            rets.append(insn.address - addr)
    if covered != len(code):  # capstone stopped early: RETs after that point would be missed
        raise GoBinaryError(f"capstone decoded {covered} of the function's {len(code)} bytes")
    return tuple(rets)


def _disasm(code: bytes, addr: int) -> list[Any]:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    return list(md.disasm(code, addr))


_ALIASES = {"rax": {"rax", "eax", "ax", "al", "ah"}, "rbx": {"rbx", "ebx", "bx", "bl", "bh"}}


def _writes(insn: Any, reg: str) -> bool:
    """Whether the instruction writes `reg` ("rax" or "rbx") or any part of it."""
    return not _ALIASES[reg].isdisjoint(insn.reg_name(r) for r in insn.regs_access()[1])


def spawn_site(code: bytes, addr: int, newproc1: int, runqput: int) -> int | None:
    """Offset (from `addr`) of the `CALL runqput` that follows `CALL newproc1` in
    runtime.newproc.func1, provided newproc1's result (AX) was moved to BX in between and BX
    was not written again; None when the code has another shape."""
    after_newproc1 = False
    new_g_in_bx = False
    for insn in _disasm(code, addr):
        if insn.mnemonic == "call":
            target = insn.operands[0].imm if insn.operands[0].type == capstone.x86.X86_OP_IMM else None
            if target == newproc1:
                after_newproc1, new_g_in_bx = True, False
                continue
            if target == runqput and after_newproc1 and new_g_in_bx:
                return int(insn.address - addr)
            if after_newproc1:
                return None  # another call between the two clobbers the registers
        if not after_newproc1:
            continue
        if insn.mnemonic == "mov" and insn.op_str == "rbx, rax":
            new_g_in_bx = True
        elif _writes(insn, "rbx") or (not new_g_in_bx and _writes(insn, "rax")):
            new_g_in_bx = False
    return None


def entry_offset(code: bytes, addr: int) -> int:
    """Offset of the conditional jump of a Go stack-check prologue (`[LEAQ -n(SP), R12;]
    CMPQ 0x10(R14), SP|R12; JBE`): registers still hold the arguments there and the jump is
    emulated. 0 (the entry itself) for any other prologue."""
    for i, insn in enumerate(_disasm(code[:32], addr)):
        if i >= 3:
            break
        if capstone.CS_GRP_JUMP in insn.groups and insn.mnemonic.startswith("j") and insn.mnemonic != "jmp":
            return int(insn.address - addr) if i else 0
        stack_check = insn.mnemonic == "cmp" and "[r14 + 0x10]" in insn.op_str
        if not stack_check and not (insn.mnemonic == "lea" and insn.op_str.startswith("r12, [rsp")):
            break
    return 0


def _member_offset(die: Any, member: str) -> int | None:
    for child in die.iter_children():
        if child.tag == "DW_TAG_member" and child.attributes.get("DW_AT_name") is not None \
                and child.attributes["DW_AT_name"].value == member.encode():
            loc = child.attributes.get("DW_AT_data_member_location")
            if loc is not None and isinstance(loc.value, int):
                return int(loc.value)
    return None


def struct_member_offsets(elf: ELFFile, package: str,
                          wanted: dict[str, tuple[str, ...]]) -> dict[str, dict[str, int]]:
    """{struct: {member: offset}} for the struct types and members in `wanted` (e.g.
    {"runtime.g": ("goid",)}), from DWARF.

    Go names its compile units after packages: only units named `package` are walked, and only
    until every wanted struct was seen (a full walk of "runtime" parses ~50k DIEs: seconds)."""
    if not elf.has_dwarf_info():
        raise GoBinaryError("it has no DWARF (built with -ldflags=-w?)")
    found: dict[str, dict[str, int]] = {}
    try:
        dwarf = elf.get_dwarf_info(relocate_dwarf_sections=False)
        for cu in dwarf.iter_CUs():
            top = cu.get_top_DIE()
            name = top.attributes.get("DW_AT_name")
            if name is None or name.value != package.encode():
                continue
            for die in top.iter_children():
                attr = die.attributes.get("DW_AT_name")
                if die.tag != "DW_TAG_structure_type" or attr is None:
                    continue
                struct_name = attr.value.decode(errors="replace")
                if struct_name not in wanted or struct_name in found:
                    continue
                offsets = {m: _member_offset(die, m) for m in wanted[struct_name]}
                missing = [m for m, off in offsets.items() if off is None]
                if missing:
                    raise GoBinaryError(f"its DWARF has no {struct_name}.{missing[0]}")
                found[struct_name] = {m: off for m, off in offsets.items() if off is not None}
                if len(found) == len(wanted):
                    return found
    except (DWARFError, ELFError, KeyError) as exc:
        raise GoBinaryError(f"its DWARF does not read ({exc})") from None
    absent = sorted(set(wanted) - set(found))
    raise GoBinaryError(f"its DWARF has no {absent[0]}")


def inspect(path: str | Path) -> GoBinary:
    """Read what the goroutine probe needs from a Go executable; GoBinaryError says why not."""
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            if elf["e_machine"] != _EM_X86_64:
                raise GoBinaryError(f"it is built for {elf['e_machine']}, only x86-64 is supported")
            version = _version(elf)
            functions, symbols_from = _functions(elf)
            missing = [name for name in REQUIRED if name not in functions]
            if missing:
                raise GoBinaryError(f"it has no function {missing[0]}")
            if (PC_ROUNDTRIP in functions) != (REQUEST_WRITE in functions):
                # the pooled-connection writer's goroutine would be taken for the caller's
                raise GoBinaryError(f"it has only one of {PC_ROUNDTRIP} and {REQUEST_WRITE}")
            offsets, offsets_from = _offsets(elf)
            g_offsets, m_offsets = offsets["runtime.g"], offsets["runtime.m"]
            addr, size = functions[NEWPROC1]
            rets = ret_offsets(_function_bytes(elf, fh, addr, size), addr)
            if not rets:
                raise GoBinaryError(f"no RET instruction found in {NEWPROC1}")
            site = None
            if NEWPROC_FUNC1 in functions and RUNQPUT in functions:
                closure, closure_size = functions[NEWPROC_FUNC1]
                site = spawn_site(_function_bytes(elf, fh, closure, closure_size), closure, addr,
                                  functions[RUNQPUT][0])
            entries = {name: entry_offset(_function_bytes(elf, fh, *functions[name]), functions[name][0])
                       for name in (PC_ROUNDTRIP, REQUEST_WRITE) if name in functions}
            load_base = _pie_load_base(elf)
    except (OSError, ELFError) as exc:
        raise GoBinaryError(f"it cannot be read as ELF ({exc})") from None
    return GoBinary(str(path), version, g_offsets["goid"], g_offsets["stack"], g_offsets["m"],
                    m_offsets["curg"], g_offsets["gopc"], functions, rets, site, entries,
                    f"{symbols_from}, {offsets_from}", load_base)


def _pie_load_base(elf: ELFFile) -> int | None:
    """For a PIE build (ET_DYN), the link-time address of file offset 0 (from the first
    PT_LOAD); None for a fixed-address executable."""
    if elf["e_type"] != "ET_DYN":
        return None
    for segment in elf.iter_segments():
        if segment["p_type"] == "PT_LOAD":
            return int(segment["p_vaddr"] - segment["p_offset"])
    return None


_RUNTIME_FIELDS = {"runtime.g": ("goid", "stack", "m", "gopc"), "runtime.m": ("curg",)}


def _version(elf: ELFFile) -> str:
    """The toolchain version from .go.buildinfo; for a binary without it (some release builds
    remove the section), the oldest version its function table's layout allows."""
    try:
        return go_version(elf)
    except GoBinaryError as exc:
        if elf.get_section_by_name(".go.buildinfo") is not None:
            raise
        try:
            return pclntab_go_version(elf)
        except GoDataError:
            raise exc from None


def _functions(elf: ELFFile) -> tuple[dict[str, tuple[int, int]], str]:
    """The hooked functions from .symtab, else (stripped) from the Go function table."""
    functions = _symbols(elf, REQUIRED + OPTIONAL)
    if all(name in functions for name in REQUIRED):
        return functions, ".symtab"
    try:
        return pclntab_functions(elf, REQUIRED + OPTIONAL), ".gopclntab"
    except GoDataError as exc:
        raise GoBinaryError(f"it has no symbol table, and {exc}") from None
    except (struct.error, IndexError, ValueError) as exc:  # a table that points outside itself
        raise GoBinaryError(f"it has no symbol table, and its function table is damaged ({exc})") from None


def _offsets(elf: ELFFile) -> tuple[dict[str, dict[str, int]], str]:
    """runtime.g / runtime.m field offsets from DWARF, else (stripped) from the type descriptors."""
    if elf.has_dwarf_info():
        return struct_member_offsets(elf, "runtime", _RUNTIME_FIELDS), "DWARF"
    try:
        return struct_field_offsets(elf, _RUNTIME_FIELDS), "type descriptors"
    except GoDataError as exc:
        raise GoBinaryError(f"it has no DWARF, and {exc}") from None
    except (struct.error, IndexError, ValueError) as exc:  # type data that points outside itself
        raise GoBinaryError(f"it has no DWARF, and its type data is damaged ({exc})") from None


FileKey = tuple[int, int, int, int]


def _release_garbage() -> None:
    """inspect() leaves ~30 MB of cyclic garbage (pyelftools' DIE trees) in a long-lived agent:
    collect it now, and hand the freed heap back (malloc_trim), rather than keep it as RSS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def file_key(path: str | Path) -> FileKey:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class GoBinaryCache:
    """inspect() once per executable file, by (device, inode, mtime, size); bounded LRU.
    A failure is cached too (as its GoBinaryError), so it is reported once per binary."""

    def __init__(self, max_entries: int = 256) -> None:
        self._max = max_entries
        self._cache: OrderedDict[FileKey, GoBinary | GoBinaryError] = OrderedDict()
        self.reads = 0

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, path: str | Path) -> tuple[FileKey, GoBinary | GoBinaryError, bool]:
        """(file key, result, fresh): `fresh` is True when this call read the file."""
        key = file_key(path)
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return key, found, False
        self.reads += 1
        result: GoBinary | GoBinaryError
        try:
            result = inspect(path)
        except GoBinaryError as exc:
            result = exc
        _release_garbage()
        self._cache[key] = result
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return key, result, True
