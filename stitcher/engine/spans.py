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
    (_, role, _, _, _, start, end, _, laddr, lport, raddr, rport, _, _, method, target, host, _, _,
     status, version) = ev
    remote_ip = _ip(raddr)
    authority = host    # the Host header as sent: host[:port]
    scheme, path, full = "http", target, ""    # Weft reads plain-text HTTP/1.x
    server_port = lport if role == ROLE_SERVER else rport
    named = _named_server(method, target) if target[:1] != "/" else None
    if named:   # a forward proxy's absolute URL or CONNECT's authority names the server
        scheme, authority, path, full, server_port = named
    if authority:
        host = _host_port(authority)[0]
    if method in KNOWN_METHODS:
        name = f"{method} {path}" if path else method
    else:   # the conventions' _OTHER: a method token anyone can invent must not name spans
        name = f"HTTP {path}" if method and path else "HTTP"
        method = "_OTHER"
    head: tuple[tuple[str, AttrValue], ...] = (("http.request.method", method),)
    if path:    # none for CONNECT, whose target is an authority
        head += (("url.path", path),)
    if status:
        head += (("http.response.status_code", status),)
    if role == ROLE_SERVER:
        attrs = (*head, ("url.scheme", scheme), ("server.address", host or _ip(laddr)),
                 ("server.port", server_port), ("client.address", remote_ip), ("client.port", rport),
                 ("network.peer.address", remote_ip), ("network.peer.port", rport), ("weft.link", link))
    else:
        if not authority:
            bracketed = f"[{remote_ip}]" if ":" in remote_ip else remote_ip
            authority = bracketed if rport == 80 else f"{bracketed}:{rport}"
        if path and not full:
            full = f"http://{authority}{path}"
        url = (("url.full", full),) if full else ()
        attrs = (*head, *url, ("server.address", host or remote_ip), ("server.port", server_port),
                 ("network.peer.address", remote_ip), ("network.peer.port", rport), ("weft.link", link))
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


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _named_server(method: str, target: str) -> tuple[str, str, str, str, int] | None:
    """(scheme, authority, path, url, port) of a request target that names the server it asks
    for (RFC 9112 3.2): the absolute form a client sends to a forward proxy
    ("http://shop:8080/cart": path "/cart", the URL as sent) or CONNECT's authority form
    ("shop:443": no path, no URL). None for anything else, which is kept as the path as sent
    ("*" of OPTIONS, a malformed target)."""
    if method == "CONNECT":
        return "http", target, "", "", _host_port(target)[1]
    scheme, sep, rest = target.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        return None
    authority, slash, path = rest.partition("/")
    return scheme, authority, slash + path or "/", target, _host_port(authority)[1] or _DEFAULT_PORTS[scheme]


@lru_cache(maxsize=4096)
def _host_port(authority: str) -> tuple[str, int]:
    """host and port (0: none given) of "host[:port]" or "[v6][:port]"."""
    if authority[:1] == "[":
        host, _, port = authority[1:].partition("]")
        port = port[1:]
    else:
        host, _, port = authority.rpartition(":") if ":" in authority else (authority, "", "")
    return host, int(port) if port.isdigit() else 0


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
