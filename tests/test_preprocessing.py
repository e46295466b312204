import io

import numpy as np
import pytest
from PIL import Image

from braintumor.config import IMAGE_SIZE
from braintumor.preprocessing import (
    InvalidImageError,
    Preprocessing,
    _main_components,
    _percentiles,
    head_box,
    load_image,
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


# -- exact library replacements and reduced-size JPEG decoding --------------------------------------------------
@pytest.mark.parametrize("seed", range(40))
def test_histogram_percentiles_equal_numpy_percentile_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    count = int(rng.choice([1, 2, 3, 7, 100, 4096, int(rng.integers(1, 300_000))]))
    kind = seed % 4
    if kind == 0:
        values = rng.integers(0, 256, count)
    elif kind == 1:  # mostly black, as a slice's background
        values = np.where(rng.random(count) < 0.7, 0, rng.integers(0, 256, count))
    elif kind == 2:
        values = np.clip(rng.normal(rng.uniform(0, 255), rng.uniform(0.1, 40), count), 0, 255)
    else:
        values = rng.choice(rng.integers(0, 256, 3), count)
    values = values.astype(np.uint8)
    percents = (0, 1, 50, 99, 99.5, 100, *rng.uniform(0, 100, 6))
    found = _percentiles(np.bincount(values, minlength=256), percents)
    expected = np.percentile(values.astype(np.float32), percents)
    assert [v.tobytes() for v in found] == [v.tobytes() for v in expected]


def test_main_components_keep_large_parts_and_drop_specks():
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:50, 10:50] = True  # the head: 1600 pixels
    mask[55:60, 55:60] = True  # 25 pixels, apart: dropped (< 10 %)
    mask[2:14, 54:62] = True  # 96 pixels: dropped
    mask[52:64, 0:14] = True  # 168 pixels: kept (>= 10 %)
    mask[50, 30] = mask[51, 31] = True  # touches the head; the second only diagonally: dropped
    kept = _main_components(mask)
    expected = np.zeros_like(mask)
    expected[10:50, 10:50] = expected[52:64, 0:14] = expected[50, 30] = True
    np.testing.assert_array_equal(kept, expected)
    assert not _main_components(np.zeros((8, 8), dtype=bool)).any()


def _jpeg(side: int, seed: int = 5, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    random_slice(np.random.default_rng(seed), side).convert(mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_jpeg_draft_round_trips_and_is_published_only_when_on():
    spec = Preprocessing(160, crop_to_head=True, normalize_intensity=True, jpeg_draft=True)
    assert spec.to_dict()["jpeg_draft"] is True
    assert Preprocessing.from_json(spec.to_json()) == spec
    # off (the default) it is not published: versions 1-3 keep their parameters, and older SDKs read them
    assert "jpeg_draft" not in Preprocessing(160, crop_to_head=True).to_json()
    assert Preprocessing.from_dict({"size": 160, "jpeg_draft": False}) == Preprocessing(160)


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
def test_a_bad_jpeg_draft_value_is_refused(value):
    with pytest.raises(ValueError, match=r"jpeg_draft must be true or false"):
        Preprocessing.from_dict({"size": 160, "jpeg_draft": value})


def test_draft_side_keeps_a_head_crop_at_the_output_size():
    assert Preprocessing(160, crop_to_head=True, jpeg_draft=True).draft_side == 240
    assert Preprocessing(160, jpeg_draft=True).draft_side == 160
    assert Preprocessing(160, crop_to_head=True).draft_side is None
    assert load_image(_jpeg(512), draft_side=240).size == (256, 256)  # 1/4 would give 128 < 240
    assert load_image(_jpeg(512), draft_side=160).size == (256, 256)
    assert load_image(_jpeg(512), draft_side=64).size == (64, 64)
    assert load_image(_jpeg(224), draft_side=240).size == (224, 224)  # never below the requested side


def test_jpeg_draft_tensor_shape_dtype_and_closeness_to_full_decoding():
    data = _jpeg(512)
    for crop in (False, True):
        full = Preprocessing(160, crop_to_head=crop, normalize_intensity=crop)(data)
        drafted = Preprocessing(160, crop_to_head=crop, normalize_intensity=crop, jpeg_draft=True)(data)
        assert drafted.shape == (160, 160, 3) and drafted.dtype == np.uint8
        assert (drafted[:, :, 0] == drafted[:, :, 2]).all()
        assert not np.array_equal(drafted, full)  # the decoding really was reduced
        assert _mean_abs_diff(drafted, full) < 3.0


def test_jpeg_draft_leaves_other_formats_and_decoded_images_alone():
    image = random_slice(np.random.default_rng(6), 512)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    on, off = (Preprocessing(160, crop_to_head=True, jpeg_draft=flag) for flag in (True, False))
    np.testing.assert_array_equal(on(buffer.getvalue()), off(buffer.getvalue()))
    np.testing.assert_array_equal(on(image), off(image))


@pytest.mark.parametrize("jpeg_draft", [False, True])
def test_one_image_the_batch_and_the_training_dataset_give_the_same_tensor(tmp_path, jpeg_draft):
    from braintumor_training.dataset import ImageRecord, load_arrays

    spec = Preprocessing(160, crop_to_head=True, normalize_intensity=True, jpeg_draft=jpeg_draft)
    paths = []
    for i, side in enumerate((512, 224)):
        paths.append(tmp_path / f"slice{i}.jpg")
        paths[-1].write_bytes(_jpeg(side, seed=10 + i, mode="RGB"))
    single = np.stack([spec(path) for path in paths])
    np.testing.assert_array_equal(preprocess_batch(paths, preprocessing=spec), single)
    records = [ImageRecord(path.name, "Training", "glioma") for path in paths]
    pixels, _ = load_arrays(tmp_path, records, preprocessing=spec, workers=2)
    np.testing.assert_array_equal(pixels, single)
    np.testing.assert_array_equal(spec(paths[0].read_bytes()), single[0])


def test_preprocessing_benchmark_reports_every_parameter_set_and_agrees_with_the_old_implementation():
    bench = pytest.importorskip("braintumor_serving.bench")
    results = bench.bench_preprocessing(seconds=0.1, side=320)
    for size in (320, 224):
        for name in ("v1", "v1_jpeg_draft", "v2_v3", "v2_v3_jpeg_draft"):
            assert results[f"ms_{size}_{name}"] > 0
    assert results["ms_320_v2_v3_before_14"] > 0 and results["rounds"] >= 20
