"""Fuzzing the SDK's image decoding (hypothesis, bounded): only the SDK's documented errors come out."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from braintumor.config import IMAGE_SIZE
from braintumor.errors import InvalidImageError
from braintumor.preprocessing import Preprocessing, preprocess

#: Bounded for CI; BRAINTUMOR_FUZZ_EXAMPLES=5000 runs a longer campaign.
EXAMPLES = int(os.environ.get("BRAINTUMOR_FUZZ_EXAMPLES", "300"))
BOUNDED = settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _valid_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _valid_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _check(data: bytes) -> None:
    try:
        out = preprocess(data)
    except InvalidImageError:
        return
    assert out.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and out.dtype == np.uint8


@BOUNDED
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    _check(data)


@BOUNDED
@given(st.sampled_from([_valid_png(), _valid_jpeg()]), st.data())
def test_mutated_real_images(original, data):
    """Flip, cut and splice bytes of real PNG and JPEG files: decoders meet broken headers and chunks."""
    raw = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    _check(bytes(raw[:cut]) if data.draw(st.booleans()) else bytes(raw))


@BOUNDED
@given(
    st.integers(1, 300),
    st.integers(1, 300),
    st.sampled_from(["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "LA"]),
)
def test_every_mode_and_size(width, height, mode):
    image = Image.new(mode, (width, height))
    try:
        out = preprocess(image)
    except InvalidImageError as err:
        assert min(width, height) < 16 and "at least" in str(err)
        return
    assert out.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


@BOUNDED
@given(st.binary(min_size=0, max_size=2048))
def test_bytes_behind_a_dicom_preamble(payload):
    _check(b"\0" * 128 + b"DICM" + payload)


@BOUNDED
@given(
    st.integers(16, 200),
    st.integers(16, 200),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["noise", "blocks", "flat", "sparse"]),
)
def test_crop_and_stretch_never_fail_on_any_pixels(width, height, seed, kind):
    """The head crop and intensity stretch of version 2 on arbitrary content: always a full, valid tensor."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        pixels = rng.integers(0, 256, (height, width), dtype=np.uint8)
    elif kind == "blocks":
        pixels = np.kron(rng.integers(0, 256, (4, 4)), np.ones((height // 4 + 1, width // 4 + 1)))[:height, :width]
    elif kind == "flat":
        pixels = np.full((height, width), rng.integers(0, 256))
    else:  # a few bright specks on black
        pixels = np.zeros((height, width))
        pixels[rng.integers(0, height, 5), rng.integers(0, width, 5)] = 255
    image = Image.fromarray(pixels.astype(np.uint8))
    out, (left, top, right, bottom) = Preprocessing(crop_to_head=True, normalize_intensity=True).apply(image)
    assert out.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and out.dtype == np.uint8
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
