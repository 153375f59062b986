"""What this kernel and this process allow, probed once at start-up (nothing cached on disk).

Files tell what is configured (capabilities, BTF, tracepoints, lockdown); what the verifier and
the kernel actually accept is found by doing it: one tiny BCC module is compiled, then
`bpf_probe_write_user` is loaded, a kprobe attached, a sock_ops program attached to a private
cgroup-v2 child and an sk_msg program attached to a SOCKHASH, and each is undone at once.
The sock_ops test uses a child cgroup of its own, not the root: a plain attach at the root would
replace a running agent's program there. (So the agent should attach its sock_ops program with
BPF_F_ALLOW_MULTI, or this probe cannot attach below it while it runs.)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from probe_agent.btf import BtfError, member_offset
from probe_agent.enrich import cgroup_path_of

# Capability bit numbers (include/uapi/linux/capability.h).
CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}
BTF_PATH = Path("/sys/kernel/btf/vmlinux")
LOCKDOWN_PATH = Path("/sys/kernel/security/lockdown")
TRACEFS_ROOTS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
PID_NAMESPACE_PATH = Path("/proc/self/ns/pid")
PROC_PID_INIT_INO = 0xEFFFFFFC   # the initial PID namespace's inode (include/linux/proc_ns.h)

# Without these the agent cannot see connections, requests or thread lineage at all. Socket
# reads and writes are seen at sock_{send,recv}_length (inside the call, with the sock: bytes and
# TCP seq in one place), a send's start at tcp_sendmsg_locked, handshakes and closes at
# inet_sock_set_state: no syscall tracepoint, so no syscall of any process takes the slow path.
REQUIRED_TRACEPOINTS: tuple[str, ...] = (
    "sock:sock_send_length", "sock:sock_recv_length", "sock:inet_sock_set_state",
    "tcp:tcp_sendmsg_locked",
    "sched:sched_process_fork", "sched:sched_process_exit", "sched:sched_process_exec",
)
OFFSETS: tuple[tuple[str, str], ...] = (("tcp_sock", "write_seq"), ("tcp_sock", "copied_seq"))

_PROBE_C = r"""
#include <uapi/linux/bpf.h>
BPF_SOCKHASH(weft_probe_sockhash, u64, 2);
int weft_probe_write_user(void *ctx) {
    u64 zero = 0;
    bpf_probe_write_user((void *)0, &zero, sizeof(zero));
    return 0;
}
int weft_probe_kprobe(void *ctx) { return 0; }
int weft_probe_sock_ops(struct bpf_sock_ops *skops) { return 1; }
int weft_probe_sk_msg(struct sk_msg_md *msg) { return SK_PASS; }
"""
_BPF_F_ALLOW_MULTI = 2
_KPROBE_TARGET = "tcp_sendmsg"


@dataclass(frozen=True)
class Check:
    """The outcome of trying something on this kernel, with the evidence in words."""

    ok: bool
    detail: str
    checked: bool = True  # False when it could not be tried (no privileges, no BCC)


@dataclass(frozen=True)
class KernelFeatures:
    kernel: str
    root: bool
    host_pids: bool                             # in the host's PID namespace, as the kernel's ids are
    cgroup_view: str                            # why the cgroup v2 mount here is not the host's whole
                                                # hierarchy (a container's own), or "" when it is
    capabilities: tuple[str, ...]               # those of CAPABILITIES in CapEff
    btf: bool
    tracefs: str | None                         # where tracefs was read; None: absent/unreadable
    tracepoints: tuple[tuple[str, bool], ...]    # (category:name, present)
    lockdown: str                               # none | integrity | confidentiality | unknown
    bcc: Check                                  # BCC imports and compiles
    kprobes: Check
    write_user: Check                           # bpf_probe_write_user accepted by the verifier
    sock_ops: Check
    sk_msg: Check
    offsets: tuple[tuple[str, int | None], ...]  # ("tcp_sock.write_seq", bytes or None)
    offsets_detail: str
    probe_s: float

    def has_cap(self, name: str) -> bool:
        return name in self.capabilities

    def tracepoint(self, name: str) -> bool:
        return dict(self.tracepoints).get(name, False)

    def offset(self, name: str) -> int | None:
        return dict(self.offsets).get(name)

    @property
    def missing_tracepoints(self) -> tuple[str, ...]:
        return tuple(name for name, present in self.tracepoints if not present)

    @property
    def header_injection(self) -> str:
        """How Weft can put a traceparent on the wire here."""
        if self.sock_ops.ok and self.sk_msg.ok and not self.cgroup_view:
            return "sk_msg"
        if self.write_user.ok:
            return "probe_write_user"
        return "none"

    def injection_sentences(self) -> list[str]:
        """Which injection form is active and why the other is not, one plain sentence each."""
        if self.sock_ops.ok and self.sk_msg.ok and self.cgroup_view:
            form_b = f"form (b), sock_ops + sk_msg, is not available here: {self.cgroup_view}."
        elif self.sock_ops.ok and self.sk_msg.ok:
            form_b = ("form (b), sock_ops + sk_msg with bpf_msg_push_data, is active: "
                      "it works for any language and is allowed under lockdown.")
        else:
            failed = self.sock_ops if not self.sock_ops.ok else self.sk_msg
            form_b = f"form (b), sock_ops + sk_msg, is not available: {failed.detail}."
        if self.write_user.ok:
            form_a = ("form (a), bpf_probe_write_user into Go programs, is allowed by this kernel "
                      "but not used: Weft writes headers with form (b).")
        elif not self.write_user.checked:
            form_a = f"form (a), bpf_probe_write_user, was not checked: {self.write_user.detail}."
        else:
            form_a = (f"form (a), bpf_probe_write_user, is refused by the kernel "
                      f"(lockdown={self.lockdown}: {self.write_user.detail}).")
        return [form_b, form_a]

    @property
    def seq_join(self) -> bool:
        """Cross-node joins can use (tuple, TCP sequence number)."""
        return all(value is not None for _, value in self.offsets)

    def blocking_problems(self) -> list[str]:
        """What stops the agent, each as a sentence that says what to do."""
        problems = []
        if not self.host_pids:
            problems.append("the agent runs in a PID namespace of its own (a container's): the kernel "
                            "names processes by the host's ids, which this /proc does not show, and "
                            "the agent could not tell its own traffic apart; run it in the host's "
                            "PID namespace (Kubernetes: hostPID: true; docker run --pid=host)")
        if not (self.root or self.has_cap("CAP_BPF") or self.has_cap("CAP_SYS_ADMIN")):
            problems.append("weft agent needs CAP_BPF: run as root or grant CAP_BPF,CAP_PERFMON")
        if not self.btf:
            problems.append(f"no kernel BTF at {BTF_PATH}: the agent needs a kernel built with "
                            "CONFIG_DEBUG_INFO_BTF=y")
        missing = [tp for tp in REQUIRED_TRACEPOINTS if not self.tracepoint(tp)]
        if self.tracefs is None:
            problems.append("tracefs is not mounted or not readable at /sys/kernel/tracing: "
                            "run 'make setup', and the agent as root")
        elif missing:
            problems.append(f"required tracepoints missing: {', '.join(missing)}: this kernel lacks "
                            "them (CONFIG_FTRACE_SYSCALLS / CONFIG_TRACEPOINTS)")
        if self.bcc.checked and not self.bcc.ok:
            problems.append(f"BCC cannot compile eBPF programs: {self.bcc.detail}")
        return problems

    def one_line(self) -> str:
        """The agent's start-up line."""
        seq = "tuple+seq" if self.seq_join else "tuple+time"
        offsets = " ".join(f"{name.split('.')[-1]}={value}" for name, value in self.offsets)
        missing = len(self.missing_tracepoints)
        return (f"kernel {self.kernel}: lockdown={self.lockdown} btf={'yes' if self.btf else 'no'} "
                f"kprobes={'yes' if self.kprobes.ok else 'no'} "
                f"write_user={'yes' if self.write_user.ok else 'refused'} "
                f"sk_msg={'yes' if self.sk_msg.ok and self.sock_ops.ok else 'no'} "
                f"injection={self.header_injection} join={seq} {offsets} "
                f"tracepoints={len(self.tracepoints) - missing}/{len(self.tracepoints)}")

    def describe(self) -> list[str]:
        """Plain sentences, one per fact, for `weft doctor`."""
        caps = ", ".join(self.capabilities) or "none of CAP_BPF/CAP_PERFMON/CAP_SYS_ADMIN/CAP_NET_ADMIN"
        lines = [f"kernel: {self.kernel}",
                 f"privileges: {'root' if self.root else 'not root'}; effective capabilities: {caps}",
                 "PID namespace: " + ("the host's" if self.host_pids
                                      else "its own (a container's), not the host's"),
                 "cgroup v2: " + (self.cgroup_view or "the host's whole hierarchy is mounted"),
                 f"BTF: {'present at ' + str(BTF_PATH) if self.btf else 'missing (' + str(BTF_PATH) + ')'}"]
        missing = self.missing_tracepoints
        if self.tracefs is None:
            lines.append("tracepoints: cannot be read (tracefs is not mounted or not readable at "
                         "/sys/kernel/tracing)")
        else:
            present = len(self.tracepoints) - len(missing)
            lines.append(f"tracepoints: {present} of {len(self.tracepoints)} present in {self.tracefs}"
                         + (f"; missing: {', '.join(missing)}" if missing else ""))
        lines.append(f"lockdown: {self.lockdown}")
        lines += self._ebpf_lines()
        found = ", ".join(f"{name} at byte {value}" if value is not None else f"{name} not found"
                          for name, value in self.offsets)
        lines.append(f"BTF offsets: {found} ({self.offsets_detail})")
        lines.append("cross-node join: " + ("by connection tuple and TCP sequence number" if self.seq_join
                                            else "by connection tuple and time (no TCP sequence numbers)"))
        return lines

    def _ebpf_lines(self) -> list[str]:
        """What loading and attaching programs showed; one line for what could not be tried."""
        checks = {"BCC": self.bcc, "kprobes": self.kprobes, "bpf_probe_write_user": self.write_user,
                  "sock_ops": self.sock_ops, "sk_msg": self.sk_msg}
        unchecked = [name for name, check in checks.items() if not check.checked]
        lines = [f"{', '.join(unchecked)}: not checked ({self.bcc.detail})"] if unchecked else []
        checked = {name: check for name, check in checks.items() if check.checked}
        if "BCC" in checked:
            lines.append(f"BCC: {'compiles' if self.bcc.ok else 'cannot compile'} ({self.bcc.detail})")
        if "kprobes" in checked:
            lines.append(f"kprobes: available ({self.kprobes.detail}); Weft still uses tracepoints and "
                         "uprobes only" if self.kprobes.ok else
                         f"kprobes: not available ({self.kprobes.detail}); Weft uses tracepoints and uprobes")
        if "bpf_probe_write_user" in checked:
            fallback = ("header injection uses sk_msg instead" if self.header_injection == "sk_msg"
                        else "no header injection; black-box propagation only")
            lines.append(f"bpf_probe_write_user: accepted by the verifier ({self.write_user.detail})"
                         if self.write_user.ok else
                         f"bpf_probe_write_user: refused ({self.write_user.detail}) — {fallback}")
        for name in ("sock_ops", "sk_msg"):
            if name in checked:
                check = checked[name]
                lines.append(f"{name}: {'usable' if check.ok else 'not usable'} ({check.detail})")
        return lines

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tracepoints"] = dict(self.tracepoints)
        out["offsets"] = dict(self.offsets)
        out.update(header_injection=self.header_injection, seq_join=self.seq_join,
                   injection_forms=self.injection_sentences(),
                   blocking_problems=self.blocking_problems())
        return out


