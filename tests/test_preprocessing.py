import io

import numpy as np
import pytest
from PIL import Image

from braintumor.config import IMAGE_SIZE
from braintumor.preprocessing import InvalidImageError, preprocess, preprocess_batch


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
