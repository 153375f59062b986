"""Deterministic IDs: functions of the events only, so a replay gives the same bytes."""

from __future__ import annotations

from hashlib import blake2b

_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def _span_hash(node: str, pid: int, sock_cookie: int, role: int, start_ns: int) -> blake2b:
    """What names one request side: where it ran, on which socket, when it started."""
    return blake2b(f"{node}|{pid}|{sock_cookie}|{role}|{start_ns}".encode(), digest_size=8)


def span_id(node: str, pid: int, sock_cookie: int, role: int, start_ns: int) -> bytes:
    """8 bytes naming one request side (see `_span_hash`)."""
    return _span_hash(node, pid, sock_cookie, role, start_ns).digest()


def span_id_hex(node: str, pid: int, sock_cookie: int, role: int, start_ns: int) -> str:
    """`span_id(...).hex()` in one step (the engine keys its state by the hex form)."""
    return _span_hash(node, pid, sock_cookie, role, start_ns).hexdigest()


def root_trace_id(root_span_id: bytes) -> bytes:
    """16 bytes naming the trace that a root span starts."""
    return blake2b(b"weft-trace|" + root_span_id, digest_size=16).digest()


def parse_traceparent(value: str) -> tuple[str, str] | None:
    """(trace id hex, parent span id hex) of a valid W3C traceparent, else None."""
    parts = value.strip().lower().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    trace, span = parts[1], parts[2]
    if len(trace) != 32 or len(span) != 16 or trace == _ZERO_TRACE or span == _ZERO_SPAN:
        return None
    try:
        int(parts[0], 16), int(trace, 16), int(span, 16)
    except ValueError:
        return None
    return trace, span


def traceparent_sampled(value: str) -> bool | None:
    """The sampled flag of a traceparent (its flags' lowest bit); None when the flags are not two
    lower-case hex digits, as the agent's kernel side reads them (bpf/inject.h)."""
    parts = value.strip().split("-")
    flags = parts[3] if len(parts) >= 4 else ""
    if len(flags) != 2 or not all(c in "0123456789abcdef" for c in flags):
        return None
    return bool(int(flags, 16) & 1)
