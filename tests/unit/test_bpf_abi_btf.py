"""probe_agent.btf against the C compiler: offsetof() over bpftool's C dump of the same BTF."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from probe_agent.btf import VMLINUX, BtfError, member_offset
from probe_agent.probes.http import _OFFSETS

MEMBERS = sorted(
    {
        *_OFFSETS.values(),
        ("task_struct", "tgid"),
        ("task_struct", "pid"),
        ("task_struct", "real_parent"),
        ("task_struct", "start_time"),
        ("sock", "__sk_common"),
    }
)

pytestmark = pytest.mark.skipif(not Path(VMLINUX).exists(), reason="needs kernel BTF")


def test_offsets_equal_offsetof_over_bpftool_c_dump(tmp_path: Path) -> None:
    for tool in ("bpftool", "gcc"):
        assert shutil.which(tool), f"{tool} is part of the test toolchain (infra/setup.sh)"
    header = subprocess.run(
        ["bpftool", "btf", "dump", "file", VMLINUX, "format", "c"], check=True, capture_output=True, text=True
    ).stdout
    (tmp_path / "vmlinux.h").write_text(header)
    lines = "".join(
        f'__builtin_printf("%lu\\n", (unsigned long)__builtin_offsetof(struct {s}, {m}));' for s, m in MEMBERS
    )
    (tmp_path / "off.c").write_text(f'#include "vmlinux.h"\nint main(void) {{ {lines} return 0; }}\n')
    subprocess.run(["gcc", "-w", "-o", str(tmp_path / "off"), str(tmp_path / "off.c")], check=True)
    expected = [
        int(x)
        for x in subprocess.run(
            [str(tmp_path / "off")], check=True, capture_output=True, text=True
        ).stdout.split()
    ]
    assert [member_offset(s, m) for s, m in MEMBERS] == expected


def test_plain_errors() -> None:
    with pytest.raises(BtfError, match="struct no_such_struct is not in the kernel BTF"):
        member_offset("no_such_struct", "x")
    with pytest.raises(BtfError, match="has no member nope"):
        member_offset("tcp_sock", "nope")
    with pytest.raises(BtfError, match="cannot read BTF"):
        member_offset("tcp_sock", "copied_seq", "/nonexistent/btf")
