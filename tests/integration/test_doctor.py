"""`weft doctor` and probe_agent.kernel, checked against the kernel itself by a second method."""

from __future__ import annotations

import ctypes
import dataclasses
import gzip
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from probe_agent.kernel import (
    REQUIRED_TRACEPOINTS,
    KernelFeatures,
    cgroup2_root,
    effective_capabilities,
    lockdown_mode,
    probe_kernel,
)

WEFT = str(Path(sys.executable).parent / "weft")


@pytest.fixture(scope="module")
def doctor() -> dict[str, Any]:
    env = {**os.environ, "WEFT_KAFKA_BOOTSTRAP": "127.0.0.1:1", "WEFT_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run([WEFT, "doctor", "--json"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr  # nothing blocks the agent on this machine
    report: dict[str, Any] = json.loads(result.stdout)
    return report


# --- independent evidence --------------------------------------------------------------------


def _securityfs_lockdown() -> str:
    match = re.search(r"\[(\w+)\]", Path("/sys/kernel/security/lockdown").read_text())
    assert match, "securityfs lockdown file has no bracketed mode"
    return match.group(1)


def _kernel_config() -> str:
    return gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()


def _bpftool_offset(struct: str, member: str) -> int:
    """Byte offset from bpftool's raw BTF dump: a second BTF reader, not ours."""
    dump = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                          capture_output=True, text=True, check=True, timeout=60).stdout
    block = re.search(rf"^\[\d+\] STRUCT '{struct}' size=\d+ vlen=\d+\n((?:\t.*\n)+)", dump, re.M)
    assert block, f"bpftool shows no struct {struct}"
    found = re.search(rf"^\t'{member}' type_id=\d+ bits_offset=(\d+)", block.group(1), re.M)
    assert found, f"bpftool shows no direct member {struct}.{member}"
    bits = int(found.group(1))
    assert bits % 8 == 0
    return bits // 8


# --- doctor against the kernel ---------------------------------------------------------------


@pytest.mark.bpf
def test_lockdown_matches_securityfs(doctor: dict[str, Any]) -> None:
    assert doctor["lockdown"] == _securityfs_lockdown() == "integrity"


@pytest.mark.bpf
def test_kprobes_match_the_kernel_config(doctor: dict[str, Any]) -> None:
    config = _kernel_config()
    configured = "CONFIG_KPROBES=y" in config
    assert configured == ("# CONFIG_KPROBES is not set" not in config)
    assert doctor["kprobes"]["ok"] is configured
    # A kernel with kprobes has the kprobe PMU; this one has neither.
    assert Path("/sys/bus/event_source/devices/kprobe").exists() is configured
    assert doctor["kprobes"]["ok"] is False
    assert "CONFIG_KPROBES is off" in doctor["kprobes"]["detail"]


@pytest.mark.bpf
def test_write_user_is_refused_by_the_verifier_under_lockdown(doctor: dict[str, Any]) -> None:
    # Lockdown integrity (and above) removes bpf_probe_write_user (LOCKDOWN_BPF_WRITE_USER).
    assert doctor["write_user"]["ok"] is (_securityfs_lockdown() == "none")
    assert doctor["write_user"]["ok"] is False
    assert "cannot use helper bpf_probe_write_user" in doctor["write_user"]["detail"]
    assert doctor["header_injection"] == "sk_msg"


@pytest.mark.bpf
def test_offsets_match_bpftool(doctor: dict[str, Any]) -> None:
    for name, offset in doctor["offsets"].items():
        struct, member = name.split(".")
        assert offset is not None and offset == _bpftool_offset(struct, member), name
    assert doctor["seq_join"] is True


@pytest.mark.bpf
def test_tracepoints_match_tracefs(doctor: dict[str, Any]) -> None:
    listed = set(Path("/sys/kernel/tracing/available_events").read_text().split())
    for name, present in doctor["tracepoints"].items():
        assert present is (name in listed), name
    assert all(doctor["tracepoints"][tp] for tp in REQUIRED_TRACEPOINTS)


@pytest.mark.bpf
def test_privileges_match_proc_status(doctor: dict[str, Any]) -> None:
    assert doctor["root"] is (os.geteuid() == 0)
    cap_eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)", Path("/proc/self/status").read_text(), re.M)
                  .group(1), 16)  # type: ignore[union-attr]
    assert ("CAP_BPF" in doctor["capabilities"]) is bool(cap_eff >> 39 & 1)
    assert doctor["btf"] is Path("/sys/kernel/btf/vmlinux").exists()
    assert doctor["blocking_problems"] == []


