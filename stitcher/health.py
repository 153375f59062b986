"""A stitcher worker's answers to /healthz and /readyz (served by weft/health.py).

Live: while Faust starts; then while the worker's event loop runs (a Faust timer beats every
second) and, when messages wait on its partitions, it joins them: a worker that is behind and
has not finished a batch for `stitch.health_stall_s` is stuck (a Faust consumer thread that
died, a store that never answers), and a restart hands its partitions to a worker that reads
them. Ready: live, and in the consumer group (partitions were assigned at least once).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from stitcher.consumer_lag import ConsumerLag


class _Progress(Protocol):
    @property
    def last_batch_at(self) -> float: ...   # time.monotonic() when a batch last ended (0: never)


class WorkerHealth:
    def __init__(self, progress: _Progress, lag: ConsumerLag, stall_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._progress = progress
        self._lag = lag
        self.stall_s = stall_s
        self._clock = clock
        self.created_at = clock()
        self.running_since: float | None = None   # the event loop's first beat
        self.beat_at = 0.0
        self.joined = False

    def beat(self) -> None:
        """The event loop ran (a Faust timer calls this)."""
        self.beat_at = self._clock()
        if self.running_since is None:
            self.running_since = self.beat_at

    def live(self) -> tuple[bool, str]:
        now = self._clock()
        batch_at = self._progress.last_batch_at
        # A joined batch ran on the event loop too: Faust may start its timers (the beat) only
        # once a rebalance settles, while the worker already joins batches.
        since = self.running_since if self.running_since is not None else batch_at
        if not since:   # Faust is starting (joining a broker may take a while)
            return True, f"starting for {now - self.created_at:.0f} s"
        quiet = now - max(self.beat_at, batch_at)
        if quiet > self.stall_s:
            return False, f"the worker's event loop has not run for {quiet:.0f} s"
        waiting = self._lag.total
        idle = now - max(batch_at, since)
        if waiting and idle > self.stall_s:
            return False, (f"{waiting} messages wait on its partitions and no batch was joined "
                           f"for {idle:.0f} s")
        return True, f"{waiting} messages behind, last batch {idle:.1f} s ago"

    def ready(self) -> tuple[bool, str]:
        if not self.joined:
            return False, "not in the consumer group yet (no partitions assigned so far)"
        return self.live()
