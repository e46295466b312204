"""Image preprocessing: the one implementation used by training, evaluation and the client SDK.

A served model takes uint8 pixels (scaling to the network's range happens inside the model), so
preprocessing is only: decode, convert to grey, resize to the model's square input and repeat the grey
channel three times. Keeping it this small and in pure Pillow/NumPy makes it bit-exact wherever it
runs.
"""

from __future__ import annotations

import io
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from braintumor.config import CHANNELS, IMAGE_SIZE

ImageSource = str | PathLike | bytes | Image.Image | np.ndarray


class InvalidImageError(ValueError):
    """The input could not be read as an image, or has an unusable shape."""


def load_image(source: ImageSource) -> Image.Image:
    """Decode ``source`` into a Pillow image.

    Args:
        source: a file path, encoded image bytes, a Pillow image or a NumPy array (H×W grey or
            H×W×C with C in 1, 3, 4).

    Returns:
        A fully loaded Pillow image.

    Raises:
        InvalidImageError: when the input is not a readable image.
    """
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _array_to_image(source)
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else Path(source))
        image.load()
    except FileNotFoundError as err:
        raise InvalidImageError(f"no such file: {source}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
        raise InvalidImageError(f"cannot read {name} as an image: {err}") from err
    return image


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        if array.dtype != np.uint8:
            raise InvalidImageError(f"arrays must be uint8, got {array.dtype}")
        return Image.fromarray(array)
    raise InvalidImageError(f"arrays must be H×W or H×W×C (C in 1, 3, 4), got shape {array.shape}")


def preprocess(source: ImageSource, size: int = IMAGE_SIZE) -> np.ndarray:
    """Turn one image into the model's input tensor.

    Args:
        source: anything :func:`load_image` accepts.
        size: side of the square output, in pixels.

    Returns:
        A ``uint8`` array of shape ``(size, size, 3)``: the grey image, bilinearly resized, repeated
        over three channels.
    """
    grey = load_image(source).convert("L")
    if grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(grey, dtype=np.uint8)
    return np.repeat(pixels[:, :, None], CHANNELS, axis=2)


def preprocess_batch(sources: list[ImageSource], size: int = IMAGE_SIZE) -> np.ndarray:
    """Preprocess several images into one ``uint8`` batch of shape ``(n, size, size, 3)``."""
    batch = np.empty((len(sources), size, size, CHANNELS), dtype=np.uint8)
    for i, source in enumerate(sources):
        batch[i] = preprocess(source, size)
    return batch
