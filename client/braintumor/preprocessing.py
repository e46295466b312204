"""Image preprocessing: the one implementation used by training, evaluation and the client SDK.

A served model takes uint8 pixels (scaling to the network's range happens inside the model), so
preprocessing is: decode, convert to 8-bit grey, resize to the model's square input (bilinear) and
repeat the grey channel three times. It is pure Pillow/NumPy/SciPy, so it is bit-exact wherever it runs.

Decoding accepts paths, bytes, Pillow images and NumPy arrays; JPEG, PNG, BMP, TIFF and anything else
Pillow reads, in 8 or 16 bits, grey, RGB, RGBA, palette or CMYK; and DICOM through pydicom (rescale
slope/intercept, VOI LUT windowing, MONOCHROME1 inversion). Only pixels leave this module: DICOM header
data (patient data) is neither returned, sent nor written into error messages.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from braintumor.config import CHANNELS, IMAGE_SIZE
from braintumor.errors import InvalidImageError

ImageSource = str | PathLike | bytes | Image.Image | np.ndarray

#: Largest image accepted, in pixels (a decompression-bomb guard: 8192 × 8192).
MAX_PIXELS = 8192 * 8192
#: Smallest side accepted, in pixels: smaller images hold no usable anatomy.
MIN_SIDE = 16
#: With ``jpeg_draft`` and ``crop_to_head``, a JPEG is decoded with at least this many times the output size
#: on its shorter side, so that a head filling two thirds of the slice still gets ``size`` pixels or more.
DRAFT_HEAD_ALLOWANCE = 1.5

__all__ = [
    "MAX_PIXELS",
    "MIN_SIDE",
    "ImageSource",
    "InvalidImageError",
    "Preprocessing",
    "head_box",
    "load_image",
    "preprocess",
    "preprocess_batch",
    "stretch_intensity",
    "to_grey",
]


def _is_dicom(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def _describe(source: ImageSource) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)


def load_image(source: ImageSource, frame: int | None = None, draft_side: int | None = None) -> Image.Image:
    """Decode ``source`` into a Pillow image.

    Args:
        source: a file path, encoded bytes (any Pillow format, or DICOM), a Pillow image, or a NumPy
            array (H×W or H×W×C with C in 1, 3, 4; uint8 or uint16).
        frame: which frame of a multi-frame image (DICOM, TIFF) to use; required when there are several.
        draft_side: when given, a JPEG file or bytes is decoded straight to grey (its luma) and at the
            smallest DCT scale (1/8, 1/4, 1/2 or 1) that keeps its shorter side at least ``draft_side``
            pixels (Pillow's ``Image.draft``). This changes the pixels; other formats ignore it.

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
        image = _decode(source, frame, draft_side)
    _check_size(image)
    return image


def _decode(source: str | PathLike | bytes, frame: int | None, draft_side: int | None = None) -> Image.Image:
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
            if draft_side and image.format == "JPEG":
                image.draft("L", (draft_side, draft_side))
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

    Args:
        image: a decoded image of any mode.
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


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become one model version's input: the shared preprocessing, with its parameters.

    Every step is pure Pillow/NumPy/SciPy and deterministic, so training, evaluation and every client produce
    bit-identical tensors. The parameters are published with each model version (``preprocessing.json``
    beside its model, and a ``preprocessing`` parameter of its Triton configuration that the SDK reads), so
    each served version gets exactly the preprocessing it was trained with.

    Args:
        size: side of the square output, in pixels.
        crop_to_head: crop to the head before resizing (:func:`head_box`), so that the framing of the
            scan (black borders, an off-centre head, a different field of view or pixel aspect) no longer
            changes what the model sees.
        normalize_intensity: stretch the cropped image's 1st–99.5th intensity percentiles to 0–255, so
            that a scanner's or viewer's brightness and contrast no longer change what the model sees.
        jpeg_draft: decode JPEG files and bytes at a reduced DCT scale, straight to grey (see
            :attr:`draft_side`): faster for large JPEGs, but the pixels differ from a full decoding, so it is
            a parameter of a model version like the others. Published only when true, so versions without
            it keep their published parameters (and older SDKs keep reading them).
    """

    size: int = IMAGE_SIZE
    crop_to_head: bool = False
    normalize_intensity: bool = False
    jpeg_draft: bool = False

    @property
    def draft_side(self) -> int | None:
        """The shorter side a JPEG is decoded to at least with :attr:`jpeg_draft` (else ``None``): the output
        size, times :data:`DRAFT_HEAD_ALLOWANCE` when cropping to the head (the crop must keep ``size``
        pixels). A 512-pixel slice then decodes at 256 for a 160-pixel crop; a 224-pixel one is not reduced.
        """
        if not self.jpeg_draft:
            return None
        return math.ceil(self.size * DRAFT_HEAD_ALLOWANCE) if self.crop_to_head else self.size

    def __call__(self, source: ImageSource, frame: int | None = None) -> np.ndarray:
        """Turn one image into the model's input tensor: ``uint8`` of shape ``(size, size, 3)``.

        Args:
            source: anything :func:`load_image` accepts.
            frame: the frame of a multi-frame image.

        Raises:
            InvalidImageError: when the input is not a usable image.
        """
        return self.apply(to_grey(load_image(source, frame, self.draft_side)))[0]

    def apply(self, grey: Image.Image) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """Preprocess an 8-bit grey image; also return the box ``(left, top, right, bottom)`` it kept.

        Args:
            grey: an already decoded image of mode ``L`` (:attr:`jpeg_draft` plays no part here).
        """
        box = head_box(grey) if self.crop_to_head else (0, 0, grey.width, grey.height)
        if box != (0, 0, grey.width, grey.height):
            grey = grey.crop(box)
        if self.normalize_intensity:
            grey = stretch_intensity(grey)
        if grey.size != (self.size, self.size):
            grey = grey.resize((self.size, self.size), Image.Resampling.BILINEAR)
        pixels = np.asarray(grey, dtype=np.uint8)
        return np.repeat(pixels[:, :, None], CHANNELS, axis=2), box

    def to_dict(self) -> dict[str, int | bool]:
        """The parameters, as published with a model version (``jpeg_draft`` only when true)."""
        values = asdict(self)
        if not self.jpeg_draft:
            del values["jpeg_draft"]
        return values

    def to_json(self) -> str:
        """The parameters as compact JSON (the form of the Triton configuration parameter)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        """Parameters published with a model version.

        Args:
            values: the parsed ``preprocessing.json``; missing parameters take their defaults.

        Raises:
            ValueError: on an unknown parameter (so that a newer model is never fed older preprocessing)
                or a value of the wrong type.
        """
        if not isinstance(values, dict):
            raise ValueError(f"preprocessing parameters must be a JSON object, got {type(values).__name__}")
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown preprocessing parameters {sorted(unknown)}: upgrade the braintumor SDK")
        size = values.get("size", IMAGE_SIZE)
        if not isinstance(size, int) or isinstance(size, bool) or size < MIN_SIDE:
            raise ValueError(f"preprocessing size must be an integer of at least {MIN_SIDE}, got {size!r}")
        flags = {name: values.get(name, False) for name in ("crop_to_head", "normalize_intensity", "jpeg_draft")}
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise ValueError(f"preprocessing {name} must be true or false, got {flag!r}")
        return cls(size=size, **flags)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        """Parse :meth:`to_json`'s form (see :meth:`from_dict`).

        Args:
            text: the JSON object.
        """
        return cls.from_dict(json.loads(text))


#: Side of the thumbnail :func:`head_box` analyses.
_BOX_THUMBNAIL = 64
#: Share of the foreground mass :func:`head_box` may leave out on each side (burnt-in text, noise specks).
_BOX_TAIL = 0.005
#: Margin added around the head, as a share of its box's side.
_BOX_MARGIN = 0.03


def _main_components(mask: np.ndarray, keep: float = 0.1) -> np.ndarray:
    """The parts of ``mask`` in 4-connected components of at least ``keep`` × the largest one's area, so that
    burnt-in text, rulers and stray specks apart from the head are dropped (``scipy.ndimage.label``)."""
    from scipy import ndimage  # imported when first needed: most of the SDK never crops

    labels, count = ndimage.label(mask)  # the default structure of a 2-D label is the 4-connected cross
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    kept = sizes >= keep * sizes[1:].max()
    kept[0] = False
    return kept[labels]


def _percentiles(histogram: Sequence[int], percents: tuple[float, ...]) -> list[np.float64]:
    """``np.percentile(values, percents)`` of 8-bit values, bit for bit, from their 256-bin histogram.

    The same linear interpolation between the same two order statistics, in the same float64 arithmetic
    (NumPy's ``_lerp``, which counts back from the upper one for weights of one half or more), without
    sorting the values.

    Args:
        histogram: how many values of each level 0–255 (Pillow's ``Image.histogram`` of an ``L`` image).
        percents: percentiles, each in 0–100.
    """
    cumulative = np.cumsum(histogram)
    count = int(cumulative[-1])
    found = []
    for percent in percents:
        virtual = (count - 1) * (percent / 100)
        if virtual >= count - 1:
            found.append(np.float64(np.searchsorted(cumulative, count - 1, side="right")))
            continue
        below = math.floor(virtual)
        low, high = (float(v) for v in np.searchsorted(cumulative, (below, below + 1), side="right"))
        weight = virtual - below
        found.append(np.float64(high - (high - low) * (1 - weight) if weight >= 0.5 else low + (high - low) * weight))
    return found


def head_box(grey: Image.Image) -> tuple[int, int, int, int]:
    """The box ``(left, top, right, bottom)`` around the head in an 8-bit grey MRI slice.

    Foreground is what is brighter than 15 % of the way from the background level (1st percentile) to the
    bright tissue (99th percentile) on a box-filtered thumbnail; the box keeps all but 0.5 % of the
    foreground on each side, plus a 3 % margin. Foreground parts apart from the head and much smaller than it
    (burnt-in text, rulers, specks) are left out first.
    Images without a clear foreground, or whose box would be tiny, keep their full extent.

    Args:
        grey: an image of mode ``L``.
    """
    full = (0, 0, grey.width, grey.height)
    scale = max(grey.width, grey.height) / _BOX_THUMBNAIL
    thumb = (
        grey
        if scale <= 1
        else grey.resize((max(1, round(grey.width / scale)), max(1, round(grey.height / scale))), Image.Resampling.BOX)
    )
    values = np.asarray(thumb, dtype=np.float32)
    low, high = _percentiles(thumb.histogram(), (1, 99))
    if high - low < 8:
        return full
    mask = _main_components(values > low + 0.15 * (high - low))
    total = mask.sum()
    if total == 0:
        return full
    box = []
    for axis, extent in ((0, values.shape[1]), (1, values.shape[0])):
        mass = np.cumsum(mask.sum(axis=axis)) / total
        start = int(np.searchsorted(mass, _BOX_TAIL, side="right"))
        stop = int(np.searchsorted(mass, 1 - _BOX_TAIL, side="left")) + 1
        margin = (stop - start) * _BOX_MARGIN
        box.append((max(0.0, start - margin) / extent, min(float(extent), stop + margin) / extent))
    (x0, x1), (y0, y1) = box
    left, right = round(x0 * grey.width), round(x1 * grey.width)
    top, bottom = round(y0 * grey.height), round(y1 * grey.height)
    if right - left < 0.2 * grey.width or bottom - top < 0.2 * grey.height:
        return full
    return left, top, right, bottom


def stretch_intensity(grey: Image.Image) -> Image.Image:
    """Map the 1st and 99.5th intensity percentiles of an 8-bit grey image to 0 and 255 (clipping beyond).

    The mapping is computed once for each of the 256 levels, in the float32 arithmetic a per-pixel
    computation would use, and applied as a lookup table (``Image.point``).

    Args:
        grey: an image of mode ``L``.
    """
    low, high = _percentiles(grey.histogram(), (1, 99.5))
    if high - low < 1:
        return grey
    levels = np.arange(256, dtype=np.float32)
    table = np.clip(np.rint((levels - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    return grey.point(table.tolist())


def preprocess(
    source: ImageSource, size: int = IMAGE_SIZE, frame: int | None = None, preprocessing: Preprocessing | None = None
) -> np.ndarray:
    """Turn one image into the model's input tensor.

    Args:
        source: anything :func:`load_image` accepts.
        size: side of the square output, in pixels (when ``preprocessing`` is not given).
        frame: the frame of a multi-frame image.
        preprocessing: the parameters of the model version the tensor is for; default: a plain resize
            to ``size`` (the preprocessing of version 1).

    Returns:
        A ``uint8`` array of shape ``(size, size, 3)``: the grey image, bilinearly resized, repeated
        over three channels.

    Raises:
        InvalidImageError: when the input is not a usable image.
    """
    return (preprocessing or Preprocessing(size))(source, frame)


def preprocess_batch(
    sources: list[ImageSource], size: int = IMAGE_SIZE, preprocessing: Preprocessing | None = None
) -> np.ndarray:
    """Preprocess several images into one ``uint8`` batch of shape ``(n, size, size, 3)``.

    Args:
        sources: anything :func:`load_image` accepts, one per image.
        size: side of the output when ``preprocessing`` is not given (then a plain resize).
        preprocessing: the parameters of the model version the batch is for.
    """
    preprocessing = preprocessing or Preprocessing(size)
    batch = np.empty((len(sources), preprocessing.size, preprocessing.size, CHANNELS), dtype=np.uint8)
    for i, source in enumerate(sources):
        batch[i] = preprocessing(source)
    return batch
