"""Start and stop the test servers (Python, Go, Node, nginx) on private loopback ports."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


@dataclass
class Server:
    kind: str
    host: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str = "/") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"


# Release-build variants of the Go workloads: stripped of .symtab and DWARF, and that as PIE.
GO_STRIPPED = ("-ldflags=-s -w",)
GO_STRIPPED_PIE = ("-buildmode=pie", "-ldflags=-s -w")


def go_binary(name: str, out_dir: Path, *build_flags: str) -> Path:
    """`go build [build_flags]` tests/workloads/<name>.go (stdlib only) into out_dir."""
    out = out_dir / "_".join([name, *(re.sub(r"\W+", "", flag) for flag in build_flags)])
    if not out.exists():
        env = {**os.environ, "GOFLAGS": "-mod=mod", "GO111MODULE": "off", "GOCACHE": str(out_dir / "gocache")}
        subprocess.run(["go", "build", *build_flags, "-o", str(out), str(HERE / f"{name}.go")], check=True,
                       env=env)
    return out


def unreadable_go_binary(name: str, out_dir: Path) -> Path:
    """A stripped build whose function table's section header is renamed: it runs as before
    (the runtime finds its tables through its own pointers, not section names), but the agent
    finds neither symbols nor a `.gopclntab`, so it cannot read its layout."""
    out = out_dir / f"{name}_unreadable"
    if not out.exists():
        subprocess.run(["objcopy", "--rename-section", ".gopclntab=.weft_hidden",
                        str(go_binary(name, out_dir, *GO_STRIPPED)), str(out)], check=True)
    return out


def c_binary(name: str, out_dir: Path) -> Path:
    """`gcc` tests/workloads/<name>.c (libc + pthreads only) into out_dir."""
    out = out_dir / name
    if not out.exists():
        cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(out), str(HERE / f"{name}.c")]
        subprocess.run(cmd, check=True)
    return out


def _command(kind: str, host: str, port: int, workdir: Path, mode: str) -> list[str]:
    if kind == "python":
        return [sys.executable, "-m", "tests.workloads.py_server", host, str(port), mode]
    if kind == "go":
        return [str(go_binary("go_server", workdir)), f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if kind == "node":
        return ["node", str(HERE / "node_server.js"), host, str(port)]
    if kind == "nginx":
        prefix = Path(tempfile.mkdtemp(prefix="nginx-", dir=workdir))
        (prefix / "www").mkdir()
        (prefix / "tmp").mkdir()
        (prefix / "www" / "index.html").write_text("ok nginx\n")
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        conf = (
            (HERE / "nginx.conf.tmpl")
            .read_text()
            .replace("{prefix}", str(prefix))
            .replace("{listen}", listen)
        )
        (prefix / "nginx.conf").write_text(conf)
        return ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
    raise ValueError(f"unknown server kind {kind!r}")


@contextmanager
def running(kind: str, workdir: Path, host: str = "127.0.0.1", mode: str = "threading",
            cgroup: Path | None = None) -> Iterator[Server]:
    """`cgroup`: a cgroup v2 directory the server starts in (before exec, so every child it forks,
    e.g. nginx's workers, is in it from birth)."""
    port = free_port(host)

    def enter_cgroup() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    proc = subprocess.Popen(
        _command(kind, host, port, workdir, mode),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=enter_cgroup if cgroup is not None else None,
    )
    try:
        wait_port(host, port, proc)
        yield Server(kind, host, port, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
