"""RepeatFilter: the same line (numbers aside) at most once per period, with the repeats counted."""

from __future__ import annotations

import logging

from weft.logs import RepeatFilter, librdkafka_logger


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("librdkafka", logging.ERROR, __file__, 1, msg, args, None)


def test_repeats_within_the_period_are_held_and_counted_on_the_next_line() -> None:
    now = [0.0]
    thin = RepeatFilter(every_s=30.0, clock=lambda: now[0])
    line = "FAIL [weft-agent#producer-1] ssl://127.0.0.1:%d/bootstrap: handshake failed (after %dms)"
    passed = []
    for i in range(100):                         # 100 reconnects, 0.25 s apart, numbers varying
        now[0] = i * 0.25
        record = _record(line, 9000 + i % 3, i % 7)
        if thin.filter(record):
            passed.append(record.getMessage())
    assert len(passed) == 1 and passed[0].endswith("(after 0ms)")
    now[0] = 30.0
    record = _record(line, 9000, 1)
    assert thin.filter(record)
    assert record.getMessage().endswith("(99 more like it in the last 30 s)")
    other = _record("FAIL: Connect to ipv4#127.0.0.1:9092 failed: Connection refused")
    assert thin.filter(other)                    # another kind of line has its own period
    assert not thin.filter(_record("FAIL: Connect to ipv4#127.0.0.1:9093 failed: Connection refused"))


def test_the_shapes_kept_are_bounded() -> None:
    thin = RepeatFilter(every_s=30.0, clock=lambda: 0.0, max_shapes=4)
    for word in ("a", "b", "c", "d", "e"):
        assert thin.filter(_record(f"line {word}"))
    assert len(thin._last) <= 4


def test_the_librdkafka_logger_gets_one_filter() -> None:
    logger = librdkafka_logger()
    assert librdkafka_logger() is logger
    assert sum(isinstance(f, RepeatFilter) for f in logger.filters) == 1
