"""Kernel time → Unix time.

`bpf_ktime_get_ns()` is CLOCK_MONOTONIC. The offset to CLOCK_REALTIME is sampled by reading
REALTIME between two MONOTONIC reads and keeping the narrowest of a few tries (the realtime read
is then known to within that window). NTP slews REALTIME, so the offset is re-sampled
periodically; `offset_ns` is what `ProbeContext.ktime_offset_ns` and decoders use.
"""

from __future__ import annotations

import time

_TRIES = 5


def sample_offset_ns() -> tuple[int, int]:
    """(REALTIME - MONOTONIC in ns, uncertainty window in ns) from the best of a few samples."""
    best_offset, best_window = 0, 1 << 62
    for _ in range(_TRIES):
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        real = time.clock_gettime_ns(time.CLOCK_REALTIME)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if after - before < best_window:
            best_window = after - before
            best_offset = real - (before + after) // 2
    return best_offset, best_window


def ktime_now_ns() -> int:
    """What bpf_ktime_get_ns() would return now."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class KtimeClock:
    """Holds the current ktime → Unix offset and re-samples it every `refresh_s` seconds."""

    def __init__(self, refresh_s: float = 10.0) -> None:
        self._refresh_ns = int(refresh_s * 1e9)
        self.offset_ns, self.window_ns = sample_offset_ns()
        self._sampled_at = ktime_now_ns()

    def refresh_if_due(self, now_ktime_ns: int) -> bool:
        if now_ktime_ns - self._sampled_at < self._refresh_ns:
            return False
        self.offset_ns, self.window_ns = sample_offset_ns()
        self._sampled_at = now_ktime_ns
        return True

    def to_unix_ns(self, ktime_ns: int) -> int:
        return ktime_ns + self.offset_ns
