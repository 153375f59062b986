"""Logging shared by every `weft` command: the Kafka clients' log lines (librdkafka's, served
through Python logging, and aiokafka's under Faust) thinned, so that a broker that is down or
refuses TLS does not flood the log: both log every failed reconnect, many times a second."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

_VARYING = re.compile(r"\d+")


class RepeatFilter(logging.Filter):
    """Lets a message through at most once per `every_s`; the repeats in between are counted
    and the count rides on the next one let through. Messages that differ only in numbers
    (timings, ports, node ids) count as repeats. With `only`, records of other loggers (names
    not starting with one of those) pass untouched."""

    def __init__(self, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 max_shapes: int = 256, only: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._only = only
        self._every_s = every_s
        self._clock = clock
        self._max_shapes = max_shapes
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if self._only and not record.name.startswith(self._only):
            return True
        message = record.getMessage()
        shape = _VARYING.sub("#", message)
        now = self._clock()
        last = self._last.get(shape)
        if last is not None and now - last < self._every_s:
            self._held[shape] = self._held.get(shape, 0) + 1
            return False
        if len(self._last) >= self._max_shapes:     # bounded: forget the old shapes at once
            self._last.clear()
            self._held.clear()
        self._last[shape] = now
        held = self._held.pop(shape, 0)
        if held and last is not None:
            record.msg, record.args = f"{message} ({held} more like it in the last {now - last:.0f} s)", ()
        return True


def librdkafka_logger() -> logging.Logger:
    """The logger to give confluent-kafka clients ("logger" setting): their lines go through
    Python logging (served by poll()) instead of raw to stderr, each shape at most every 30 s.
    librdkafka logs every failed reconnect, several a second while a broker is away; the
    clients' own error callbacks say the same once in a while."""
    logger = logging.getLogger("librdkafka")
    if not any(isinstance(f, RepeatFilter) for f in logger.filters):
        logger.addFilter(RepeatFilter())
    return logger


def thin_client_logs(root: logging.Logger) -> None:
    """Thin the Kafka clients' lines at each of `root`'s handlers (aiokafka logs through many
    child loggers, and a logger's own filters do not see its children's records)."""
    thin = RepeatFilter(only=("aiokafka", "librdkafka"))
    for handler in root.handlers:
        handler.addFilter(thin)
