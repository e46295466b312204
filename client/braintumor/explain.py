"""Grad-CAM overlays: draw where the served model found the evidence for a class on the slice itself."""

from __future__ import annotations

import numpy as np
from PIL import Image

from braintumor.prediction import Prediction
from braintumor.preprocessing import ImageSource, Preprocessing, head_box, load_image, to_grey

#: Colour map anchors (value, RGB), a perceptually ordered dark-blue → red → yellow ramp.
_ANCHORS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[0, 0, 80], [40, 40, 200], [220, 40, 60], [255, 150, 0], [255, 255, 120]], dtype=np.float64)


def colourise(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with the overlay colour ramp."""
    v = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.interp(v, _ANCHORS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    return rgb.astype(np.uint8)


def upsample(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a low-resolution heatmap to ``size`` (width, height), keeping [0, 1]."""
    image = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F")
    return np.clip(np.asarray(image.resize(size, Image.Resampling.BILINEAR)), 0.0, 1.0)


def overlay(
    source: ImageSource,
    prediction: Prediction,
    alpha: float = 0.55,
    max_side: int = 512,
    frame: int | None = None,
    preprocessing: Preprocessing | None = None,
) -> Image.Image:
    """The slice in grey with the prediction's Grad-CAM map blended on top.

    Args:
        source: the image that was classified (anything the SDK accepts).
        prediction: a prediction made with ``explain=True``.
        alpha: opacity of the heatmap where it is strongest.
        max_side: the overlay is scaled down so that its longer side is at most this.
        frame: the frame of a multi-frame image.
        preprocessing: the preprocessing of the version that answered (``ServedModel.preprocessing``): when
            it crops to the head, the map covers that crop only, and is drawn there.

    Raises:
        ValueError: when the prediction carries no heatmap.
    """
    if prediction.heatmap is None:
        raise ValueError("this prediction has no heatmap: predict with explain=True")
    grey = to_grey(load_image(source, frame))
    left, top, right, bottom = head_box(grey) if preprocessing and preprocessing.crop_to_head else (0, 0, *grey.size)
    scale = min(1.0, max_side / max(grey.size))
    if scale < 1.0:
        grey = grey.resize((round(grey.width * scale), round(grey.height * scale)), Image.Resampling.BILINEAR)
        left, top, right, bottom = (round(v * scale) for v in (left, top, right, bottom))
    heat = np.zeros((grey.height, grey.width))
    if right > left and bottom > top:
        heat[top:bottom, left:right] = upsample(prediction.heatmap, (right - left, bottom - top))
    base = np.repeat(np.asarray(grey, dtype=np.float64)[:, :, None], 3, axis=2)
    weight = (alpha * heat)[:, :, None]
    blended = (1.0 - weight) * base + weight * colourise(heat)
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), mode="RGB")
