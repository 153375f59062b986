"""The resource attributes a process brings itself (ProcessInfo.resource_attributes).

Weft names every span's process with the keys it knows for a fact: `service.name`, `host.name`
(the node), `process.pid`, `process.executable.name`. Everything else in a span's resource comes
from the process: the attributes an OpenTelemetry SDK inside it would have read from its
OTEL_RESOURCE_ATTRIBUTES, and its container and pod from its cgroup path. The agent and the
stitcher apply the same bounds, so that a frame from a misbehaving agent cannot make a resource
(kept per process in the join state) grow without limit.
"""

from __future__ import annotations

from collections.abc import Iterable

WEFT_KEYS = frozenset({"service.name", "host.name", "process.pid", "process.executable.name"})
MAX_ATTRIBUTES = 32
MAX_KEY_LENGTH = 128
MAX_VALUE_LENGTH = 256


def bounded(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The pairs a resource keeps, sorted by key: not Weft's own keys, no empty key, keys of at
    most MAX_KEY_LENGTH characters, values cut to MAX_VALUE_LENGTH, the first MAX_ATTRIBUTES
    keys in key order (so the cut is the same whatever order the pairs came in)."""
    kept = sorted((k, v[:MAX_VALUE_LENGTH]) for k, v in pairs
                  if k and len(k) <= MAX_KEY_LENGTH and k not in WEFT_KEYS)
    return kept[:MAX_ATTRIBUTES]
