"""The child-process helpers `weft run` and `weft demo` use: readiness from the log, a clear
error when a child dies first or is too slow, and stop by SIGTERM (SIGKILL if ignored)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from weft.run import PipelineError, spawn

READY = re.compile(r"^ready (\d+)$", re.M)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_ready_line_is_found_and_sigterm_stops(tmp_path: Path) -> None:
    code = "import time; print('ready 7', flush=True); time.sleep(60)"
    child = spawn("ok", _python(code), tmp_path / "ok.log")
    assert child.wait_for(READY, 20, "ready").group(1) == "7"
    assert child.stop(10) == -15


def test_a_child_that_dies_first_is_reported_with_its_log(tmp_path: Path) -> None:
    code = "print('cannot bind', flush=True); raise SystemExit(3)"
    child = spawn("dies", _python(code), tmp_path / "d.log")
    with pytest.raises(PipelineError, match=r"dies exited \(3\) before ready:\ncannot bind"):
        child.wait_for(READY, 20, "ready")
    child.stop(1)


def test_a_slow_child_times_out_and_an_ignored_sigterm_ends_in_sigkill(tmp_path: Path) -> None:
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
            "time.sleep(60)")
    child = spawn("slow", _python(code), tmp_path / "s.log")
    child.wait_for(re.compile("^up$", re.M), 20, "up")  # SIGTERM is ignored from here on
    with pytest.raises(PipelineError, match="slow not ready after 1 s"):
        child.wait_for(READY, 1, "ready")
    assert child.stop(0.5) == -9
