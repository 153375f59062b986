"""`weft run` as a user types it: broker, Redis, this host's agent and the stitcher come up,
a request on this host becomes a stitched client → server trace in run_dir/traces.jsonl, and
SIGTERM stops exactly what it started. The export settings reach it from the environment: span
names by route (heuristic) with the paths scrubbed, and a probe route whose traces are left out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from infra.procs import free_port, pid_alive
from stitcher.otlp_convert import JsonSpan, read_json_spans
from weft.run import WEFT

pytestmark = [pytest.mark.bpf, pytest.mark.infra, pytest.mark.slow]


def _wait_output(proc: subprocess.Popen[str], log: Path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert proc.poll() is None, f"weft run exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout_s} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def _spans_with_path(traces: Path, path: str) -> dict[str, JsonSpan]:
    if not traces.exists():
        return {}
    with open(traces) as fh:
        return {s.kind: s for s in read_json_spans(fh) if s.attributes.get("url.path") == path}


def _word() -> str:
    """A random path segment the route heuristic keeps (letters only: no digits to take for an id)."""
    return uuid.uuid4().hex[:10].translate(str.maketrans("0123456789", "ghijklmnop"))


def test_run_traces_this_host_and_stops_on_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "weft-run.out"
    probe = f"/probe-{_word()}"
    env = {**os.environ, "WEFT_RUN_DIR": str(tmp_path / "run"), "WEFT_ROUTES_UNMATCHED": "heuristic",
           "WEFT_ROUTES_SCRUB_PATHS": "true", "WEFT_ENGINE_IGNORE_ROUTES": probe}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
    with open(log, "w") as out:
        weft = subprocess.Popen([WEFT, "run"], stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        _wait_output(weft, log, "Ctrl-C stops it.", 300)
        assert "weft show --last 10" in log.read_text()
        route = f"/weft-run-{_word()}/*"
        path = route.replace("*", "alice@example.com")
        traces = tmp_path / "run" / "traces.jsonl"
        deadline = time.monotonic() + 60
        # The server may still be binding: curl retries until it answers once. The probe first:
        # its trace is decided before the one waited for below.
        for target in (probe, path):
            subprocess.run(["curl", "-s", "-o", "/dev/null", "--retry", "20", "--retry-connrefused",
                            "--retry-delay", "0", f"http://127.0.0.1:{port}{target}"], check=True, timeout=30)
        while set(_spans_with_path(traces, route)) != {"CLIENT", "SERVER"}:   # url.path scrubbed
            assert time.monotonic() < deadline, f"no client+server spans for {route} in {traces}"
            time.sleep(0.5)
        spans = _spans_with_path(traces, route)
        client, server_span = spans["CLIENT"], spans["SERVER"]
        assert server_span.parent_span_id == client.span_id
        assert server_span.trace_id == client.trace_id
        assert (server_span.name, server_span.attributes["http.route"]) == (f"GET {route}", route)
        assert (client.name, client.attributes["url.template"]) == (f"GET {route}", route)
        assert client.attributes["url.full"].endswith(f"{port}{route}")
        # curl's request line, read by the kernel on both ends
        assert client.attributes["network.protocol.version"] == server_span.attributes[
            "network.protocol.version"] == "1.1"
        assert "alice" not in traces.read_text()
        stitch_log = (tmp_path / "run" / "logs" / "stitch.log").read_text()
        assert f"ignored routes: traces that begin at {probe} are not exported" in stitch_log
        assert ("span names: by method and path with ids replaced by *; "
                "url.path and url.full carry the route") in stitch_log
        assert _spans_with_path(traces, probe) == {}
        pids = [json.loads(p.read_text())["pid"] for p in (tmp_path / "run").glob("*.pid")]
    finally:
        server.terminate()
        server.wait(10)
        if weft.poll() is None:
            weft.send_signal(signal.SIGTERM)
        code = weft.wait(60)
    assert code == 0, log.read_text()[-3000:]
    assert pids and not any(pid_alive(p) for p in pids), pids
