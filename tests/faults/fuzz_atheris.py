"""Coverage-guided fuzzing of the decoder and the engine with atheris (libFuzzer), for `make soak`.

    python -m tests.faults.fuzz_atheris CRASH_FILE -max_total_time=60 [libFuzzer flags]

Each input goes through `tests.faults.fuzzing.check_input`; a crash signature is appended to
CRASH_FILE (one line per failing input) and fuzzing goes on, so the soak counts crashes instead
of stopping at the first. libFuzzer prints its run count on stderr ("Done N runs")."""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

with atheris.instrument_imports(include=["schemas", "stitcher", "tests.faults.fuzzing"]):
    from tests.faults.fuzzing import check_input


def main() -> None:
    crash_file = sys.argv[1]

    def one_input(data: bytes) -> None:
        signature = check_input(data)
        if signature is not None:
            with open(crash_file, "a") as fh:
                fh.write(signature + "\n")

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
