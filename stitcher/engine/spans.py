"""How a decided request becomes an OpenTelemetry span: the HTTP semantic conventions' name,
kind, attributes and status, and the resource of the process that served or sent it.

The engine (core.py) decides parents and traces; it hands each finished request here with
those decisions, and nothing here reads state.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from functools import lru_cache

from stitcher.engine.model import AttrValue, Resource, Span
from stitcher.engine.records import ROLE_CLIENT, ROLE_SERVER, Http, n20, parse_proc_record

# The methods of RFC 9110 and RFC 5789 (PATCH), the OpenTelemetry HTTP conventions' known set;
# any other method is exported as _OTHER, the token itself in http.request.method_original.
KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})

# error.type of a request that got no response: the connection closed first (the client gave
# up, the server closed without answering, a reset); the span ends at the close.
NO_RESPONSE_ERROR = "no_response"

# How a span left its parent's trace (the engine's decision), or "" when it did not.
SPLIT = "split"   # deeper or later than the trace bounds: a new trace, weft.split_from names the parent
CUT = "cut"       # in a parent cycle (malformed input), cut loose at flush: weft.unresolved


def process_resource(ev: Http, proc: Mapping[str, str]) -> Resource:
    """The process as it was when the request started (ProcessInfo again after exec)."""
    if not proc:
        return Resource("unknown_service", ev.node, ev.pid, "")
    stamp = n20(ev.start)
    before = [k for k in proc if k <= stamp]
    chosen = max(before) if before else min(proc)
    rec = parse_proc_record(proc[chosen])
    return Resource(rec.service or rec.exe or "unknown_service", ev.node, ev.pid, rec.exe, rec.attrs)


def http_span(sid: str, ev: Http, trace: str, parent: str, link: str, flag: str, detached: str,
              remote_sampled: bool | None, resource: Resource) -> Span:
    """The span of request `ev` (ids hex): `link` how its parent was found, `flag` a weft.*
    flag of that decision or "", `detached` SPLIT / CUT / "", `remote_sampled` the sampled
    flag of the traceparent its trace came in with (None: it came in with none)."""
    # runs once per span: fields are unpacked once, the attributes built as one tuple
    (_, role, _, _, _, start, end, _, laddr, lport, raddr, rport, _, _, method, path, host, _, _,
     status, version) = ev
    remote_ip = _ip(raddr)
    authority = host    # the Host header as sent: host[:port]
    if host:
        host = host[1:host.find("]")] if host[0] == "[" else host.rsplit(":", 1)[0]
    if method in KNOWN_METHODS:
        name = f"{method} {path}"
    else:   # the conventions' _OTHER: a method token anyone can invent must not name spans
        name = f"HTTP {path}" if method else "HTTP"
        method = "_OTHER"
    head: tuple[tuple[str, AttrValue], ...] = (
        (("http.request.method", method), ("url.path", path), ("http.response.status_code", status))
        if status else (("http.request.method", method), ("url.path", path)))
    # Weft reads plain-text HTTP/1.x only: the scheme is always http.
    if role == ROLE_SERVER:
        attrs = (*head, ("url.scheme", "http"), ("server.address", host or _ip(laddr)),
                 ("server.port", lport), ("client.address", remote_ip), ("client.port", rport),
                 ("network.peer.address", remote_ip), ("network.peer.port", rport), ("weft.link", link))
    else:
        if not authority:
            bracketed = f"[{remote_ip}]" if ":" in remote_ip else remote_ip
            authority = bracketed if rport == 80 else f"{bracketed}:{rport}"
        attrs = (*head, ("url.full", f"http://{authority}{path}"), ("server.address", host or remote_ip),
                 ("server.port", rport), ("network.peer.address", remote_ip), ("network.peer.port", rport),
                 ("weft.link", link))
    if version:
        attrs += (("network.protocol.version", version),)
    if method == "_OTHER" and ev.method:
        attrs += (("http.request.method_original", ev.method),)
    if flag:
        attrs += ((f"weft.{flag}", True),)
    failed = _failed(role, status)
    if not status:   # no status line before the connection closed (HttpRequest NO_RESPONSE)
        attrs += (("error.type", NO_RESPONSE_ERROR),)
    elif failed:   # the conventions' error.type for a failing status: the code
        attrs += (("error.type", str(status)),)
    if detached == SPLIT:
        attrs += (("weft.split_from", parent),)
        parent = ""
    elif detached == CUT:
        attrs += (("weft.unresolved", True),)
        parent = ""
    return _new_tuple(Span, (bytes.fromhex(trace), bytes.fromhex(sid),
                             bytes.fromhex(parent) if parent else b"",
                             "SERVER" if role == ROLE_SERVER else "CLIENT", name, start, end, attrs, resource,
                             failed, remote_sampled))


def _failed(role: int, status: int) -> bool:
    """The span's status is Error (OTel HTTP conventions): 5xx; 4xx on the client side, where
    the call failed (a server answering 4xx did its job); no response at all."""
    return status >= 500 or not status or (status >= 400 and role == ROLE_CLIENT)


@lru_cache(maxsize=65536)
def _ip(hex_addr: str) -> str:
    try:
        return str(ipaddress.ip_address(bytes.fromhex(hex_addr)))
    except ValueError:
        return hex_addr


_new_tuple = tuple.__new__   # a NamedTuple from its values, without the keyword-handling __new__