def effective_capabilities(status_text: str | None = None) -> tuple[str, ...]:
    """The CAPABILITIES named in this process's CapEff mask."""
    text = status_text if status_text is not None else Path("/proc/self/status").read_text()
    mask = 0
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            mask = int(line.split()[1], 16)
    return tuple(name for name, bit in CAPABILITIES.items() if mask >> bit & 1)


def in_host_pid_namespace(path: Path = PID_NAMESPACE_PATH) -> bool:
    """Whether this process is in the initial PID namespace, whose ids BPF programs see. True
    when it cannot be told (no /proc/self/ns: a kernel without namespaces has only that one)."""
    try:
        return os.stat(path).st_ino == PROC_PID_INIT_INO
    except OSError:
        return True


def lockdown_mode(path: Path = LOCKDOWN_PATH) -> str:
    """The bracketed word of securityfs' lockdown file ("none [integrity] confidentiality")."""
    try:
        text = path.read_text()
    except OSError:
        return "unknown"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unknown"


def _is(check: str, path: Path) -> bool:
    """path.is_dir()/exists(), False when it cannot be looked at (not root, not mounted)."""
    try:
        return path.is_dir() if check == "dir" else path.exists()
    except OSError:
        return False


def tracefs_root() -> Path | None:
    return next((root for root in TRACEFS_ROOTS if _is("dir", root / "events")), None)


