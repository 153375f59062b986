"""Regenerate (or, with --check, verify) the protobuf modules from schemas/*.proto.

The generated *_pb2.py/.pyi are committed so that installs need no protoc; `make lint` runs
`--check` so that they can never drift from the .proto sources.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _generate(out_dir: Path) -> None:
    protos = sorted(p.relative_to(ROOT).as_posix() for p in HERE.glob("*.proto"))
    plugin = Path(sys.executable).parent / "protoc-gen-mypy"
    args = ["protoc", f"-I{ROOT}", f"--plugin=protoc-gen-mypy={plugin}",
            f"--python_out={out_dir}", f"--mypy_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {protos}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    ns = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _generate(out)
        generated = sorted((out / "schemas").glob("*_pb2.py*"))
        stale = [g.name for g in generated if not (HERE / g.name).exists()
                 or not filecmp.cmp(g, HERE / g.name, shallow=False)]
        if ns.check:
            if stale:
                print(f"generated code is stale: {', '.join(stale)}; run `make proto`",
                      file=sys.stderr)
                return 1
            return 0
        for g in generated:
            shutil.copyfile(g, HERE / g.name)
        print(f"generated {', '.join(g.name for g in generated)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
