"""The event decoder and the join engine fed arbitrary bytes and fuzz-built frames (hypothesis;
`make soak` runs the same check under atheris for longer): no crash.

(Undecodable values reaching the dead-letter topic with a reason, through a real worker:
tests/integration/test_stitch_stream.py::test_garbage_goes_to_the_dead_letter_topic; pure codec
fuzzing: tests/unit/test_codec_fuzz.py.)"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults.fuzzing import check_input


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1024))
def test_decoder_and_engine_never_crash(data: bytes) -> None:
    assert check_input(data) is None


def test_the_recipe_reaches_the_engine() -> None:
    # A fixed input that builds valid frames with HTTP events: the engine path is exercised.
    from tests.faults.fuzzing import _frames

    frames = _frames(bytes(range(256)) * 2)
    assert len(frames) >= 4 and any(e.WhichOneof("kind") == "http" for f in frames for e in f.events)
    assert check_input(bytes(range(256)) * 2) is None
