"""Training-time augmentation for MRI slices, applied to float pixels in [0, 255].

Slices come from different scanners and are framed and windowed differently, so the augmentation
varies geometry (left-right flip, small rotation, zoom) and intensity (brightness, contrast) mildly.
Each random layer takes its own seed, so a run is reproducible.
"""

from __future__ import annotations

import keras


def build_augmenter(seed: int, rotation: float = 0.03, zoom: float = 0.1, intensity: float = 0.1) -> keras.Sequential:
    """The augmentation pipeline.

    Args:
        seed: base seed; each layer draws from ``seed + k``.
        rotation: largest rotation as a fraction of a full turn (0.03 ≈ 11°).
        zoom: largest zoom in or out, as a fraction of the image side.
        intensity: largest brightness shift (fraction of 255) and contrast change.
    """
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(rotation, fill_mode="constant", seed=seed + 1),
            keras.layers.RandomZoom(zoom, fill_mode="constant", seed=seed + 2),
            keras.layers.RandomBrightness(intensity, value_range=(0.0, 255.0), seed=seed + 3),
            keras.layers.RandomContrast(intensity, value_range=(0.0, 255.0), seed=seed + 4),
        ],
        name="augment",
    )
