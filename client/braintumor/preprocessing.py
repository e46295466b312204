"""Image preprocessing: the one implementation used by training, evaluation and the client SDK.

A served model takes uint8 pixels (scaling to the network's range happens inside the model), so
preprocessing is: decode, convert to 8-bit grey, resize to the model's square input (bilinear) and
repeat the grey channel three times. It is pure Pillow/NumPy, so it is bit-exact wherever it runs.

Decoding accepts paths, bytes, Pillow images and NumPy arrays; JPEG, PNG, BMP, TIFF and anything else
Pillow reads, in 8 or 16 bits, grey, RGB, RGBA, palette or CMYK; and DICOM through pydicom (rescale
slope/intercept, VOI LUT windowing, MONOCHROME1 inversion). Only pixels leave this module: DICOM header
data (patient data) is neither returned, sent nor written into error messages.
"""

from __future__ import annotations

import io
import warnings
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from braintumor.config import CHANNELS, IMAGE_SIZE
from braintumor.errors import InvalidImageError

ImageSource = str | PathLike | bytes | Image.Image | np.ndarray

#: Largest image accepted, in pixels (a decompression-bomb guard: 8192 × 8192).
MAX_PIXELS = 8192 * 8192
#: Smallest side accepted, in pixels: smaller images hold no usable anatomy.
MIN_SIDE = 16

__all__ = ["MAX_PIXELS", "MIN_SIDE", "ImageSource", "InvalidImageError", "load_image", "preprocess", "to_grey"]


def _is_dicom(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def _describe(source: ImageSource) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)


def load_image(source: ImageSource, frame: int | None = None) -> Image.Image:
    """Decode ``source`` into a Pillow image.

    Args:
        source: a file path, encoded bytes (any Pillow format, or DICOM), a Pillow image, or a NumPy
            array (H×W or H×W×C with C in 1, 3, 4; uint8 or uint16).
        frame: which frame of a multi-frame image (DICOM, TIFF) to use; required when there are several.

    Returns:
        A fully loaded Pillow image.

    Raises:
        InvalidImageError: when the input is not a usable image; the message says why.
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _array_to_image(source)
    else:
        image = _decode(source, frame)
    _check_size(image)
    return image


def _decode(source: str | PathLike | bytes, frame: int | None) -> Image.Image:
    name = _describe(source)
    try:
        data = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    except FileNotFoundError as err:
        raise InvalidImageError(f"no such file: {name}") from err
    except IsADirectoryError as err:
        raise InvalidImageError(f"{name} is a folder, not an image") from err
    except OSError as err:
        raise InvalidImageError(f"cannot read {name}: {err.strerror}") from err
    if not data:
        raise InvalidImageError(f"{name} is empty")
    if _is_dicom(data[:132]):
        return _load_dicom(data, name, frame)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image)  # before decoding the pixels
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                if frame is None:
                    raise InvalidImageError(f"{name} has {frames} frames: choose one (frame=0..{frames - 1})")
                image.seek(frame)
            image.load()
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InvalidImageError(f"{name} is too large to decode safely: {err}") from err
    except UnidentifiedImageError as err:
        raise InvalidImageError(f"cannot read {name} as an image: not a recognised image format") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InvalidImageError(f"cannot read {name} as an image: {err}") from err
    return image


def _load_dicom(data: bytes, name: str, frame: int | None) -> Image.Image:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as err:  # pragma: no cover - pydicom is a dependency
        raise InvalidImageError(f"{name} is DICOM, and reading DICOM needs pydicom") from err
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as err:
        raise InvalidImageError(f"cannot read {name} as DICOM: {type(err).__name__}") from err
    if "PixelData" not in dataset:
        raise InvalidImageError(f"{name} is a DICOM file without pixel data")
    try:
        pixels = dataset.pixel_array
    except Exception as err:
        raise InvalidImageError(f"cannot decode the pixel data of {name}: {type(err).__name__}") from err
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        if frame is None or not 0 <= frame < frames:
            raise InvalidImageError(
                f"{name} is a multi-frame DICOM with {frames} frames: choose one (frame=0..{frames - 1})"
            )
        pixels = pixels[frame]
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("MONOCHROME"):
        values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset).astype(np.float64)
        if photometric == "MONOCHROME1":  # high values are dark: invert
            values = values.max() + values.min() - values
        return Image.fromarray(_to_uint8(values), mode="L")
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return Image.fromarray(_to_uint8(pixels.astype(np.float64)), mode="RGB")
    raise InvalidImageError(f"{name}: unsupported DICOM photometric interpretation {photometric}")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Stretch any numeric array to 0–255 (min to 0, max to 255) and round to uint8."""
    low, high = float(np.min(values)), float(np.max(values))
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InvalidImageError(f"arrays must be H×W or H×W×C (C in 1, 3, 4), got shape {array.shape}")
    if array.dtype == np.uint16 and array.ndim == 2:
        return Image.fromarray(_to_uint8(array.astype(np.float64)), mode="L")
    if array.dtype != np.uint8:
        raise InvalidImageError(f"arrays must be uint8 (or grey uint16), got {array.dtype}")
    return Image.fromarray(array)


def _check_size(image: Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise InvalidImageError(f"image is {width}×{height} pixels, more than the {MAX_PIXELS:,} allowed")
    if min(width, height) < MIN_SIDE:
        raise InvalidImageError(f"image is {width}×{height} pixels; at least {MIN_SIDE}×{MIN_SIDE} is needed")


def to_grey(image: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit grey (mode ``L``).

    8-bit images go through Pillow's own conversion (ITU-R 601-2 luma for colour; palette and CMYK via
    RGB). Images with more than 8 bits (``I;16``, ``I``, ``F``) are stretched from their minimum to their
    maximum, as a viewer's default window would.
    """
    if image.mode == "L":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(_to_uint8(values), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("L")


def preprocess(source: ImageSource, size: int = IMAGE_SIZE, frame: int | None = None) -> np.ndarray:
    """Turn one image into the model's input tensor.

    Args:
        source: anything :func:`load_image` accepts.
        size: side of the square output, in pixels.
        frame: the frame of a multi-frame image.

    Returns:
        A ``uint8`` array of shape ``(size, size, 3)``: the grey image, bilinearly resized, repeated
        over three channels.

    Raises:
        InvalidImageError: when the input is not a usable image.
    """
    grey = to_grey(load_image(source, frame))
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
