"""Bit-identity of the published versions' preprocessing: every tensor and head box equals a golden hash.

The golden file ``golden/preprocessing.json`` was written by the implementation of versions 1–3 as it was
before the preprocessing was rewritten for speed (hand-written connected components and ``np.percentile``),
so any change of output for a published version, by a rewrite, a library or a Pillow upgrade, fails here.
It is regenerated only on purpose: ``python tests/test_preprocessing_golden.py --write`` (and then the
change must be explained: models were trained on the old tensors).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from braintumor.preprocessing import Preprocessing, load_image, to_grey
from synthetic import random_slice

GOLDEN = Path(__file__).parent / "golden" / "preprocessing.json"

#: The parameter sets checked: the published versions' (1: plain resize; 2 and 3: crop and stretch at 160)
#: and each step alone, at another size too.
PARAMETERS = {
    "v1": Preprocessing(160),
    "v2_v3": Preprocessing(160, crop_to_head=True, normalize_intensity=True),
    "crop_only": Preprocessing(160, crop_to_head=True),
    "stretch_only": Preprocessing(224, normalize_intensity=True),
}


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _head(rng: np.random.Generator, size: tuple[int, int], scale: float, centre: tuple[float, float]) -> np.ndarray:
    """A textured bright ellipse (the head) of relative radius ``scale`` at ``centre`` on black, float."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    field = rng.normal(size=(8, 8)).astype(np.float32)
    texture = np.asarray(Image.fromarray(field, mode="F").resize((width, height), Image.Resampling.BICUBIC))
    inside = ((xx / width - centre[0]) / scale) ** 2 + ((yy / height - centre[1]) / scale) ** 2 < 1
    return inside * (120 + 30 * texture)


def _u8(values: np.ndarray) -> np.ndarray:
    return np.clip(values, 0, 255).astype(np.uint8)


