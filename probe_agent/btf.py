"""Kernel struct member offsets read from raw BTF (`/sys/kernel/btf/vmlinux`).

The installed kernel headers do not match the running kernel, so offsets of kernel fields
(`tcp_sock.copied_seq`, `task_struct.tgid`, ...) come from the kernel's own type information.
This is a small parser of the documented BTF format (Documentation/bpf/btf.rst): a header, a
type section of variable-length records and a string section. It reads only what offsets need.
"""

from __future__ import annotations

import functools
import struct as _struct
from dataclasses import dataclass

__all__ = ["BtfError", "member_offset", "release_parsed"]

VMLINUX = "/sys/kernel/btf/vmlinux"

_MAGIC = 0xEB9F
# BTF kinds (include/uapi/linux/btf.h).
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
_VOLATILE, _CONST, _RESTRICT, _FUNC, _FUNC_PROTO, _VAR, _DATASEC = 9, 10, 11, 12, 13, 14, 15
_FLOAT, _DECL_TAG, _TYPE_TAG, _ENUM64 = 16, 17, 18, 19
_MODIFIERS = {_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG}


class BtfError(Exception):
    """BTF is missing, malformed, or lacks the struct/member asked for."""


@dataclass(frozen=True)
class _Member:
    name: str
    type_id: int
    bit_offset: int


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    ref: int  # referenced type id for modifiers/pointers; size for structs
    members: tuple[_Member, ...] = ()


def _extra_size(kind: int, vlen: int) -> int:
    """Bytes of kind-specific data after the 12-byte common btf_type record."""
    if kind in (_INT, _VAR, _DECL_TAG):
        return 4
    if kind == _ARRAY:
        return 12
    if kind in (_STRUCT, _UNION, _DATASEC, _ENUM64):
        return 12 * vlen
    if kind in (_ENUM, _FUNC_PROTO):
        return 8 * vlen
    if kind in (_PTR, _FWD, _TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _FUNC, _FLOAT, _TYPE_TAG):
        return 0
    raise BtfError(f"unknown BTF kind {kind}: this parser is older than the kernel's BTF")


class _Btf:
    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError("BTF blob is too short to hold a header")
        magic, _version, _flags, hdr_len = _struct.unpack_from("<HBBI", data, 0)
        if magic != _MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x} (big-endian BTF is not supported)")
        type_off, type_len, str_off, str_len = _struct.unpack_from("<IIII", data, 8)
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        self.types: list[_Type | None] = [None]  # type id 0 is void
        self.by_name: dict[str, list[int]] = {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, size_or_type = _struct.unpack_from("<III", data, pos)
            kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            pos += 12
            members: tuple[_Member, ...] = ()
            if kind in (_STRUCT, _UNION):
                members = tuple(self._member(data, pos + 12 * i, kind_flag) for i in range(vlen))
            pos += _extra_size(kind, vlen)
            name = self._str(name_off)
            self.types.append(_Type(kind, name, size_or_type, members))
            if kind in (_STRUCT, _UNION) and name:
                self.by_name.setdefault(name, []).append(len(self.types) - 1)

    def _member(self, data: bytes, pos: int, kind_flag: int) -> _Member:
        name_off, type_id, offset = _struct.unpack_from("<III", data, pos)
        bit_offset = offset & 0xFFFFFF if kind_flag else offset
        return _Member(self._str(name_off), type_id, bit_offset)

    def _str(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end].decode()

    def resolve(self, type_id: int) -> _Type | None:
        """Follow typedef/const/volatile chains to the underlying type."""
        seen = 0
        t = self.types[type_id]
        while t is not None and t.kind in _MODIFIERS and seen < 64:
            t, seen = self.types[t.ref], seen + 1
        return t

    def find_bits(self, t: _Type, member: str) -> int | None:
        """Bit offset of `member` in struct/union `t`, descending into anonymous members."""
        for m in t.members:
            if m.name == member:
                return m.bit_offset
            if not m.name:
                inner = self.resolve(m.type_id)
                if inner is not None and inner.kind in (_STRUCT, _UNION):
                    found = self.find_bits(inner, member)
                    if found is not None:
                        return m.bit_offset + found
        return None


@functools.cache
def _load(btf_path: str) -> _Btf:
    try:
        with open(btf_path, "rb") as f:
            data = f.read()
    except OSError as e:
        msg = f"cannot read BTF at {btf_path}: {e.strerror}; this kernel needs CONFIG_DEBUG_INFO_BTF"
        raise BtfError(msg) from e
    return _Btf(data)


def release_parsed() -> None:
    """Drop the parsed BTF (every kernel type as Python objects: ~35 MB for a 5 MB vmlinux BTF).
    Offsets already asked for stay cached; a later new question parses the file again."""
    _load.cache_clear()


@functools.cache
def member_offset(struct: str, member: str, btf_path: str = VMLINUX) -> int:
    """Byte offset of `member` in `struct <struct>` (or union) of the running kernel.

    Members of anonymous structs/unions are found as if they were direct members, as C sees them.
    Raises BtfError when the struct or member is absent, or the member is a bitfield.
    """
    btf = _load(btf_path)
    ids = btf.by_name.get(struct)
    if not ids:
        raise BtfError(f"struct {struct} is not in the kernel BTF at {btf_path}")
    for type_id in ids:
        t = btf.types[type_id]
        if t is None or not t.members:
            continue
        bits = btf.find_bits(t, member)
        if bits is not None:
            if bits % 8:
                raise BtfError(f"{struct}.{member} is a bitfield (bit offset {bits}); no byte offset")
            return bits // 8
    raise BtfError(f"struct {struct} has no member {member} in the kernel BTF at {btf_path}")
