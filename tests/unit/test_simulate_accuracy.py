"""simulate → capture files → rebuild → verify, at small scale: precision exactly 1.0."""

from __future__ import annotations

import io
import json
from pathlib import Path

from click.testing import CliRunner

from stitcher.otlp_convert import read_json_spans
from stitcher.rebuild import rebuild, write_json_lines
from stitcher.simulate import SimConfig, Simulation, write_captures
from stitcher.verify import compare, from_json_spans, read_truth
from weft.cli import cli


def test_simulated_mesh_is_stitched_exactly(tmp_path: Path) -> None:
    sim = Simulation(SimConfig(nodes=12, rps=40, seconds=3.0, seed=5))
    sim.run()
    paths, _ = write_captures(sim, tmp_path)
    result = rebuild(paths)
    out = io.StringIO()
    write_json_lines(result.spans, out)
    report = compare(from_json_spans(read_json_spans(out.getvalue().splitlines())),
                     read_truth(tmp_path / "truth.jsonl"))
    assert report.precision == 1.0
    assert report.recall >= 0.999
    assert report.missing == 0 and report.broken_traces == 0
    # every hop type the simulator makes was exercised
    assert {"thread", "spawned_thread", "goroutine", "cross_node", "nat", "tuple",
            "traceparent"} <= {h for h, s in report.hops.items() if s.true_edges}
    assert result.stats["duplicates"] > 0 and result.stats["late"] == 0


def _simulate(runner: CliRunner, sim_dir: Path) -> list[str]:
    """`weft simulate` of a small mesh into capture files; their paths, sorted."""
    done = runner.invoke(cli, ["simulate", "--nodes", "3", "--rps", "10", "--seconds", "1", "--seed", "2",
                               "--capture-dir", str(sim_dir)])
    assert done.exit_code == 0, done.output
    return sorted(str(p) for p in sim_dir.glob("*.wcap"))


def test_rebuild_is_byte_identical_and_the_cli_agrees(tmp_path: Path) -> None:
    runner = CliRunner()
    sim_dir = tmp_path / "cap"
    captures = _simulate(runner, sim_dir)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out, order in ((first, captures), (second, captures[::-1])):
        done = runner.invoke(cli, ["rebuild", *order, "--out", str(out)])
        assert done.exit_code == 0, done.output
    assert first.read_bytes() == second.read_bytes() and first.stat().st_size > 0
    done = runner.invoke(cli, ["verify", str(first), "--truth", str(sim_dir / "truth.jsonl"), "--json",
                               "--min-precision", "1.0"])
    assert done.exit_code == 0, done.output
    figures = json.loads(done.output)
    assert figures["precision"] == 1.0 and figures["missing"] == 0
    trace_id = json.loads(first.read_text().splitlines()[0])["resourceSpans"][0]["scopeSpans"][0]["spans"][0][
        "traceId"]
    done = runner.invoke(cli, ["show", trace_id[:12], "--file", str(first)])
    assert done.exit_code == 0, done.output
    assert f"trace {trace_id}" in done.output


def test_rebuild_takes_the_join_rules_from_the_engine_config(tmp_path: Path) -> None:
    runner = CliRunner()
    sim_dir = tmp_path / "cap"
    captures = _simulate(runner, sim_dir)
    links: dict[str, set[str]] = {}
    for name, yaml_text in (("default", "engine: {}\n"),
                            ("header_only", "engine:\n  link_by_seq: false\n  link_by_tuple: false\n")):
        config, out = tmp_path / f"{name}.yaml", tmp_path / f"{name}.jsonl"
        config.write_text(yaml_text)
        done = runner.invoke(cli, ["rebuild", *captures, "--out", str(out), "--config", str(config)])
        assert done.exit_code == 0, done.output
        links[name] = {a["value"]["stringValue"] for line in out.read_text().splitlines()
                       for rs in json.loads(line)["resourceSpans"] for ss in rs["scopeSpans"]
                       for span in ss["spans"] for a in span["attributes"] if a["key"] == "weft.link"}
    assert {"cross_node", "traceparent"} <= links["default"]
    assert "traceparent" in links["header_only"]
    assert not {"cross_node", "nat", "tuple"} & links["header_only"]


def test_verify_catches_a_wrong_parent(tmp_path: Path) -> None:
    truth = tmp_path / "truth.jsonl"
    truth.write_text('{"span": "aa", "parent": "", "hop": "root"}\n'
                     '{"span": "bb", "parent": "aa", "hop": "thread"}\n'
                     '{"span": "cc", "parent": "bb", "hop": "cross_node"}\n')
    from stitcher.verify import Stitched
    report = compare([Stitched("aa", "", "t1"), Stitched("bb", "aa", "t1"), Stitched("cc", "aa", "t1")],
                     read_truth(truth))
    assert report.hops["cross_node"].precision == 0.0 and report.hops["thread"].precision == 1.0
    assert report.recall == 0.5
