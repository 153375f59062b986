"""A minimal loader for probe tests: compile a probe with BCC, attach, poll its rings in a thread.

Deliberately tiny (the real runner is probe_agent/runner.py); it follows the Probe contract in
probe_agent/probes/base.py so the probes are tested exactly as the runner drives them.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from probe_agent.probes.base import Probe, ProbeContext, read_stats
from schemas import weft_events_pb2 as pb


def ktime_offset_ns() -> int:
    """Unix ns minus CLOCK_MONOTONIC ns (what bpf_ktime_get_ns counts)."""
    return time.time_ns() - time.monotonic_ns()


class LoadedProbe:
    def __init__(self, probe: Probe, ctx: ProbeContext) -> None:
        from bcc import BPF

        self.probe, self.ctx = probe, ctx
        self.bpf: Any = BPF(src_file=str(probe.source).encode(), cflags=probe.cflags(ctx))
        probe.attach(self.bpf, ctx)
        probe.configure(self.bpf, ctx)
        self.events: list[pb.Event] = []
        self.records = 0
        self._lock = threading.Lock()
        for ring in probe.rings:
            self.bpf[ring.map_name.encode()].open_ring_buffer(self._callback(ring.decode))
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _callback(self, decode: Callable[[bytes, int], list[pb.Event]]) -> Callable[[Any, Any, int], int]:
        def cb(_ctx: Any, data: Any, size: int) -> int:
            events = decode(ctypes.string_at(data, size), self.ctx.ktime_offset_ns)
            with self._lock:
                self.records += 1
                self.events.extend(events)
            return 0

        return cb

    def _poll(self) -> None:
        while not self._stop.is_set():
            if self._paused.is_set():
                time.sleep(0.01)
                continue
            self.bpf.ring_buffer_poll(50)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop reading the rings for the block (as a starved agent would): they fill."""
        self._paused.set()
        time.sleep(0.2)  # let a poll in progress return
        try:
            yield
        finally:
            self._paused.clear()

    def snapshot(self) -> list[pb.Event]:
        with self._lock:
            return list(self.events)

    def wait_for(self, pred: Callable[[list[pb.Event]], bool], timeout: float = 10.0) -> list[pb.Event]:
        """Poll (no fixed sleeps) until pred(events) holds; return the events then."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.snapshot()
            if pred(events):
                return events
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met in {timeout}s; {len(events)} events seen")
            time.sleep(0.02)

    def stats(self) -> dict[str, int]:
        return read_stats(self.bpf, self.probe)

    def clear(self) -> None:
        with self._lock:
            self.events.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.probe.detach(self.bpf)
        self.bpf.cleanup()


@contextmanager
def loaded(probe: Probe, **ctx_fields: Any) -> Iterator[LoadedProbe]:
    ctx = ProbeContext(self_pid=os.getpid(), ktime_offset_ns=ktime_offset_ns(), **ctx_fields)
    lp = LoadedProbe(probe, ctx)
    try:
        yield lp
    finally:
        lp.close()
