"""Batch one node's events into frames, and emit the node's watermark.

A frame closes when it holds `max_events` events, when its oldest event has waited
`max_delay_ms`, or when a watermark is due. A watermark is due `watermark_interval_ms` after the
previous one, even when no event arrived (an idle node must still let the stitcher move on).

Watermark meaning: the runner passes the Unix time it sampled *before* draining every ring
buffer, so "watermark T" says every record the kernel emitted before T is in this frame or an
earlier one. (An HTTP request is emitted when it completes, so its start may be earlier than T.)
Watermarks never go backwards, even when the clock offset is re-sampled.

Size is counted in records: a RawRecords event (kernel records passed through, schema v2)
weighs as many records as it holds, and makes its frame a v2 frame. The runner keeps each
one below `max_events` records.

Time is passed in explicitly (`now_ns`, monotonic) so tests drive it; nothing here reads a clock.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from schemas import weft_events_pb2 as pb
from schemas.codec import RAW_SCHEMA_VERSION, SCHEMA_VERSION, event_time_ns


class Framer:
    def __init__(self, node: str, *, max_events: int = 512, max_delay_ms: int = 100,
                 watermark_interval_ms: int = 200, agent_instance: int | None = None) -> None:
        if max_events < 2:
            raise ValueError("max_events must be >= 2 (a frame must fit an event and a watermark)")
        self.node = node
        self.agent_instance = (agent_instance if agent_instance is not None
                               else random.getrandbits(63) | 1)
        self._max_events = max_events
        self._max_delay_ns = max_delay_ms * 1_000_000
        self._wm_interval_ns = watermark_interval_ms * 1_000_000
        self._pending: list[pb.Event] = []
        self._times: list[int] = []            # (earliest) event time of each pending event
        self._t_max: list[int] = []            # latest event time of each pending event
        self._weights: list[int] = []          # records in each pending event
        self._weight = 0                       # their sum
        self._raw_pending = 0                  # pending RawRecords events
        self._oldest_at: int | None = None     # now_ns when the oldest pending event arrived
        self._last_wm_at: int | None = None    # now_ns of the previous watermark
        self._last_wm_ts = 0
        self._seq = 0
        self.events_framed = 0

    @property
    def next_seq(self) -> int:
        return self._seq

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, events: Sequence[pb.Event], now_ns: int, times: Sequence[int] | None = None,
            *, t_max: Sequence[int] | None = None, weights: Sequence[int] | None = None
            ) -> list[pb.Frame]:
        """Queue events (with their event times when the caller already knows them; see
        schemas.codec.event_time_ns); returns the frames that filled up. A RawRecords event
        comes with the time range of its records (`times`, `t_max`) and their count (`weights`)."""
        if not events:
            return []
        if times is None:
            times = [event_time_ns(e) for e in events]
        if not self._pending:
            self._oldest_at = now_ns
        self._pending.extend(events)
        self._times.extend(times)
        self._t_max.extend(times if t_max is None else t_max)
        if weights is None:
            self._weights.extend([1] * len(events))
            self._weight += len(events)
        else:
            self._weights.extend(weights)
            self._weight += sum(weights)
            self._raw_pending += sum(1 for e in events if e.HasField("raw"))
        out: list[pb.Frame] = []
        while self._weight >= self._max_events:
            out.append(self._close(self._full_prefix()))
            if self._pending:
                self._oldest_at = now_ns
        return out

    def _full_prefix(self) -> int:
        """How many pending events make a full frame (at least one)."""
        total = 0
        for i, w in enumerate(self._weights):
            total += w
            if total > self._max_events:
                return max(1, i)
        return len(self._weights)

    def tick(self, now_ns: int, watermark_ts_ns: int) -> list[pb.Frame]:
        """Close frames that waited long enough; add a watermark when one is due."""
        if self._last_wm_at is None:
            self._last_wm_at = now_ns  # the first watermark is due one interval after start
        if now_ns - self._last_wm_at >= self._wm_interval_ns:
            return self._with_watermark(now_ns, watermark_ts_ns)
        if self._oldest_at is not None and now_ns - self._oldest_at >= self._max_delay_ns:
            return [self._close()]
        return []

    def flush(self, now_ns: int, watermark_ts_ns: int) -> list[pb.Frame]:
        """Everything pending, closed by a final watermark (used at shutdown)."""
        return self._with_watermark(now_ns, watermark_ts_ns)

    def _with_watermark(self, now_ns: int, watermark_ts_ns: int) -> list[pb.Frame]:
        out: list[pb.Frame] = []
        if self._weight >= self._max_events:
            out.append(self._close(self._full_prefix()))
        self._last_wm_ts = max(self._last_wm_ts, watermark_ts_ns)
        self._pending.append(pb.Event(watermark=pb.Watermark(ts_ns=self._last_wm_ts)))
        self._times.append(self._last_wm_ts)
        self._t_max.append(self._last_wm_ts)
        self._weights.append(1)
        self._weight += 1
        self._last_wm_at = now_ns
        out.append(self._close())
        return out

    def _close(self, count: int | None = None) -> pb.Frame:
        """A frame of the first `count` pending events (all by default)."""
        n = len(self._pending) if count is None else count
        events, times, t_max = self._pending[:n], self._times[:n], self._t_max[:n]
        weight = sum(self._weights[:n])
        raw = sum(1 for e in events if e.HasField("raw")) if self._raw_pending else 0
        del self._pending[:n], self._times[:n], self._t_max[:n], self._weights[:n]
        self._weight -= weight
        self._raw_pending -= raw
        frame = pb.Frame(schema_version=RAW_SCHEMA_VERSION if raw else SCHEMA_VERSION,
                         node=self.node, agent_instance=self.agent_instance, seq=self._seq)
        frame.events.extend(events)
        if times:
            frame.t_min_ns, frame.t_max_ns = min(times), max(t_max)
        self.events_framed += weight
        self._seq += 1
        if not self._pending:
            self._oldest_at = None
        return frame
