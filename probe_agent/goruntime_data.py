"""Function addresses and struct layouts from the data a Go binary keeps for its own run time.

A binary built with `-ldflags="-s -w"` (the usual release build) has no `.symtab` and no DWARF,
but the Go runtime still needs, and so the file still holds:

* the function table (`pclntab`, Go 1.18+ layout): every function's name and entry address,
  for tracebacks — read by `pclntab_functions`, with the code's start from runtime.moduledata;
* a type descriptor for every type the program allocates, `runtime.g` and `runtime.m` among
  them (`new(g)`, `new(m)`), with each struct field's name and offset, for reflection and the
  garbage collector — read by `struct_field_offsets`.

The layouts read here are those of the Go 1.18+ runtime (internal/abi): the pclntab header
(function entries count from moduledata.text; newer linkers leave the header's own `textStart`
0), `_func` starting with (entryOff, nameOff); `abi.Type` (48 bytes on amd64,
`Str` at +40, kind at +23) and `abi.StructType` (fields slice at +56; each field name, type,
offset: 24 bytes). Anything that does not match raises GoDataError, so a layout this module
does not know gives no goroutine ids rather than wrong ones. In a PIE build the pointers in the
type data are relocated at load time; Go's linker also writes their link-time values in place,
which is what is read here.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator

from elftools.elf.elffile import ELFFile

_PCLNTAB_SECTIONS = (".gopclntab", ".data.rel.ro.gopclntab")
_PCLNTAB_MAGICS = {0xFFFFFFF0: "go1.18+", 0xFFFFFFF1: "go1.20+"}  # the layouts read here
_PCHEADER = struct.Struct("<IBBBBqQQQQQQQ")  # magic, pad, pad, minLC, ptrSize, nfunc, nfiles,
#                                             textStart, funcname, cu, filetab, pctab, pcln offsets
_FUNCTAB = struct.Struct("<II")             # entryoff, funcoff
_FUNC_HEAD = struct.Struct("<Ii")           # _func.entryOff, _func.nameOff
_MODULEDATA_SECTIONS = (".go.module", ".noptrdata", ".data", ".data.rel.ro")
_MODULE_TEXT_AT = 176                        # moduledata.text, .etext (after 7 slices, 3 words)
_MODULE_TEXT = struct.Struct("<QQ")
# Where type descriptors may live (newest linkers, others, PIE builds); their name offsets count
# from the start of the section that holds them.
_TYPE_SECTIONS = (".go.type", ".rodata", ".data.rel.ro")
_TYPE_STR = 40                               # abi.Type.Str (NameOff, int32)
_TYPE_KIND = 23                              # abi.Type.Kind_ (low 5 bits)
_KIND_STRUCT = 25
_STRUCT_FIELDS = 56                          # abi.StructType.Fields: ptr, len, cap
_FIELD = struct.Struct("<QQQ")               # abi.StructField: Name (pointer), Typ, Offset
_U64 = struct.Struct("<Q")
_MAX_FIELDS = 512


class GoDataError(ValueError):
    """The binary's run-time data cannot be read as this module expects; the message says why."""


def _section(elf: ELFFile, names: tuple[str, ...]) -> tuple[int, bytes] | None:
    for name in names:
        section = elf.get_section_by_name(name)
        if section is not None and section["sh_type"] == "SHT_PROGBITS":
            return section["sh_addr"], section.data()
    return None


def _pclntab(elf: ELFFile) -> tuple[int, bytes, tuple[int, ...]]:
    """The function table's address, bytes and header, checked."""
    found = _section(elf, _PCLNTAB_SECTIONS)
    if found is None:
        raise GoDataError("it has no .gopclntab")
    addr, tab = found
    if len(tab) < _PCHEADER.size:
        raise GoDataError(".gopclntab is truncated")
    header = _PCHEADER.unpack_from(tab)
    magic, ptr_size, nfunc, pcln_at = header[0], header[4], header[5], header[12]
    if magic not in _PCLNTAB_MAGICS or ptr_size != 8:
        raise GoDataError(f".gopclntab has a layout this agent does not read (magic {magic:#x})")
    if nfunc <= 0 or pcln_at + (nfunc + 1) * _FUNCTAB.size > len(tab):
        raise GoDataError(".gopclntab's function table does not fit in it")
    return addr, tab, header


def pclntab_go_version(elf: ELFFile) -> str:
    """The oldest Go version that writes this function table's layout ("go1.18+", "go1.20+")."""
    _, _, header = _pclntab(elf)
    return _PCLNTAB_MAGICS[header[0]]


