import io

import numpy as np
import pytest
from PIL import Image

from braintumor.config import IMAGE_SIZE
from braintumor.preprocessing import (
    InvalidImageError,
    Preprocessing,
    head_box,
    preprocess,
    preprocess_batch,
    stretch_intensity,
)
from synthetic import random_slice


def _rgb(size=(224, 224)) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8), "RGB")


def test_output_shape_dtype_and_grey_channels():
    out = preprocess(_rgb())
    assert out.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert out.dtype == np.uint8
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()


@pytest.mark.parametrize("kind", ["path", "bytes", "pil", "array"])
def test_every_source_kind_gives_the_same_tensor(tmp_path, kind):
    image = _rgb((300, 250))
    path = tmp_path / "x.png"
    image.save(path)
    source = {"path": path, "bytes": path.read_bytes(), "pil": image, "array": np.asarray(image)}[kind]
    assert np.array_equal(preprocess(source), preprocess(path))


def test_rgb_and_its_grey_version_agree():
    image = _rgb()
    assert np.array_equal(preprocess(image), preprocess(image.convert("L")))


def test_batch_stacks_images():
    batch = preprocess_batch([_rgb(), _rgb((64, 64))])
    assert batch.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and batch.dtype == np.uint8


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"", "is empty"), (b"not an image at all", "cannot read"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "cannot read")],
)
def test_bad_bytes_raise_a_clear_error(payload, message):
    with pytest.raises(InvalidImageError, match=message):
        preprocess(payload)


def test_truncated_jpeg_is_rejected(tmp_path):
    buffer = io.BytesIO()
    _rgb().save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[:500])
    with pytest.raises(InvalidImageError):
        preprocess(path)


def test_missing_file_and_bad_arrays(tmp_path):
    with pytest.raises(InvalidImageError, match="no such file"):
        preprocess(tmp_path / "missing.png")
    with pytest.raises(InvalidImageError, match="uint8"):
        preprocess(np.zeros((40, 40), dtype=np.float32))
    with pytest.raises(InvalidImageError, match="shape"):
        preprocess(np.zeros((40, 40, 2), dtype=np.uint8))


# -- per-version preprocessing: crop to the head, intensity normalisation -----------------------------------
HEAD_AND_NORMALISE = Preprocessing(crop_to_head=True, normalize_intensity=True)


def _bordered(image: Image.Image, scale: float, offset: tuple[int, int] = (0, 0)) -> Image.Image:
    """``image`` shrunk by ``scale`` on a black canvas of the same size, shifted by ``offset``."""
    small = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    canvas = Image.new("L", image.size, 0)
    canvas.paste(small, ((image.width - small.width) // 2 + offset[0], (image.height - small.height) // 2 + offset[1]))
    return canvas


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


def test_default_preprocessing_is_the_plain_resize_of_version_1():
    image = random_slice(np.random.default_rng(0))
    expected = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))
    for tensor in (preprocess(image), Preprocessing()(image), preprocess(image, preprocessing=Preprocessing())):
        np.testing.assert_array_equal(tensor[:, :, 0], expected)


def test_head_box_finds_the_head_and_ignores_small_bright_text():
    image = _bordered(random_slice(np.random.default_rng(1)), 0.6, offset=(30, -20))
    pixels = np.asarray(image).copy()
    pixels[4:12, 4:60] = 255  # burnt-in annotation text in a corner
    left, top, right, bottom = head_box(Image.fromarray(pixels))
    # random_slice's head is the disc of radius 0.4 about the centre: 0.1–0.9 of the side, here shrunk and moved
    side, shrunk = 224, 224 * 0.6
    x0, y0 = (side - shrunk) / 2 + 30, (side - shrunk) / 2 - 20
    expected = (x0 + 0.1 * shrunk, y0 + 0.1 * shrunk, x0 + 0.9 * shrunk, y0 + 0.9 * shrunk)
    for found, want in zip((left, top, right, bottom), expected, strict=True):
        assert abs(found - want) < 0.08 * shrunk


def test_blank_or_flat_images_keep_their_full_extent():
    for image in (Image.new("L", (100, 80), 0), Image.new("L", (100, 80), 128)):
        assert head_box(image) == (0, 0, 100, 80)


def test_cropping_to_the_head_undoes_borders_off_centre_framing_and_aspect():
    image = random_slice(np.random.default_rng(2))
    crop = Preprocessing(crop_to_head=True)
    reference = crop(image)
    shifted = {
        "zoom-out": _bordered(image, 0.6),
        "off-centre": _bordered(image, 0.7, offset=(25, 20)),
        "aspect": Image.new("L", image.size).copy(),
    }
    squeezed = image.resize((round(image.width * 0.75), image.height), Image.Resampling.BILINEAR)
    shifted["aspect"].paste(squeezed, ((image.width - squeezed.width) // 2, 0))
    for name, variant in shifted.items():
        with_crop = _mean_abs_diff(crop(variant), reference)
        without = _mean_abs_diff(Preprocessing()(variant), Preprocessing()(image))
        assert with_crop < 0.35 * without, (name, with_crop, without)


def test_intensity_normalisation_undoes_brightness_and_contrast():
    image = random_slice(np.random.default_rng(3))
    values = np.asarray(image, dtype=float)
    darker = Image.fromarray(np.clip(values * 0.5 + 30, 0, 255).astype(np.uint8))
    normalise = Preprocessing(normalize_intensity=True)
    assert _mean_abs_diff(normalise(darker), normalise(image)) < 3.0
    assert _mean_abs_diff(Preprocessing()(darker), Preprocessing()(image)) > 15.0
    stretched = stretch_intensity(darker)
    assert np.percentile(np.asarray(stretched), 99.5) >= 250


def test_parameters_round_trip_and_unknown_ones_are_refused():
    spec = Preprocessing(size=128, crop_to_head=True, normalize_intensity=False)
    assert Preprocessing.from_json(spec.to_json()) == spec
    assert Preprocessing.from_dict({}) == Preprocessing()
    with pytest.raises(ValueError, match=r"unknown preprocessing parameters.*upgrade"):
        Preprocessing.from_dict({"size": 160, "skull_strip": True})


def test_preprocessing_is_deterministic_and_keeps_shape_for_any_source():
    image = _bordered(random_slice(np.random.default_rng(4)), 0.5).resize((512, 384))
    first, box = HEAD_AND_NORMALISE.apply(image)
    assert first.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, HEAD_AND_NORMALISE(np.asarray(image)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    np.testing.assert_array_equal(first, HEAD_AND_NORMALISE(buffer.getvalue()))
    assert 0 < box[0] < box[2] < 512 and 0 < box[1] < box[3] < 384
