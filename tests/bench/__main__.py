"""`make bench`: the one benchmark harness every issue's figures come from.

Each module `tests/bench/bench_<area>.py` exposes `run(ctx: BenchContext) -> dict[str, float]`
returning flat metric names (e.g. "stitch.rebuild_eps") → numbers. The harness runs them in turn,
prints one table and writes results/bench.json (results/soak.json with --soak, where modules
expose `soak(ctx)` instead). `--only AREA` runs a subset; results from earlier runs of other
areas are kept in the file so a partial run never erases figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tests.bench.context import BenchContext

RESULTS = Path("results")


def _modules() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument("--only", action="append", default=[], help="area(s) to run, e.g. stitch")
    parser.add_argument("--soak", action="store_true", help="run the soak suite instead")
    parser.add_argument("--quick", action="store_true", help="smaller volumes (smoke run)")
    ns = parser.parse_args(argv)
    entry = "soak" if ns.soak else "run"
    out = RESULTS / ("soak.json" if ns.soak else "bench.json")
    console = Console()
    ctx = BenchContext(quick=ns.quick, console=console)
    results: dict[str, float] = json.loads(out.read_text()) if out.exists() else {}
    failed: list[str] = []
    ran = 0
    try:
        for name in _modules():
            area = name.removeprefix("bench_")
            if ns.only and area not in ns.only:
                continue
            module = importlib.import_module(f"tests.bench.{name}")
            fn = getattr(module, entry, None)
            if fn is None:
                continue
            ran += 1
            console.rule(f"[bold]{area}")
            t0 = time.monotonic()
            try:
                figures = fn(ctx)
            except Exception:  # a failing area is reported, the others still run
                console.print(traceback.format_exc())
                failed.append(area)
                continue
            results.update({k: float(v) for k, v in figures.items()})
            console.print(f"{area}: {len(figures)} figures in {time.monotonic() - t0:.0f} s")
    finally:
        ctx.close()
    if not ran:
        console.print(f"[red]no benchmark area has a {entry}() for this selection; nothing measured")
        return 1
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(dict(sorted(results.items())), indent=2) + "\n")
    table = Table(title=f"Weft {'soak' if ns.soak else 'benchmarks'} → {out}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(results.items()):
        table.add_row(key, f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}")
    console.print(table)
    if failed:
        console.print(f"[red]failed areas: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