def tracepoints_present(names: tuple[str, ...]) -> tuple[tuple[str, bool], ...]:
    root = tracefs_root()
    return tuple((name, root is not None and _is("file", root / "events" / name.replace(":", "/") / "id"))
                 for name in names)


def container_cgroup_view(mountinfo: Path = Path("/proc/self/mountinfo"),
                          init: Path = Path("/proc/1")) -> str:
    """A sentence when the cgroup v2 hierarchy mounted here is only this container's own subtree,
    else "". That is the case when the mount's root is this process's cgroup namespace root
    (mountinfo shows "/") and that root is below the host's: the host's init process, seen
    through the same namespace, then sits at a path starting "/..". A container runtime mounts
    cgroup2 so, in a private cgroup namespace; a sock_ops program attached at that mount's root
    sees that container's sockets alone."""
    found: tuple[str, str] | None = None
    try:
        for line in mountinfo.read_text().splitlines():
            fields, _, rest = line.partition(" - ")
            if rest.split(" ", 1)[0] == "cgroup2":
                parts = fields.split()
                found = (parts[3], parts[4])   # the last one: mounted over any earlier one
    except OSError:
        return ""
    if found is None or found[0] != "/" or not cgroup_path_of(init).startswith("/.."):
        return ""
    return (f"the cgroup v2 hierarchy at {found[1]} is this container's own, not the host's (its "
            "cgroup namespace starts below the host's root), so header injection would reach this "
            "container alone and --cgroup cannot name another one; mount the host's /sys/fs/cgroup "
            "there (Kubernetes: a hostPath volume)")


