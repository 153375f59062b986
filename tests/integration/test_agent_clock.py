"""ktime → Unix: the offset maps CLOCK_MONOTONIC (bpf_ktime_get_ns) onto CLOCK_REALTIME."""

from __future__ import annotations

import time

from probe_agent.clock import KtimeClock, ktime_now_ns, sample_offset_ns


def test_offset_maps_monotonic_to_realtime_within_the_sampling_window() -> None:
    offset, window = sample_offset_ns()
    assert 0 < window < 1_000_000  # a few µs normally; 1 ms even on a busy machine
    before = time.clock_gettime_ns(time.CLOCK_REALTIME)
    converted = ktime_now_ns() + offset
    after = time.clock_gettime_ns(time.CLOCK_REALTIME)
    assert before - window <= converted <= after + window


def test_clock_refreshes_only_when_due() -> None:
    clock = KtimeClock(refresh_s=10)
    now = ktime_now_ns()
    assert not clock.refresh_if_due(now + 9 * 10**9)
    assert clock.refresh_if_due(now + 11 * 10**9)
    assert abs(clock.to_unix_ns(ktime_now_ns()) - time.time_ns()) < 10**6
