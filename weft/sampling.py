"""Which traces Weft keeps: the standard `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, read by
the stitcher (which traces it exports) and by the agent (the sampled flag of the `traceparent` it
injects), so that a service downstream records exactly the traces Weft exports.

The decision is by trace id, the OpenTelemetry Python SDK's `TraceIdRatioBased`: keep when the
trace id's low 64 bits are below ratio × 2^64. A service instrumented with that SDK at the same
ratio keeps the same traces. The `parentbased_*` samplers are read as their root sampler: Weft
does not carry the sampled flag of a traceparent it did not inject.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from weft.config import ConfigError

_RATIO_OF = {"always_on": 1.0, "parentbased_always_on": 1.0,
             "always_off": 0.0, "parentbased_always_off": 0.0}
_BY_ARG = ("traceidratio", "parentbased_traceidratio")
SAMPLERS = (*_RATIO_OF, *_BY_ARG)
_LOW_64 = (1 << 64) - 1


@dataclass(frozen=True)
class TraceSampler:
    """Keeps a trace when its id's low 64 bits are below `ratio` × 2^64."""

    ratio: float = 1.0
    name: str = "always_on"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={self.ratio:g}: a ratio from 0 to 1")

    @property
    def bound(self) -> int:
        return round(self.ratio * (_LOW_64 + 1))

    @property
    def keeps_all(self) -> bool:
        return self.bound > _LOW_64

    def keeps(self, trace_id: bytes) -> bool:
        return int.from_bytes(trace_id[8:16], "big") < self.bound

    def describe(self) -> str:
        if self.keeps_all:
            return f"{self.name}: every trace exported"
        if self.ratio == 0.0:
            return f"{self.name}: no trace exported (the join goes on; `weft rebuild` recovers them)"
        return (f"{self.name} {self.ratio:g}: traces exported by trace id, about {self.ratio:.2%} of "
                "them (the join sees all; `weft rebuild` recovers the rest)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TraceSampler:
        """The sampler `OTEL_TRACES_SAMPLER` names (default `parentbased_always_on`: keep all)."""
        env = os.environ if environ is None else environ
        name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
        if name in _RATIO_OF:
            return cls(_RATIO_OF[name], name)
        if name not in _BY_ARG:
            raise ConfigError(f"OTEL_TRACES_SAMPLER={name!r}: Weft samples by trace id; allowed: "
                              f"{', '.join(SAMPLERS)}")
        raw = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        try:
            ratio = float(raw) if raw else 1.0        # the spec's default for a missing ratio
        except ValueError:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={raw!r}: a ratio from 0 to 1, "
                              "e.g. 0.1") from None
        return cls(ratio, name)     # a ratio outside 0-1 is refused there