def cgroup2_root() -> Path | None:
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return Path(parts[1])
    return None


def kprobes_config() -> str:
    """Why kprobes are (not) there, from the kernel's own config and tracefs."""
    try:
        import gzip

        config = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
        if "CONFIG_KPROBES=y" in config:
            return "CONFIG_KPROBES=y"
        if "# CONFIG_KPROBES is not set" in config:
            return "CONFIG_KPROBES is off"
    except OSError:
        pass
    root = tracefs_root()
    if root is not None and not _is("file", root / "kprobe_events"):
        return "no kprobe_events in tracefs"
    return "kernel config unknown"


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Capture fd 2 (where libbpf prints verifier logs) into the yielded list, as text lines."""
    out: list[str] = []
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            out.extend(sink.read().decode(errors="replace").splitlines())


def _verifier_reason(log: list[str], fallback: str) -> str:
    for line in log:
        if "cannot use helper" in line or "unknown func" in line or "not allowed" in line:
            return line.strip()
    return fallback


def _probe_with_bcc(can_load: bool) -> dict[str, Check]:
    """Compile the probe module once, then try each feature for real and undo it."""
    results: dict[str, Check] = {}
    not_root = Check(False, "loading eBPF needs root or CAP_BPF", checked=False)
    try:
        from bcc import BPF, BPFAttachType
        from bcc.libbcc import lib
    except ImportError as exc:
        bad = Check(False, f"python module bcc missing ({exc}); install Debian python3-bpfcc",
                    checked=False)
        return dict.fromkeys(("bcc", "kprobes", "write_user", "sock_ops", "sk_msg"), bad)
    if not can_load:
        return dict.fromkeys(("bcc", "kprobes", "write_user", "sock_ops", "sk_msg"), not_root)
    bpf, error = None, ""
    with _captured_stderr() as log:  # `log` is filled when the block exits
        try:
            bpf = BPF(text=_PROBE_C.encode())
        except Exception as exc:  # BCC raises bare Exception on compile errors
            error = str(exc)
    if bpf is None:
        failed = Check(False, f"{error}; {' '.join(log[-3:])}".strip())
        return dict.fromkeys(("bcc", "kprobes", "write_user", "sock_ops", "sk_msg"), failed)
    results["bcc"] = Check(True, "a test program compiled and loaded")
    try:
        results["write_user"] = _try_write_user(bpf, BPF)
        results["kprobes"] = _try_kprobe(bpf, BPF)
        results["sock_ops"] = _try_sock_ops(bpf, BPF, BPFAttachType)
        results["sk_msg"] = _try_sk_msg(bpf, BPF, BPFAttachType, lib)
    finally:
        with _captured_stderr():
            bpf.cleanup()
    return results


def _load(bpf: Any, name: bytes, prog_type: int) -> tuple[Any, list[str]]:
    """Load one function of the probe module: (function or None, what libbpf printed)."""
    fn = None
    with _captured_stderr() as log, contextlib.suppress(Exception):  # log is filled on exit
        fn = bpf.load_func(name, prog_type)
    return fn, log


def _try_write_user(bpf: Any, BPF: Any) -> Check:
    refused = False
    with _captured_stderr() as log:  # `log` is filled when the block exits
        try:
            bpf.load_func(b"weft_probe_write_user", BPF.TRACEPOINT)
        except Exception:
            refused = True
    if refused:
        return Check(False, f"the verifier refused it: {_verifier_reason(log, 'load failed')}, "
                            f"lockdown={lockdown_mode()}")
    return Check(True, "a tracepoint program calling it loaded")


def _try_kprobe(bpf: Any, BPF: Any) -> Check:
    with _captured_stderr():
        try:
            bpf.load_func(b"weft_probe_kprobe", BPF.KPROBE)
            bpf.attach_kprobe(event=_KPROBE_TARGET.encode(), fn_name=b"weft_probe_kprobe")
        except Exception:
            return Check(False, f"attaching a kprobe to {_KPROBE_TARGET} failed; {kprobes_config()}")
        bpf.detach_kprobe(event=_KPROBE_TARGET.encode())
    return Check(True, f"attached and detached a kprobe on {_KPROBE_TARGET}")


def _try_sock_ops(bpf: Any, BPF: Any, BPFAttachType: Any) -> Check:
    """Attach to a private child cgroup (never the root: an agent's program may be there)."""
    root = cgroup2_root()
    if root is None:
        return Check(False, "no cgroup v2 mount: sock_ops programs attach to a cgroup v2")
    child = root / f"weft-doctor-{os.getpid()}"
    try:
        fn, log = _load(bpf, b"weft_probe_sock_ops", BPF.SOCK_OPS)
        if fn is None:
            return Check(False, f"load refused: {_verifier_reason(log, 'load failed')}")
        child.mkdir(exist_ok=True)
        fd = os.open(child, os.O_RDONLY)
        try:
            BPF.attach_func(fn, fd, BPFAttachType.CGROUP_SOCK_OPS, _BPF_F_ALLOW_MULTI)
            BPF.detach_func(fn, fd, BPFAttachType.CGROUP_SOCK_OPS)
        except Exception as exc:
            hint = (" (a sock_ops program attached above without BPF_F_ALLOW_MULTI forbids more)"
                    if "Operation not permitted" in str(exc) else "")
            return Check(False, f"loaded, but attaching to a cgroup failed: {exc}{hint}")
        finally:
            os.close(fd)
    except OSError as exc:
        return Check(False, f"cannot use a cgroup under {root}: {exc.strerror}")
    finally:
        with contextlib.suppress(OSError):
            child.rmdir()
    return Check(True, f"loaded, attached to a cgroup under {root} and detached")


def _try_sk_msg(bpf: Any, BPF: Any, BPFAttachType: Any, lib: Any) -> Check:
    fn, log = _load(bpf, b"weft_probe_sk_msg", BPF.SK_MSG)
    if fn is None:
        return Check(False, f"load refused: {_verifier_reason(log, 'load failed')}")
    # BCC's table wrapper does not know SOCKHASH; take the map fd from libbcc directly.
    map_fd = lib.bpf_table_fd(bpf.module, b"weft_probe_sockhash")
    if map_fd < 0:
        return Check(False, "the SOCKHASH map was not created")
    try:
        BPF.attach_func(fn, map_fd, BPFAttachType.SK_MSG_VERDICT)
        BPF.detach_func(fn, map_fd, BPFAttachType.SK_MSG_VERDICT)
    except Exception as exc:
        return Check(False, f"loaded, but attaching to a SOCKHASH failed: {exc}")
    return Check(True, "loaded, attached to a SOCKHASH as verdict program and detached")


def _offsets() -> tuple[tuple[tuple[str, int | None], ...], str]:
    found: list[tuple[str, int | None]] = []
    problems: list[str] = []
    for struct, member in OFFSETS:
        try:
            found.append((f"{struct}.{member}", member_offset(struct, member)))
        except BtfError as exc:
            found.append((f"{struct}.{member}", None))
            problems.append(str(exc))
    return tuple(found), "; ".join(problems) or f"from {BTF_PATH}"


def probe_kernel() -> KernelFeatures:
    """Probe this kernel now (about a second: one BCC compile and a BTF parse)."""
    t0 = time.monotonic()
    root = os.geteuid() == 0
    caps = effective_capabilities()
    checks = _probe_with_bcc(root or "CAP_BPF" in caps or "CAP_SYS_ADMIN" in caps)
    btf = _is("file", BTF_PATH)
    tracefs = tracefs_root()
    offsets, offsets_detail = _offsets() if btf else (
        tuple((f"{s}.{m}", None) for s, m in OFFSETS), f"no BTF at {BTF_PATH}")
    return KernelFeatures(
        kernel=os.uname().release, root=root, host_pids=in_host_pid_namespace(),
        cgroup_view=container_cgroup_view(), capabilities=caps,
        btf=btf, tracefs=str(tracefs) if tracefs else None,
        tracepoints=tracepoints_present(REQUIRED_TRACEPOINTS),
        lockdown=lockdown_mode(), bcc=checks["bcc"], kprobes=checks["kprobes"],
        write_user=checks["write_user"], sock_ops=checks["sock_ops"], sk_msg=checks["sk_msg"],
        offsets=offsets, offsets_detail=offsets_detail, probe_s=round(time.monotonic() - t0, 3))
