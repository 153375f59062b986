"""`weft run` and `weft demo`: the whole pipeline, on this host or on three test nodes."""

from __future__ import annotations

import click

from weft.config import run_dir


@click.command("run")
def run() -> None:
    """Broker, Redis, this host's agent and the stitcher, until Ctrl-C or SIGTERM.

    Traces go to OTEL_EXPORTER_OTLP_ENDPOINT when set, else to run_dir()/traces.jsonl
    (look at them with `weft show --last 10`)."""
    from weft.run import run_main

    raise SystemExit(run_main(run_path=run_dir()))


@click.command("demo")
@click.option("--seconds", type=float, default=20.0, show_default=True, help="how long to send traffic")
@click.option("--concurrency", type=int, default=4, show_default=True, help="parallel root requests")
@click.option("--rps", type=float, default=50.0, show_default=True,
              help="root requests per second (0: as fast as possible)")
@click.option("--show", "show_last", type=int, default=5, show_default=True, help="traces to print as trees")
def demo(seconds: float, concurrency: int, rps: float, show_last: int) -> None:
    """Test nodes, agents, stitcher and a 6-service demo (Python, Go, Node) under traffic;
    then the stitched traces as trees and the verify table."""
    from weft.demo import demo_main

    raise SystemExit(demo_main(run_path=run_dir(), seconds=seconds, concurrency=concurrency, rps=rps,
                               show=show_last))


commands = [run, demo]
