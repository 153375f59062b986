"""How far the stitcher's consumer is behind the broker, per partition.

The join engine times out a node whose watermark lags the newest node's by node_timeout_s (in
event time), so that a dead agent cannot hold every trace back. But a node's watermark also
lags when its frames are only *unread* — a worker catching up after a restart, a replay from
offset 0, a burst the worker is still working through — and timing such a node out would turn
all its events "late" (exported unlinked). The consumer knows the difference: the broker's high
watermark of each partition against the offset it is processing. While some partition is more
than `threshold` messages behind, the engine holds its node timeouts.
"""

from __future__ import annotations


class ConsumerLag:
    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._lag: dict[int, int] = {}
        self._behind: set[int] = set()

    def observe(self, partition: int, offset: int, highwater: int | None) -> None:
        """A message at `offset` is being processed; `highwater` is the partition's next offset
        as last reported by the broker (None: not known yet — nothing is concluded)."""
        if highwater is None:
            return
        lag = max(highwater - offset - 1, 0)
        self._lag[partition] = lag
        if lag > self.threshold:
            self._behind.add(partition)
        else:
            self._behind.discard(partition)

    def forget(self, partitions: set[int]) -> None:
        """Partitions revoked from this worker no longer count."""
        for p in partitions:
            self._lag.pop(p, None)
            self._behind.discard(p)

    @property
    def behind(self) -> bool:
        return bool(self._behind)

    def per_partition(self) -> dict[int, int]:
        """Each assigned partition's lag as last observed (a copy)."""
        return self._lag.copy()

    @property
    def total(self) -> int:
        return sum(self._lag.values())