@pytest.mark.bpf
def test_sk_msg_really_sees_a_message(doctor: dict[str, Any]) -> None:
    """Beyond load/attach: a sock_ops program puts a real connection in a SOCKHASH and the sk_msg
    verdict program sees the bytes sent on it; doctor must have said sk_msg is usable."""
    from bcc import BPF, BPFAttachType
    from bcc.libbcc import lib

    text = textwrap.dedent(r"""
        #include <uapi/linux/bpf.h>
        BPF_SOCKHASH(socks, u64, 64);
        BPF_ARRAY(seen, u64, 1);
        int on_sock_ops(struct bpf_sock_ops *skops) {
            if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) return 1;
            u64 key = ((u64)skops->local_port << 32) | bpf_ntohl(skops->remote_port);
            socks.sock_hash_update(skops, &key, BPF_NOEXIST);
            return 1;
        }
        int on_msg(struct sk_msg_md *msg) {
            int zero = 0;
            u64 *bytes = seen.lookup(&zero);
            if (bytes) __sync_fetch_and_add(bytes, msg->size);
            return SK_PASS;
        }
    """)
    bpf = BPF(text=text.encode())
    root = cgroup2_root()
    assert root is not None
    cgroup = root / f"weft-test-skmsg-{os.getpid()}"
    cgroup.mkdir()
    cg_fd = os.open(cgroup, os.O_RDONLY)
    ops = bpf.load_func(b"on_sock_ops", BPF.SOCK_OPS)
    msg = bpf.load_func(b"on_msg", BPF.SK_MSG)
    map_fd = lib.bpf_table_fd(bpf.module, b"socks")
    BPF.attach_func(ops, cg_fd, BPFAttachType.CGROUP_SOCK_OPS, 2)  # BPF_F_ALLOW_MULTI
    BPF.attach_func(msg, map_fd, BPFAttachType.SK_MSG_VERDICT)
    try:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            port = server.getsockname()[1]
            client = textwrap.dedent(f"""
                import os, socket
                open({str(cgroup / 'cgroup.procs')!r}, "w").write(str(os.getpid()))
                with socket.create_connection(("127.0.0.1", {port})) as s:
                    s.sendall(b"hello sk_msg")
                    s.recv(1)
            """)
            proc = subprocess.Popen([sys.executable, "-c", client])
            conn, _ = server.accept()
            with conn:
                data = b""
                while len(data) < 12:
                    data += conn.recv(64)
                conn.sendall(b"k")
            assert proc.wait(timeout=30) == 0
        assert data == b"hello sk_msg"
        assert bpf[b"seen"][ctypes.c_int(0)].value == len(data)
    finally:
        BPF.detach_func(msg, map_fd, BPFAttachType.SK_MSG_VERDICT)
        BPF.detach_func(ops, cg_fd, BPFAttachType.CGROUP_SOCK_OPS)
        os.close(cg_fd)
        bpf.cleanup()
        cgroup.rmdir()
    assert doctor["sk_msg"]["ok"] is True and doctor["sock_ops"]["ok"] is True


@pytest.mark.bpf
def test_doctor_prints_plain_sentences_of_this_machine() -> None:
    env = {**os.environ, "WEFT_KAFKA_BOOTSTRAP": "127.0.0.1:1", "WEFT_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run([WEFT, "doctor"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "kprobes: not available (" in out and "Weft uses tracepoints and uprobes" in out
    assert "bpf_probe_write_user: refused (the verifier refused it" in out
    assert "header injection uses sk_msg instead" in out
    assert "lockdown: integrity" in out
    assert "sk_msg: usable" in out and "sock_ops: usable" in out
    assert re.search(r"tcp_sock\.write_seq at byte \d+, tcp_sock\.copied_seq at byte \d+", out)
    assert "broker: not reachable" in out and "redis: not reachable" in out


@pytest.mark.bpf
def test_doctor_reports_reachable_infra(infra: Any) -> None:
    env = {**os.environ, "WEFT_KAFKA_BOOTSTRAP": infra.bootstrap, "WEFT_REDIS_URL": infra.redis_url}
    report = json.loads(subprocess.run([WEFT, "doctor", "--json"], capture_output=True, text=True,
                                       timeout=60, env=env, check=True).stdout)
    assert report["broker"]["reachable"] is True and "weft.raw has 4 partitions" in report["broker"]["detail"]
    assert report["redis"]["reachable"] is True


@pytest.mark.bpf
def test_probe_is_fast_and_one_line_summarises() -> None:
    features = probe_kernel()
    assert features.probe_s < 5.0
    line = features.one_line()
    assert "lockdown=integrity" in line and "kprobes=no" in line and "write_user=refused" in line
    assert "injection=sk_msg" in line and "join=tuple+seq" in line


# --- the pure parts ---------------------------------------------------------------------------


def test_effective_capabilities_reads_the_cap_eff_mask() -> None:
    assert effective_capabilities("CapEff:\t0000000000000000\n") == ()
    both = (1 << 39) | (1 << 21)
    assert effective_capabilities(f"CapInh:\t0\nCapEff:\t{both:016x}\n") == ("CAP_SYS_ADMIN", "CAP_BPF")


def test_lockdown_mode_reads_the_bracketed_word(tmp_path: Path) -> None:
    path = tmp_path / "lockdown"
    path.write_text("[none] integrity confidentiality\n")
    assert lockdown_mode(path) == "none"
    assert lockdown_mode(tmp_path / "absent") == "unknown"


@pytest.mark.bpf
def test_blocking_problems_name_what_to_do() -> None:
    features = probe_kernel()
    assert features.blocking_problems() == []
    crippled: KernelFeatures = dataclasses.replace(
        features, root=False, capabilities=(), btf=False,
        tracepoints=tuple((name, False) for name, _ in features.tracepoints))
    problems = " | ".join(crippled.blocking_problems())
    assert "needs CAP_BPF: run as root" in problems
    assert "CONFIG_DEBUG_INFO_BTF" in problems
    assert "sched:sched_process_fork" in problems


@pytest.mark.bpf
@pytest.mark.usefixtures("reachable_by_nobody")
def test_unprivileged_doctor_exits_non_zero_and_says_why(tmp_path: Path) -> None:
    """Run as `nobody` with no capabilities: the blocking problems, and a non-zero exit."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "WEFT_KAFKA_BOOTSTRAP": "127.0.0.1:1",
           "WEFT_REDIS_URL": "redis://127.0.0.1:1/0"}
    tmp_path.chmod(0o777)
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", WEFT, "doctor"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "privileges: not root; effective capabilities: none" in result.stdout
    assert "bpf_probe_write_user, sock_ops, sk_msg: not checked" in result.stdout
    assert "BLOCKING: weft agent needs CAP_BPF: run as root or grant CAP_BPF,CAP_PERFMON" in result.stderr
    assert "the agent cannot run here" in result.stdout