def pclntab_functions(elf: ELFFile, wanted: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """{name: (address, size)} of the wanted functions, from the function table; size runs to
    the next function's entry (alignment padding included)."""
    addr, tab, header = _pclntab(elf)
    nfunc, names_at, pcln_at = header[5], header[8], header[12]
    text, etext = _module_text(elf, addr, header)
    todo = {name.encode(): name for name in wanted}
    out: dict[str, tuple[int, int]] = {}
    entries = list(_FUNCTAB.iter_unpack(tab[pcln_at:pcln_at + (nfunc + 1) * _FUNCTAB.size]))
    for (entry, func_at), (next_entry, _) in itertools.pairwise(entries):
        _, name_off = _FUNC_HEAD.unpack_from(tab, pcln_at + func_at)
        start = names_at + name_off
        name = todo.get(tab[start:tab.find(b"\0", start)])
        if name is not None and name not in out:
            if not text <= text + entry < text + next_entry <= etext:
                raise GoDataError(f".gopclntab places {name} outside the module's code")
            out[name] = (text + entry, next_entry - entry)
            if len(out) == len(todo):
                break
    return out


def _module_text(elf: ELFFile, pclntab_addr: int, header: tuple[int, ...]) -> tuple[int, int]:
    """[text, etext) of the module, from runtime.moduledata: the function table's entries count
    from `text`, which newer linkers leave out of the table's own header (textStart 0).
    moduledata is found by its first two words: the table's address, then that of its
    function-name part (the funcnametab slice)."""
    needle = _U64.pack(pclntab_addr) + _U64.pack(pclntab_addr + header[8])
    for name in _MODULEDATA_SECTIONS:
        section = elf.get_section_by_name(name)
        data = section.data() if section is not None else b""
        at = data.find(needle)
        if at >= 0 and at % 8 == 0 and at + _MODULE_TEXT_AT + _MODULE_TEXT.size <= len(data):
            text, etext = _MODULE_TEXT.unpack_from(data, at + _MODULE_TEXT_AT)
            if text and text < etext and header[7] in (0, text):
                return text, etext
    raise GoDataError("its module data (the code's bounds) was not found")


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _name(data: bytes, at: int) -> bytes:
    """An abi.Name: a flags byte, the length as a uvarint, the bytes."""
    length, start = _varint(data, at + 1)
    return data[start:start + length]


def _descriptors(base: int, data: bytes, type_name: str) -> Iterator[int]:
    """Offsets in `data` of struct type descriptors whose name is `type_name` (4-byte matches
    of the name's offset that merely look like one are weeded out by the caller)."""
    # the compiler writes a type's name once, as "*T" with TFlagExtraStar, for T and *T alike
    text = b"*" + type_name.encode()
    needle = bytes([len(text)]) + text
    name_at = data.find(needle)
    while name_at > 0:
        str_off = struct.pack("<i", name_at - 1)     # the name starts at its flags byte
        at = data.find(str_off)
        while at >= 0:
            desc = at - _TYPE_STR
            if desc >= 0 and (base + desc) % 8 == 0 and data[desc + _TYPE_KIND] & 0x1F == _KIND_STRUCT:
                yield desc
            at = data.find(str_off, at + 1)
        name_at = data.find(needle, name_at + 1)


def _fields(base: int, data: bytes, desc: int) -> dict[str, int] | None:
    """{field name: offset} of the struct type descriptor at `desc`; None when what is there
    does not read as one."""
    ptr, count, _ = _FIELD.unpack_from(data, desc + _STRUCT_FIELDS)
    if not 0 < count <= _MAX_FIELDS or not base <= ptr <= base + len(data) - count * _FIELD.size:
        return None
    out: dict[str, int] = {}
    for i in range(count):
        name_ptr, _, offset = _FIELD.unpack_from(data, ptr - base + i * _FIELD.size)
        if not base <= name_ptr < base + len(data):
            return None
        out[_name(data, name_ptr - base).decode(errors="replace")] = offset
    return out


def struct_field_offsets(elf: ELFFile, wanted: dict[str, tuple[str, ...]]) -> dict[str, dict[str, int]]:
    """{struct: {field: offset}} for the runtime structs and fields in `wanted` (as
    gobinary.struct_member_offsets gives them from DWARF), from their type descriptors: the
    first descriptor of that name, in the first section that holds one, whose field list reads
    and names every wanted field."""
    sections = [found for name in _TYPE_SECTIONS if (found := _section(elf, (name,))) is not None]
    out: dict[str, dict[str, int]] = {}
    for type_name, fields in wanted.items():
        for base, data in sections:
            for desc in _descriptors(base, data, type_name):
                try:
                    offsets = _fields(base, data, desc)
                except (struct.error, IndexError):
                    continue
                if offsets is not None and all(f in offsets for f in fields):
                    out[type_name] = {f: offsets[f] for f in fields}
                    break
            if type_name in out:
                break
        else:
            raise GoDataError(f"it has no type descriptor for {type_name} with the fields "
                              f"{', '.join(fields)}")
    return out
