"""Synthetic folder-per-class MRI-like datasets for tests that must run anywhere."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from braintumor.config import LABELS


def random_slice(rng: np.random.Generator, size: int = 224, label: int = 0) -> Image.Image:
    """A grey image with a dark background, a bright disc (the 'head') and a class-dependent blob."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    field = rng.normal(size=(8, 8))
    texture = np.array(
        Image.fromarray(field.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BICUBIC)
    )
    head = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.16
    cx, cy = [(0.35, 0.35), (0.65, 0.35), (0.5, 0.5), (0.5, 0.7)][label % 4]
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.004) * (label != 2)
    image = head * (110 + 25 * texture) + 120 * blob
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="L")


def near_copy(image: Image.Image) -> Image.Image:
    """A re-encoded, resized and slightly brighter copy: a near duplicate, not an exact one."""
    buffer = io.BytesIO()
    image.resize((200, 200)).resize(image.size).save(buffer, format="JPEG", quality=70)
    return ImageEnhance.Brightness(Image.open(buffer)).enhance(1.05)


def make_dataset(root: Path, per_class: dict[str, int], seed: int = 0, size: int = 224) -> Path:
    """Write ``root/<split>/<label>/*.png`` with ``per_class[split]`` distinct images per class."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for k, label in enumerate(LABELS):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                random_slice(rng, size, k).save(folder / f"{split[:2]}_{label}_{i:03d}.png")
    return root


def make_manifest_dataset(root: Path, per_stratum: int = 4, seed: int = 0, size: int = 96) -> Path:
    """Write a tiny manifest dataset (``root/manifest.csv`` and ``root/images/``), like ``mri-external``.

    Two sources and three sequences; findings glioma, meningioma, other_tumor, tumor and notumor; each
    image drawn anew (no near duplicates), ``per_stratum`` of each (source, sequence, finding).
    """
    rng = np.random.default_rng(seed)
    strata = [
        ("feltrin", sequence, finding)
        for sequence in ("T1", "T1C", "T2")
        for finding in ("glioma", "meningioma", "other_tumor", "notumor")
    ] + [("br35h", "unknown", "tumor")]
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["path,source,sequence,finding,detail,original"]
    for source, sequence, finding in strata:
        label = LABELS.index(finding) if finding in LABELS else 3
        for i in range(per_stratum):
            image = random_slice(rng, size, label)
            if sequence == "T2":  # bright fluid: invert the head
                pixels = np.asarray(image)
                image = Image.fromarray(np.where(pixels > 8, 255 - pixels, 0).astype(np.uint8), mode="L")
            name = f"images/{source}_{sequence}_{finding}_{i:03d}.jpg"
            image.save(root / name, quality=95)
            rows.append(f"{name},{source},{sequence},{finding},{finding},orig/{i}.jpg")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root
