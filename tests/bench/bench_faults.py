"""`make soak` (issue 7): faults under steady load through the real pipeline, bad input fuzzed.

Real agents on three test nodes (n1, n2 call n0's http.server; n0 also runs nginx for hostile
clients) → a broker of this run → `weft stitch` (Redis) → an OTLP receiver. In order:

  1. steady load; the broker frozen (SIGSTOP) for 30 s (5 s with --quick), then SIGCONT;
     recovery_s = from SIGCONT until the export holds a span for every HTTP event the agents
     had decoded by then;
  2. hostile clients against nginx in n0 (random bytes, 64 KiB headers, slowloris, 10k idle
     connections; 2k with --quick) while the load goes on;
  3. the stitcher worker SIGKILLed mid-stream and a new one started;
  4. load stopped; the export checked against an offline rebuild of the same topic (in-memory
     engine from offset 0): spans_missing_after_sigkill, duplicate_spans_not_identical;
     events_produced = HTTP events the agents decoded (their own counters), events_consumed =
     distinct spans exported (one per valid event) + events the engine rejected as invalid
     (no role, end < start: counted by the rebuild of the same topic), events_lost = the
     difference;
  5. Redis FLUSHALL, then `weft replay --store redis` of the topic, compared with the clean
     rebuild: replay_mismatches;
  6. the decoder and the engine fuzzed with atheris for 120 s (15 s) → decoder_crashes (crashing
     inputs; a seeded random-bytes loop over the same check when atheris is not installed, said so).
agent_rss_mb_max is sampled every 0.5 s over the whole run; agent_crashes counts agents that
died or exited non-zero.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infra.services import LocalInfra
from stitcher.engine import Engine, Span
from stitcher.replay import _TopicReader, merged_frames, scan_nodes
from stitcher.state_memory import MemoryStateStore
from tests.bench.context import BenchContext
from tests.faults.exported import ExportCheck, check_export
from tests.faults.fuzzing import check_input
from tests.faults.pipeline import AgentPipeline
from tests.integration.stitch_harness import WEFT, StitchRun
from tests.otlp_receiver import OtlpReceiver

PORT, NGINX_PORT = 8080, 8090
ABUSE = Path(__file__).resolve().parents[1] / "faults" / "abuse.py"


class _RssSampler(threading.Thread):
    def __init__(self, pipe: AgentPipeline) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pipe, self.max_mb, self.stopped = pipe, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            # an agent exiting between listing and reading is counted as a crash elsewhere
            with contextlib.suppress(OSError, ValueError):
                self.max_mb = max(self.max_mb, self.pipe.agent_rss_mb())


def _wait_export(rx: OtlpReceiver, events: int, timeout_s: float) -> float | None:
    """Monotonic time when the export holds `events` distinct spans; None on timeout."""
    deadline = time.monotonic() + timeout_s
    while len({s.span_id for s in rx.spans}) < events:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    return time.monotonic()


def _until(cond: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _settled(read: Callable[[], int], quiet_s: float = 1.0, timeout_s: float = 30.0,
             not_before: float = 0.0) -> int:
    """read() once it stopped changing for quiet_s (and not before monotonic `not_before`)."""
    value, since, deadline = read(), time.monotonic(), time.monotonic() + timeout_s
    while (time.monotonic() - since < quiet_s or time.monotonic() < not_before) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
    return value


def soak(ctx: BenchContext) -> dict[str, float]:
    quick, say = ctx.quick, ctx.console.print
    freeze_s, steady_s, idle = (5.0, 5.0, 2000) if quick else (30.0, 30.0, 10_000)
    rps = 25.0 if quick else 60.0
    fuzz_s = 15 if quick else 120
    with tempfile.TemporaryDirectory(prefix="weft-soak-") as tmp:
        work = Path(tmp)
        infra = LocalInfra.start(work / "infra", partitions=2)
        try:
            figures = _pipeline_faults(ctx, infra, work, freeze_s=freeze_s, steady_s=steady_s, rps=rps,
                                       idle=idle)
        finally:
            os.kill(infra.broker.pid, signal.SIGCONT)
            infra.stop()
    figures["decoder_crashes"] = _fuzz(ctx, fuzz_s)
    say(", ".join(f"{k}={v:g}" for k, v in figures.items()))
    return figures


def _pipeline_faults(ctx: BenchContext, infra: LocalInfra, work: Path, *, freeze_s: float,
                     steady_s: float, rps: float, idle: int) -> dict[str, float]:
    t0 = time.monotonic()

    def say(message: str) -> None:
        ctx.console.print(f"[{time.monotonic() - t0:4.0f} s] {message}")

    topic = f"weft.raw.soak{uuid.uuid4().hex[:6]}"
    infra.create_topic(topic, 2)
    infra.create_topic(f"{topic}.dead", 1)
    run = StitchRun(bootstrap=infra.bootstrap, redis_url=infra.redis_url, raw_topic=topic,
                    dead_topic=f"{topic}.dead", group=f"weft-soak-{uuid.uuid4().hex[:6]}",
                    namespace="", nodes=["n0", "n1", "n2"])
    with OtlpReceiver() as rx, AgentPipeline.start(work, infra.bootstrap, topic, ["n0", "n1", "n2"]) as pipe:
        sampler = _RssSampler(pipe)
        sampler.start()
        say("agents tracing")
        try:
            pipe.serve_http("n0", PORT)
            pipe.serve_nginx("n0", NGINX_PORT)
            first = run.start_worker(work / "stitch-1.log", rx.endpoint)
            run.wait_assigned(2, timeout=120)
            say("stitcher assigned; steady load starts")
            loads = [pipe.load(n, pipe.url("n0", PORT, f"/soak-{n}"), rps / 2) for n in ("n1", "n2")]
            time.sleep(steady_s)                                    # steady load before the fault
            os.kill(infra.broker.pid, signal.SIGSTOP)
            say(f"broker frozen for {freeze_s:.0f} s under {rps:.0f} requests/s")
            time.sleep(freeze_s)
            os.kill(infra.broker.pid, signal.SIGCONT)
            resumed, at_resume = time.monotonic(), pipe.http_events()
            caught_up = _wait_export(rx, at_resume, timeout_s=180)
            recovery_s = (caught_up - resumed) if caught_up is not None else float("inf")
            say(f"export caught up {recovery_s:.1f} s after SIGCONT ({at_resume} events)")
            abuse = pipe.node("n1").popen(["python3", str(ABUSE), pipe.node("n0").address, str(NGINX_PORT),
                                           "--idle", str(idle), "--hold", str(min(steady_s, 10.0))],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            time.sleep(steady_s / 2)
            kill_at = len(rx.spans)
            os.kill(first.proc.pid, signal.SIGKILL)                 # mid-stream, load still on
            first.proc.wait(10)
            second = run.start_worker(work / "stitch-2.log", rx.endpoint)
            if not _until(lambda: second.assignment() == {0, 1}, 120):
                raise RuntimeError(f"the new stitcher was never assigned:\n{second.tail()}")
            say(f"stitcher SIGKILLed after {kill_at} spans exported; a new worker took over")
            time.sleep(steady_s / 2)
            out, err = abuse.communicate(timeout=300)
            say(f"hostile clients: {out.decode().strip() or err.decode()[-300:]}")
            requests = 0
            for load in loads:
                load.send_signal(signal.SIGTERM)
                requests += int(load.communicate(timeout=20)[0].decode().split()[0].split("=")[1])
            load_stopped = time.monotonic()
            produced = _settled(pipe.http_events)                   # the last requests decoded
            # The agents keep running: their watermarks must pass the last client's start +
            # max_request_s (10 s) before the stream decides it (the rebuild's flush does not wait).
            _settled(lambda: len({s.span_id for s in rx.spans}), quiet_s=3.0, timeout_s=180,
                     not_before=load_stopped + 12.0)
            crashed = sum(1 for a in pipe.agents.values() if not a.alive())
        finally:
            sampler.stopped.set()
            pipe.stop()                                             # agents flush and exit
        crashed += sum(1 for a in pipe.agents.values() if a.proc.returncode not in (0, None))
        run.stop_all()
        live = list(rx.requests)
        say("pipeline stopped")
    exported = len({s.span_id for r in live for rs in r.resource_spans for ss in rs.scope_spans
                    for s in ss.spans})
    rebuilt = _rebuild(infra, topic)                                # the agents have stopped
    consumed = exported + rebuilt.invalid
    after_kill = check_export(rebuilt.spans, live)
    say(f"{requests} requests; HTTP events: decoded by the agents {produced}, in the topic "
        f"{rebuilt.http_events} ({rebuilt.invalid} rejected as invalid by the engine), exported as "
        f"spans {exported}; live export vs the offline rebuild: {after_kill}; second worker frames "
        f"{second.frames_done()}")
    replay_check = _flush_and_replay(infra, topic, rebuilt.spans, work)
    say(f"after FLUSHALL, weft replay vs the clean run: {replay_check}")
    return {
        "events_produced": produced, "events_consumed": consumed, "events_lost": produced - consumed,
        "spans_missing_after_sigkill": after_kill.missing,
        "duplicate_spans_not_identical": after_kill.duplicates_differ,
        "replay_mismatches": (replay_check.missing + replay_check.wrong + replay_check.extra
                              + replay_check.duplicates_differ),
        "agent_crashes": crashed, "agent_rss_mb_max": round(sampler.max_mb, 1),
        "recovery_s": round(recovery_s, 2),
    }


@dataclass
class _Rebuilt:
    spans: list[Span]
    http_events: int        # HTTP events in the topic's distinct frames
    invalid: int            # of those, rejected by the engine (no role, or end < start)


def _rebuild(infra: LocalInfra, topic: str) -> _Rebuilt:
    """The offline answer: the topic from offset 0, each distinct frame once, in-memory engine."""
    reader = _TopicReader(infra.kafka_settings(), topic)
    try:
        engine = Engine(MemoryStateStore())
        engine.expect_nodes(scan_nodes(reader))
        seen: set[tuple[str, int, int]] = set()
        spans: list[Span] = []
        http = 0
        for frame, _, _ in merged_frames(reader, [0]):
            key = (frame.node, frame.agent_instance, frame.seq)
            if key in seen:
                continue
            seen.add(key)
            http += sum(1 for e in frame.events if e.WhichOneof("kind") == "http")
            spans += engine.process(frame)
        spans += engine.flush()
    finally:
        reader.close()
    return _Rebuilt(spans, http, engine.stats.invalid)


def _flush_and_replay(infra: LocalInfra, topic: str, clean: list[Span], work: Path) -> ExportCheck:
    import redis

    redis.Redis.from_url(infra.redis_url).flushall()
    with OtlpReceiver() as rx:
        env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint,
               "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
        done = subprocess.run([WEFT, "replay", "--bootstrap", infra.bootstrap, "--topic", topic, "--store",
                               "redis", "--redis-url", infra.redis_url, "--otlp"], env=env,
                              capture_output=True, text=True, timeout=600)
        (work / "replay.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"weft replay failed: {done.stderr[-2000:]}")
        _wait_export(rx, len(clean), timeout_s=60)
        return check_export(clean, list(rx.requests))


def _fuzz(ctx: BenchContext, seconds: int) -> int:
    """Crashing inputs found in `seconds` of fuzzing the decoder and the engine."""
    with tempfile.TemporaryDirectory(prefix="weft-fuzz-") as tmp:
        crashes = Path(tmp) / "crashes.txt"
        if importlib.util.find_spec("atheris") is None:
            ctx.console.print(f"atheris is not installed: random-bytes fuzzing for {seconds} s instead")
            return _random_fuzz(seconds)
        done = subprocess.run([sys.executable, "-m", "tests.faults.fuzz_atheris", str(crashes),
                               f"-max_total_time={seconds}", "-rss_limit_mb=2048", "-timeout=30"],
                              capture_output=True, text=True, timeout=seconds + 120)
        runs = [line for line in done.stderr.splitlines() if line.startswith("Done ")]
        found = crashes.read_text().splitlines() if crashes.exists() else []
        ctx.console.print(f"atheris: {runs[-1] if runs else 'no run count'} (exit {done.returncode}); "
                          f"crashing inputs {len(found)}: {sorted(set(found))[:5]}")
        return len(found) + (0 if done.returncode == 0 else 1)


def _random_fuzz(seconds: int) -> int:
    rng, crashes = random.Random(7), 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        crashes += check_input(rng.randbytes(rng.randint(0, 2048))) is not None
    return crashes

