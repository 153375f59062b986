"""Settings of the probe agent: one frozen dataclass, loaded by `weft.config.load_section`.

Defaults here, then the `agent:` section of the YAML file, then `WEFT_AGENT_*` variables, then
`weft agent` flags. Kafka connection and security settings are the shared `KafkaSettings`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from weft.config import ConfigError, run_dir


@dataclass(frozen=True)
class AgentSettings:
    node: str = field(default_factory=socket.gethostname)
    cgroups: tuple[str, ...] = ()          # cgroup v2 paths to trace; empty = every process
    pids: tuple[int, ...] = ()             # processes (and their children) to trace; empty = all
    capture: str = ""                      # write frames to this capture file instead of Kafka
    frame_max_events: int = 512            # a frame holds at most this many events
    frame_max_delay_ms: int = 100          # an event waits at most this long for its frame
    watermark_interval_ms: int = 200       # a watermark goes out at least this often
    poll_interval_ms: int = 20             # ring buffers are drained at least this often
    round_budget: int = 8192               # records read per probe per poll round (~0.1 s)
    ring_reader: str = "mmap"              # "mmap": read rings in batches from their mapping
                                           # (x86; else BCC); "bcc": BCC's per-record callback
    record_envelope: bool = True           # HTTP, connection and goroutine records leave as the
                                           # kernel wrote them (schema v2 frames); false: decoded
                                           # here into schema events (v1 frames, ~10x the CPU)
    compress_records: bool = True          # store those records as LZ4 blocks: ~4x smaller on
                                           # Kafka, in the spool and in capture files
    ring_pages: int = 1024                 # pages per ring buffer (power of two): 4 MiB, ~9k
                                           # HTTP records, ~90 ms of a 100k records/s burst
    spool_dir: str = ""                    # default: run_dir()/spool/<node>
    spool_max_bytes: int = 256 << 20       # above this, new frames are dropped (and counted)
    spool_segment_bytes: int = 4 << 20
    max_in_flight_frames: int = 256        # frames handed to librdkafka and not yet acknowledged
    stall_after_ms: int = 1000             # an unacknowledged frame this old means "broker away"
    metrics_port: int = 0                  # Prometheus endpoint; 0 = off
    metrics_addr: str = "127.0.0.1"
    health_stall_s: float = 10.0           # /healthz fails when no poll round ended for this long
    process_cache_size: int = 8192         # bounded /proc enrichment cache
    clock_refresh_s: float = 10.0          # ktime → Unix offset re-sampled this often
    map_fill_interval_s: float = 10.0      # BPF map fill gauges refreshed this often
    inject_headers: bool = False           # put a W3C traceparent on outgoing HTTP/1.x requests

    def validate(self) -> AgentSettings:
        if not self.node or any(c.isspace() for c in self.node):
            raise ConfigError(f"agent.node={self.node!r}: give a non-empty name without spaces")
        positive = ("frame_max_events", "frame_max_delay_ms", "watermark_interval_ms",
                    "poll_interval_ms", "round_budget", "spool_max_bytes", "spool_segment_bytes",
                    "max_in_flight_frames", "stall_after_ms", "process_cache_size")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"agent.{name}={getattr(self, name)}: must be >= 1")
        if self.ring_reader not in ("mmap", "bcc"):
            raise ConfigError(f"agent.ring_reader={self.ring_reader!r}: use 'mmap' or 'bcc'")
        if self.ring_pages < 1 or self.ring_pages & (self.ring_pages - 1):
            raise ConfigError(f"agent.ring_pages={self.ring_pages}: must be a power of two")
        if self.watermark_interval_ms > 200:
            raise ConfigError(f"agent.watermark_interval_ms={self.watermark_interval_ms}: "
                              "must be <= 200 (the stitcher relies on it)")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"agent.metrics_port={self.metrics_port}: must be 0 (off) or a TCP port")
        if self.clock_refresh_s <= 0 or self.map_fill_interval_s <= 0 or self.health_stall_s <= 0:
            raise ConfigError("agent.clock_refresh_s, agent.map_fill_interval_s and "
                              "agent.health_stall_s must be > 0")
        return self

    def spool_path(self) -> Path:
        return Path(self.spool_dir) if self.spool_dir else run_dir() / "spool" / self.node
