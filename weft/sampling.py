"""Which traces Weft keeps: the standard `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, read by
the stitcher (which traces it exports) and by the agent (the sampled flag of the `traceparent` it
injects), so that a service downstream records exactly the traces Weft exports.

A trace that started in Weft (its root request came without a traceparent) is decided by trace id,
the OpenTelemetry Python SDK's `TraceIdRatioBased`: keep when the trace id's low 64 bits are below
ratio × 2^64. A service instrumented with that SDK at the same ratio keeps the same traces.

A trace that came in from outside (its first traced request carried a traceparent Weft did not
put there) is, under the `parentbased_*` samplers — the default among them — decided by that
traceparent's sampled flag, as the SDK's `ParentBased` sampler with its default delegates decides
for a remote parent: kept when the caller recorded it, left out when the caller did not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

from weft.config import ConfigError

_RATIO_OF = {"always_on": 1.0, "parentbased_always_on": 1.0,
             "always_off": 0.0, "parentbased_always_off": 0.0}
_BY_ARG = ("traceidratio", "parentbased_traceidratio")
SAMPLERS = (*_RATIO_OF, *_BY_ARG)
_LOW_64 = (1 << 64) - 1


class _SampledSpan(Protocol):
    @property
    def trace_id(self) -> bytes: ...
    @property
    def remote_sampled(self) -> bool | None: ...


@dataclass(frozen=True)
class TraceSampler:
    """Keeps a trace when its id's low 64 bits are below `ratio` × 2^64; a `parentbased_*` one
    keeps a trace from outside when its caller's traceparent said sampled."""

    ratio: float = 1.0
    name: str = "always_on"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={self.ratio:g}: a ratio from 0 to 1")

    @cached_property
    def bound(self) -> int:
        return round(self.ratio * (_LOW_64 + 1))

    @cached_property
    def parent_based(self) -> bool:
        return self.name.startswith("parentbased_")

    @property
    def keeps_every_root(self) -> bool:
        """Every trace that starts in Weft is kept (the ratio is 1)."""
        return self.bound > _LOW_64

    @property
    def keeps_all(self) -> bool:
        """Every trace is kept, whatever its caller said."""
        return self.keeps_every_root and not self.parent_based

    def keeps(self, trace_id: bytes) -> bool:
        """The decision for a trace that started in Weft."""
        return int.from_bytes(trace_id[8:16], "big") < self.bound

    def keeps_span(self, span: _SampledSpan) -> bool:
        """The decision for the trace of this span (the same for every span of a trace)."""
        if self.parent_based and span.remote_sampled is not None:
            return span.remote_sampled
        return self.keeps(span.trace_id)

    def describe(self) -> str:
        callers = "; a trace from outside by its caller's sampled flag" if self.parent_based else ""
        if self.keeps_every_root:
            but = " but those whose caller's traceparent said not sampled" if self.parent_based else ""
            return f"{self.name}: every trace exported{but}"
        rest = "the join sees all; `weft rebuild` recovers the rest"
        traces = "traces that start here" if self.parent_based else "traces"
        if self.ratio == 0.0:
            return f"{self.name}: no {traces} exported{callers} ({rest})"
        return (f"{self.name} {self.ratio:g}: {traces} exported by trace id, about {self.ratio:.2%} "
                f"of them{callers} ({rest})")

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