def _with_text(pixels: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Burnt-in annotation text and a ruler in the corners, and a few bright specks."""
    image = Image.fromarray(pixels, mode="L")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), "R  L  SE:3 IM:12", fill=255)
    draw.text((4, image.height - 14), "W:400 L:40", fill=230)
    draw.line((image.width - 8, 10, image.width - 8, image.height // 3), fill=250, width=2)
    for _ in range(6):
        x, y = rng.integers(0, image.width), rng.integers(0, image.height)
        draw.point((int(x), int(y)), fill=255)
    return image


def _serpentine(side: int = 256) -> Image.Image:
    """A thin bright serpentine (one long component) beside a bright disc."""
    pixels = np.zeros((side, side), dtype=np.uint8)
    for row in range(8, side // 2, 16):
        pixels[row : row + 8, 8 : side - 8] = 200
        column = side - 16 if (row // 16) % 2 == 0 else 8
        pixels[row : row + 24, column : column + 8] = 200
    yy, xx = np.mgrid[0:side, 0:side]
    pixels[((xx - side / 2) ** 2 + (yy - 0.75 * side) ** 2) < (side / 5) ** 2] = 160
    return Image.fromarray(pixels, mode="L")


def cases() -> dict[str, Callable[[], object]]:
    """Named synthetic sources, each made from its own seed, as Preprocessing takes them."""
    made: dict[str, Callable[[], object]] = {}

    def case(name: str):
        def register(make: Callable[[np.random.Generator], object]) -> Callable[[np.random.Generator], object]:
            seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
            made[name] = lambda: make(np.random.default_rng(seed))
            return make

        return register

    @case("slice_224")
    def _(rng):
        return random_slice(rng)

    @case("slice_512_jpeg")
    def _(rng):
        return _encode(random_slice(rng, 512), "JPEG", quality=90)

    @case("slice_320_rgb_jpeg")
    def _(rng):
        return _encode(random_slice(rng, 320).convert("RGB"), "JPEG", quality=85)

    @case("noisy_background_512")
    def _(rng):
        return Image.fromarray(_u8(_head(rng, (512, 512), 0.42, (0.5, 0.5)) + rng.normal(12, 6, (512, 512))))

    @case("off_centre_with_text_512_png")
    def _(rng):
        pixels = _u8(_head(rng, (512, 512), 0.25, (0.35, 0.6)))
        return _encode(_with_text(pixels, rng), "PNG")

    @case("off_centre_with_text_300x420")
    def _(rng):
        return _with_text(_u8(_head(rng, (300, 420), 0.3, (0.62, 0.45)) + rng.normal(5, 3, (420, 300))), rng)

    @case("wide_640x360_jpeg")
    def _(rng):
        return _encode(Image.fromarray(_u8(_head(rng, (640, 360), 0.4, (0.5, 0.5)))), "JPEG", quality=75)

    @case("two_heads_and_specks")
    def _(rng):
        pixels = _head(rng, (400, 400), 0.3, (0.35, 0.5)) + _head(rng, (400, 400), 0.12, (0.8, 0.3))
        pixels[rng.random((400, 400)) < 0.002] = 255
        return Image.fromarray(_u8(pixels))

    @case("inverted_bright_background")
    def _(rng):
        return Image.fromarray(_u8(255 - _head(rng, (256, 256), 0.4, (0.5, 0.5))))

    @case("uniform_noise")
    def _(rng):
        return Image.fromarray(rng.integers(0, 256, (200, 240), dtype=np.uint8))

    @case("flat_black")
    def _(rng):
        return Image.new("L", (128, 96), 0)

    @case("flat_grey")
    def _(rng):
        return Image.new("L", (96, 128), 128)

    @case("flat_white_with_one_dark_pixel")
    def _(rng):
        pixels = np.full((100, 100), 255, dtype=np.uint8)
        pixels[50, 50] = 0
        return Image.fromarray(pixels)

    @case("low_contrast")
    def _(rng):
        return Image.fromarray(_u8(100 + _head(rng, (220, 220), 0.4, (0.5, 0.5)) / 40))

    @case("tiny_16")
    def _(rng):
        return Image.fromarray(_u8(_head(rng, (16, 16), 0.4, (0.5, 0.5))))

    @case("small_60x40")
    def _(rng):
        return Image.fromarray(_u8(_head(rng, (60, 40), 0.4, (0.45, 0.5)) + rng.normal(3, 2, (40, 60))))

    @case("uint16_array")
    def _(rng):
        return (
            (_head(rng, (384, 384), 0.4, (0.5, 0.5)) * 180 + rng.normal(200, 50, (384, 384))).clip(0).astype(np.uint16)
        )

    @case("uint16_png")
    def _(rng):
        values = (_head(rng, (300, 300), 0.35, (0.5, 0.55)) * 200).astype(np.uint16)
        return _encode(Image.fromarray(values), "PNG")

    @case("rgba_png")
    def _(rng):
        grey = _u8(_head(rng, (250, 250), 0.4, (0.5, 0.5)))
        alpha = np.where(grey > 0, 255, 0).astype(np.uint8)
        return _encode(Image.fromarray(np.dstack([grey, grey, grey, alpha]), "RGBA"), "PNG")

    @case("serpentine")
    def _(rng):
        return _serpentine()

    @case("outlier_heavy")
    def _(rng):
        pixels = np.full((200, 200), 30, dtype=np.uint8)
        pixels[rng.random((200, 200)) < 0.3] = 31
        pixels[:, :3] = 255
        return Image.fromarray(pixels)

    for k in range(24):

        @case(f"random_{k:02d}")
        def _(rng, k=k):
            width, height = (int(v) for v in rng.integers(16, 720, 2))
            scale = float(rng.uniform(0.1, 0.55))
            centre = (float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.25, 0.75)))
            values = _head(rng, (width, height), scale, centre) * rng.uniform(0.3, 1.6) + rng.uniform(0, 60)
            values = values + rng.normal(0, rng.uniform(0, 15), (height, width))
            image = _with_text(_u8(values), rng) if k % 3 == 0 else Image.fromarray(_u8(values))
            if k % 4 == 1:
                return _encode(image, "JPEG", quality=int(rng.integers(50, 96)))
            return image

    return made


def outputs(source: object) -> dict[str, dict[str, object]]:
    """The tensor hash and head box of ``source`` under every parameter set of :data:`PARAMETERS`."""
    grey = to_grey(load_image(source))
    found = {}
    for key, preprocessing in PARAMETERS.items():
        tensor = preprocessing(source)
        _, box = preprocessing.apply(grey)
        digest = hashlib.sha256(repr(tensor.shape).encode() + tensor.tobytes()).hexdigest()
        found[key] = {"sha256": digest, "box": list(box)}
    return found


def test_golden_file_covers_every_case():
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden) == sorted(cases())
    assert all(sorted(entry) == sorted(PARAMETERS) for entry in golden.values())


@pytest.mark.parametrize("name", sorted(cases()))
def test_published_preprocessing_reproduces_the_golden_hashes(name):
    golden = json.loads(GOLDEN.read_text())[name]
    assert outputs(cases()[name]()) == golden


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_preprocessing_golden.py --write   (regenerates the golden hashes)")
    GOLDEN.parent.mkdir(exist_ok=True)
    result = {name: outputs(make()) for name, make in sorted(cases().items())}
    text = json.dumps(result, indent=1, sort_keys=True)
    GOLDEN.write_text(re.sub(r"\[\s+([^\]]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n")
    print(f"wrote {len(result)} cases to {GOLDEN}")
