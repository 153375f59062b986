"""EngineConfig: the join engine's time bounds (seconds in config, nanoseconds inside), link rules
and the routes whose traces are left out."""

from __future__ import annotations

from dataclasses import dataclass

from stitcher.engine.paths import pattern_error, split_list
from weft.config import ConfigError

_NS = 1_000_000_000


@dataclass(frozen=True)
class EngineConfig:
    max_request_s: float = 10.0        # longest request a client call can sit inside
    in_process_wait_s: float = 0.5     # a client's parent is first looked for at C.end + this
    early_roots: bool = True           # calls from threads that never served are roots then too
    skew_s: float = 0.5                # clock-skew bound between nodes (tuple fallback)
    link_wait_s: float = -1.0          # how long past S.end a server waits for its client; <0: skew_s
    seq_window_s: float = -1.0         # |C.start - S.start| allowed for a seq match; <0: skew_s
    node_timeout_s: float = 30.0       # a node whose watermark lags the newest by this is not waited for
    max_trace_depth: int = 64          # deeper spans start a new trace
    max_trace_duration_s: float = 600.0  # spans starting this long after their root start a new trace
    due_bucket_s: float = 0.1          # granularity of the decision schedule
    max_lineage_depth: int = 16        # thread / goroutine ancestors looked at
    link_by_seq: bool = True           # cross-node: (tuple, TCP seq) match; off: header/tuple only
    link_by_tuple: bool = True         # cross-node: (tuple, time) fallback; off: never
    # route patterns (stitcher.engine.paths; YAML list or comma-separated) of requests whose
    # traces are not exported when such a request is the first of its trace (health checks)
    ignore_routes: str | list[str] = ""

    def describe_ignored(self) -> str:
        """One line for the log, "" when no route is ignored."""
        routes = split_list(self.ignore_routes)
        return f"traces that begin at {', '.join(routes)} are not exported" if routes else ""

    def validate(self) -> EngineConfig:
        for name in ("max_request_s", "in_process_wait_s", "skew_s", "node_timeout_s", "max_trace_duration_s",
                     "due_bucket_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"engine.{name}={getattr(self, name)}: must be > 0")
        if self.max_trace_depth < 1 or self.max_lineage_depth < 1:
            raise ConfigError("engine.max_trace_depth and engine.max_lineage_depth must be >= 1")
        for pattern in split_list(self.ignore_routes):
            error = pattern_error(pattern)
            if error:
                raise ConfigError(f"engine.ignore_routes: {error}")
        return self

    @property
    def max_request_ns(self) -> int:
        return int(self.max_request_s * _NS)

    @property
    def in_process_wait_ns(self) -> int:
        return int(self.in_process_wait_s * _NS)

    @property
    def skew_ns(self) -> int:
        return int(self.skew_s * _NS)

    @property
    def link_wait_ns(self) -> int:
        return int((self.skew_s if self.link_wait_s < 0 else self.link_wait_s) * _NS)

    @property
    def seq_window_ns(self) -> int:
        return int((self.skew_s if self.seq_window_s < 0 else self.seq_window_s) * _NS)

    @property
    def node_timeout_ns(self) -> int:
        return int(self.node_timeout_s * _NS)

    @property
    def max_trace_duration_ns(self) -> int:
        return int(self.max_trace_duration_s * _NS)

    @property
    def due_bucket_ns(self) -> int:
        return int(self.due_bucket_s * _NS)
