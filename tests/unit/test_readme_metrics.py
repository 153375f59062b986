"""Every metric the README's Operations section names is one the agent or the stitcher serves
(brace lists like `weft_stitch_{frames,events}_total` expanded, label lists dropped), and every
metric they serve is named there: the operators' list stays true."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from probe_agent.metrics import AgentMetrics
from stitcher.app import FrameStitcher
from stitcher.consumer_lag import ConsumerLag
from stitcher.engine import Engine
from stitcher.metrics import StitchCollector
from stitcher.sinks import JsonLinesSink
from stitcher.state_memory import MemoryStateStore

README = Path(__file__).resolve().parents[2] / "README.md"


def _named_in_readme() -> set[str]:
    names: set[str] = set()
    for token in re.findall(r"`(weft_(?:agent|stitch)_[^`]*)`", README.read_text()):
        for part in re.split(r"\s*/\s*`?", token):
            part = re.sub(r"\{[a-z_]+(?:=[^}]*)?(?:,[a-z_]+)*\}$", "", part)   # {label} or {label=a|b}
            choices = [m.split(",") for m in re.findall(r"\{([a-z_,]+)\}", part)]
            template = re.sub(r"\{[a-z_,]+\}", "{}", part)
            names.update(template.format(*combo) for combo in itertools.product(*choices))
    return {n for n in names if n.startswith("weft_")}


def _served(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def test_the_readme_names_exactly_the_metrics_served(tmp_path: Path) -> None:
    agent = _served(AgentMetrics("n").registry)
    engine = Engine(MemoryStateStore())
    engine.low_watermark_ns = 1       # the event-time gauges appear once a watermark is known
    stitcher = FrameStitcher(engine, JsonLinesSink(tmp_path / "x.jsonl"), dead_letters=None, lease=None)
    registry = CollectorRegistry()
    registry.register(StitchCollector(stitcher, ConsumerLag(20)))
    stitch = _served(registry)
    documented = _named_in_readme()
    assert documented - agent - stitch == set(), "named in the README but not served"
    assert (agent | stitch) - documented == set(), "served but not named in the README"
