"""Fuzz: random bytes and mutated valid frames/captures never raise anything but CodecError."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import CaptureReader, CodecError, decode_frame, encode_frame
from tests.golden import make_golden

_FRAME = encode_frame(make_golden.golden_frames()[0])
_CAPTURE = make_golden.capture_bytes()
_SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def _mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """`base` with a few bytes flipped, cut, inserted or spliced."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate", "duplicate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "truncate":
            del data[pos:]
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


def _decode_frame(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        decode_frame(data)


def _read_capture(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".wcap") as fh:
        fh.write(data)
        fh.flush()
        try:
            reader = CaptureReader(Path(fh.name))
            for _ in reader.frames():
                pass
        except CodecError as exc:
            assert 0 <= exc.offset <= len(data)


@_SETTINGS
@given(st.binary(max_size=2048))
def test_random_bytes_as_frame(data: bytes) -> None:
    _decode_frame(data)


@_SETTINGS
@given(_mutated(_FRAME))
def test_mutated_frame(data: bytes) -> None:
    _decode_frame(data)


@_SETTINGS
@given(st.binary(max_size=2048))
def test_random_bytes_as_capture(data: bytes) -> None:
    _read_capture(b"WEFTCAP\n" + data)
    _read_capture(data)


@_SETTINGS
@given(_mutated(_CAPTURE))
def test_mutated_capture(data: bytes) -> None:
    _read_capture(data)
