"""Where frames go: Kafka (with an on-disk spool for outages) or a capture file.

KafkaSink keeps one node's frames in order. Frames go straight to librdkafka while the broker
acknowledges them; `message.timeout.ms=0` makes librdkafka hold (never fail) what it has, and at
most `max_in_flight` frames are left with it (more overflow to the spool). When the oldest
unacknowledged frame is older than `stall_after_ms`, or librdkafka refuses a frame, the sink
switches to spooling: every new frame is appended to the spool. Frames already in flight stay
ahead of the spooled ones and are delivered first when the broker is back; only then is the
spool drained (oldest first, acknowledged record by record), and only when it is empty do frames
go straight out again.
At close, frames librdkafka still holds are put in front of the spool, so a restart sends them.
Delivery is at least once: a frame that reached the broker while its acknowledgement was lost is
sent again; (node, agent_instance, seq) names it for consumers that deduplicate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from confluent_kafka import KafkaError, Producer

from probe_agent.metrics import AgentMetrics
from probe_agent.spool import Spool, SpoolPos, SpoolWriteError
from schemas import weft_events_pb2 as pb
from schemas.codec import RAW_SCHEMA_VERSION, CaptureWriter, encode_frame
from weft.config import KafkaSettings
from weft.logs import librdkafka_logger

logger = logging.getLogger(__name__)


class FrameSink(Protocol):
    failure: str    # why the sink can take no more frames, in one sentence; "" while it can

    def send(self, frame: pb.Frame) -> None:
        """Take one frame; never raises for a delivery problem (those are counted)."""
        ...

    def poll(self) -> None:
        """Serve callbacks and background work; called by the runner's loop."""
        ...

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver or persist what is pending, then release resources."""
        ...


class CaptureSink:
    """Frames to a capture file. When the disk refuses a write (full, I/O error) the file is cut
    back to its last whole flushed frame, later frames are dropped and counted, and `failure`
    tells the runner to stop: a capture that goes on writing nothing helps nobody."""

    def __init__(self, path: str | Path, node: str, metrics: AgentMetrics) -> None:
        self._writer = CaptureWriter(path, node=node, producer="weft-agent 0.1.0",
                                     schema_version=RAW_SCHEMA_VERSION)
        self._metrics = metrics
        self._writer.flush()          # the header: a file cut back after a failure keeps it
        self._whole = (self._writer.tell(), 0)   # (bytes, frames) as of the last good flush
        self.failure = ""

    def send(self, frame: pb.Frame) -> None:
        if self.failure:
            self._metrics.drop("capture_write_error")
            return
        try:
            self._writer.write(frame)
        except OSError as exc:
            self._fail(exc)
            return
        self._metrics.frames.inc()
        self._metrics.frames_delivered.inc()

    def poll(self) -> None:
        if self.failure:
            return
        try:
            self._writer.flush()
        except OSError as exc:
            self._fail(exc)
            return
        self._whole = (self._writer.tell(), self._writer.frames)

    def close(self, timeout_s: float = 5.0) -> None:
        self.poll()
        self._writer.close(discard=bool(self.failure))

    def _fail(self, exc: OSError) -> None:
        size, frames = self._whole
        lost = self._writer.frames - frames
        self._metrics.drop("capture_write_error", lost)
        self._writer.close(discard=True)
        with contextlib.suppress(OSError):
            os.truncate(self._writer.path, size)
        self.failure = (f"cannot write capture file {self._writer.path}: {exc.strerror or exc}; it keeps "
                        f"the {frames} frames written before, whole ({lost} lost)")
        logger.error(self.failure)


@dataclass
class _InFlight:
    payload: bytes
    spool_pos: SpoolPos | None  # set when the frame came from the spool
    sent_at: float


def producer_config(settings: KafkaSettings) -> dict[str, Any]:
    conf: dict[str, Any] = dict(settings.confluent())
    conf.update({
        "enable.idempotence": True,       # no duplicates or reordering from librdkafka's retries
        "acks": "all",
        "message.timeout.ms": 0,          # hold frames while the broker is away; we bound them
        "linger.ms": 5,
        # raw kernel records are fixed-size with zero-filled text fields: lz4 shrinks them
        # several-fold for little CPU (librdkafka compresses in its own thread, in C)
        "compression.type": "lz4",
        "queue.buffering.max.kbytes": 256 * 1024,
        "client.id": "weft-agent",
        "logger": librdkafka_logger(),    # served by poll(), thinned, not printed raw on stderr
    })
    return conf


class KafkaSink:
    failure = ""    # never: what Kafka does not take goes to the spool, or is dropped and counted

    def __init__(self, settings: KafkaSettings, node: str, spool: Spool, metrics: AgentMetrics, *,
                 max_in_flight: int = 256, stall_after_ms: int = 1000) -> None:
        self._topic = settings.raw_topic
        self._bootstrap = settings.bootstrap
        self._key = node.encode()
        self._spool = spool
        self._metrics = metrics
        self._max_in_flight = max_in_flight
        self._stall_s = stall_after_ms / 1000
        self._conf = producer_config(settings)
        self._conf["error_cb"] = self._on_error
        self._producer = Producer(self._conf)
        self._fatal = False
        self._in_flight: OrderedDict[int, _InFlight] = OrderedDict()
        self._direct_in_flight = 0
        self._token = 0
        self._spooling = False
        self._rewind_needed = False
        self._last_error_log = 0.0
        self.spooled_frames = 0
        if not spool.empty:
            logger.info("spool %s holds %d frames from an earlier run: sending them first",
                        spool.dir, spool.frames)

    @property
    def spooling(self) -> bool:
        return self._spooling

    @property
    def spool(self) -> Spool:
        return self._spool

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- FrameSink ------------------------------------------------------------------------

    def send(self, frame: pb.Frame) -> None:
        payload = encode_frame(frame)
        self._metrics.frames.inc()
        # A full window only overflows to the spool (drained as acknowledgements come back);
        # "spooling" means the broker is away, which only a stall or a refusal shows.
        if (not self._spooling and self._spool.empty and len(self._in_flight) < self._max_in_flight
                and self._produce(payload, None)):
            self._producer.poll(0)
            return
        self._to_spool(payload)
        self._producer.poll(0)

    def poll(self) -> None:
        self._producer.poll(0)
        if self._fatal:
            self._restart_producer()
        if self._stalled():
            self._enter_spooling(f"no acknowledgement for {self._stall_s:.1f} s")
        elif self._spooling or not self._spool.empty:
            self._drain()
        self._metrics.spool_bytes.set(self._spool.size_bytes)
        self._metrics.spool_frames.set(self._spool.frames)

    def close(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while (self._in_flight or not self._spool.empty) and time.monotonic() < deadline:
            self.poll()
            self._producer.flush(0.05)
        self._producer.poll(0)
        self._keep_unacknowledged()
        if not self._spool.empty:
            logger.warning("%d frames (%d bytes) wait in %s for the next start", self._spool.frames,
                           self._spool.size_bytes, self._spool.dir)
        self._metrics.spool_bytes.set(self._spool.size_bytes)
        self._metrics.spool_frames.set(self._spool.frames)
        self._spool.close()

    # -- internals ------------------------------------------------------------------------

    def _keep_unacknowledged(self) -> None:
        """Give up on what librdkafka holds: frames sent straight are older than anything in
        the spool, so they go in front of it; frames from the spool are still in it (not
        acknowledged), to be read again."""
        direct = [f.payload for f in self._in_flight.values() if f.spool_pos is None]
        if direct:
            try:
                self._spool.prepend(direct)
                logger.warning("Kafka did not acknowledge %d frames: kept in %s", len(direct),
                               self._spool.dir)
            except SpoolWriteError as exc:
                self._metrics.drop("spool_write_error", len(direct))
                logger.error("Kafka did not acknowledge %d frames, and %s: they are lost", len(direct), exc)
        if self._in_flight:
            self._in_flight.clear()
            self._direct_in_flight = 0
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.poll(0)  # their callbacks find nothing in _in_flight: ignored
        self._spool.rewind()
        self._rewind_needed = False

    def _restart_producer(self) -> None:
        """An idempotent producer that hit a fatal error produces nothing more: replace it."""
        logger.error("replacing the Kafka producer after a fatal error")
        self._keep_unacknowledged()
        self._spooling = True
        self._fatal = False
        self._producer = Producer(self._conf)

    def _stalled(self) -> bool:
        if not self._in_flight:
            return False
        oldest = next(iter(self._in_flight.values()))
        return time.monotonic() - oldest.sent_at > self._stall_s

    def _enter_spooling(self, why: str) -> None:
        if not self._spooling:
            logger.warning("Kafka at %s is not keeping up (%s): spooling frames to %s",
                           self._bootstrap, why, self._spool.dir)
            self._spooling = True

    def _to_spool(self, payload: bytes) -> None:
        if self._spool.append(payload):
            self.spooled_frames += 1
        elif self._spool.refused == "full":
            self._metrics.drop("spool_full")
            self._log_error(f"spool {self._spool.dir} is full ({self._spool.max_bytes} bytes): "
                            f"{self._spool.dropped_frames} frames dropped so far")
        else:
            self._metrics.drop("spool_write_error")
            self._log_error(f"spool: {self._spool.refused}: {self._spool.dropped_frames} frames dropped "
                            "so far")

    def _produce(self, payload: bytes, pos: SpoolPos | None) -> bool:
        token = self._token
        self._token += 1
        try:
            self._producer.produce(self._topic, value=payload, key=self._key,
                                   on_delivery=lambda err, msg: self._on_delivery(token, err))
        except BufferError:
            self._enter_spooling("librdkafka queue full")
            return False
        except Exception as exc:  # KafkaException: e.g. the producer hit a fatal error
            self._metrics.produce_errors.inc()
            self._enter_spooling(f"produce failed: {exc}")
            return False
        self._in_flight[token] = _InFlight(payload, pos, time.monotonic())
        if pos is None:
            self._direct_in_flight += 1
        return True

    def _drain(self) -> None:
        if self._direct_in_flight:
            return  # frames older than the spool are still on their way
        if self._rewind_needed:
            if self._in_flight:
                return
            self._spool.rewind()
            self._rewind_needed = False
        room = self._max_in_flight - len(self._in_flight)  # poll() drains only when not stalled
        for payload, pos in self._spool.read(room) if room > 0 else []:
            if not self._produce(payload, pos):
                self._rewind_needed = True
                break
        if self._spool.empty and not self._in_flight and self._spooling:
            logger.warning("Kafka is back: spool drained, sending directly again")
            self._spooling = False

    def _on_delivery(self, token: int, err: KafkaError | None) -> None:
        entry = self._in_flight.pop(token, None)
        if entry is None:
            return  # purged at close
        if entry.spool_pos is None:
            self._direct_in_flight -= 1
        if err is None:
            self._metrics.frames_delivered.inc()
            if entry.spool_pos is not None and not self._rewind_needed:
                self._spool.commit(entry.spool_pos)
            return
        self._metrics.produce_errors.inc()
        self._log_error(f"delivery failed: {err}")
        if err.retriable() or err.code() in (KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT):
            if entry.spool_pos is not None:
                self._rewind_needed = True
            else:
                self._enter_spooling(str(err))
                self._to_spool(entry.payload)
        else:
            self._metrics.drop(f"kafka_{err.name().lower()}")
            if entry.spool_pos is not None and not self._rewind_needed:
                self._spool.commit(entry.spool_pos)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._metrics.produce_errors.inc()
            logger.error("Kafka producer hit a fatal error: %s", err)
            self._fatal = True  # replaced in the next poll(), outside librdkafka's callback
            return
        self._log_error(str(err))

    def _log_error(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last_error_log > 10:
            self._last_error_log = now
            logger.warning("Kafka: %s", text)
