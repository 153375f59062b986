"""Builders for raw events (pb.Event), shared by `weft simulate` and the engine tests."""

from __future__ import annotations

import ipaddress

from schemas import weft_events_pb2 as pb
from schemas.codec import wrap
from stitcher.engine.records import HTTP_VERSIONS

Endpoint = tuple[str, int]


def _addr(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def tuple_of(local: Endpoint, remote: Endpoint) -> pb.Tuple:
    return pb.Tuple(local_addr=_addr(local[0]), local_port=local[1],
                    remote_addr=_addr(remote[0]), remote_port=remote[1])


def http(role: str, *, pid: int, tid: int, start: int, end: int, cookie: int,
         local: Endpoint, remote: Endpoint, seq: int | None = None, method: str = "GET",
         path: str = "/", host: str = "", traceparent: str = "", injected: str = "",
         status: int = 200, goid: int = 0, version: str = "") -> pb.Event:
    return wrap(pb.HttpRequest(
        role=pb.ROLE_SERVER if role == "server" else pb.ROLE_CLIENT, start_ns=start, end_ns=end,
        pid=pid, tid=tid, goid=goid, sock_cookie=cookie, tuple=tuple_of(local, remote),
        tcp_seq=seq or 0, has_seq=seq is not None, method=method, path=path, host=host,
        traceparent=traceparent, status=status, injected_traceparent=injected,
        flags=_VERSION_FLAG[version]))


# the request line's version as the agent flags it ("": not known)
_VERSION_FLAG = {"": 0, **{version: flag for flag, version in HTTP_VERSIONS.items()}}


def lost_http(role: str, *, pid: int, tid: int, start: int, end: int, cookie: int,
              local: Endpoint, remote: Endpoint, seq: int | None = None, goid: int = 0) -> pb.Event:
    """A request the agent could not capture: what the kernel still passed on (pb.LostRequest)."""
    return wrap(pb.LostRequest(
        role=pb.ROLE_SERVER if role == "server" else pb.ROLE_CLIENT, start_ns=start, end_ns=end,
        pid=pid, tid=tid, goid=goid, sock_cookie=cookie, tuple=tuple_of(local, remote),
        tcp_seq=seq or 0, has_seq=seq is not None))


def blind(ts: int, until: int, records: int = 1) -> pb.Event:
    """The node lost `records` records between ts and until without a marker (pb.BlindSpan)."""
    return wrap(pb.BlindSpan(ts_ns=ts, until_ns=until, records=records))


def process(pid: int, service: str, exe: str, ts: int, runtime: str = "",
            attrs: dict[str, str] | None = None) -> pb.Event:
    return wrap(pb.ProcessInfo(ts_ns=ts, pid=pid, exe=exe, service_name=service, start_ns=ts,
                               runtime=runtime, resource_attributes=attrs))


def thread_spawn(pid: int, parent_tid: int, child_tid: int, ts: int) -> pb.Event:
    return wrap(pb.ThreadSpawn(ts_ns=ts, parent_pid=pid, parent_tid=parent_tid, child_pid=pid,
                               child_tid=child_tid))


def task_exit(pid: int, tid: int, ts: int) -> pb.Event:
    return wrap(pb.TaskExit(ts_ns=ts, pid=pid, tid=tid))


def goroutine_spawn(pid: int, parent_goid: int, child_goid: int, ts: int, tid: int = 0) -> pb.Event:
    return wrap(pb.GoroutineSpawn(ts_ns=ts, pid=pid, tid=tid, parent_goid=parent_goid,
                                  child_goid=child_goid))


def watermark(ts: int) -> pb.Event:
    return wrap(pb.Watermark(ts_ns=ts))
