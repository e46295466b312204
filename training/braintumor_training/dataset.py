"""Folder-per-class datasets: ``DATA_DIR/<split>/<label>/<image>``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from braintumor.config import IMAGE_SIZE, IMAGE_SUFFIXES, LABELS
from braintumor.preprocessing import Preprocessing

if TYPE_CHECKING:
    from braintumor_training.external import ManifestRecord

TRAIN_SPLIT = "Training"
TEST_SPLIT = "Testing"


class DatasetError(ValueError):
    """The dataset folder is missing or not laid out as ``<split>/<label>/<image>``."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of the dataset.

    Args:
        path: path of the file, relative to the dataset root.
        split: the dataset split folder (``Training`` or ``Testing``).
        label: the class folder name.
    """

    path: str
    split: str
    label: str

    @property
    def label_index(self) -> int:
        """Index of :attr:`label` in :data:`braintumor.config.LABELS`."""
        return LABELS.index(self.label)


def scan_dataset(data_dir: Path, splits: Sequence[str] = (TRAIN_SPLIT, TEST_SPLIT)) -> list[ImageRecord]:
    """List every image file of ``splits`` under ``data_dir``, sorted by path.

    Raises:
        DatasetError: when a split folder is missing or holds an unknown class folder.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"dataset folder not found: {data_dir}")
    records: list[ImageRecord] = []
    for split in splits:
        split_dir = data_dir / split
        if not split_dir.is_dir():
            raise DatasetError(f"missing split folder {split_dir} (expected {data_dir}/<split>/<label>/)")
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if class_dir.name not in LABELS:
                raise DatasetError(f"unknown class folder {class_dir}; expected one of {', '.join(LABELS)}")
            for file in sorted(class_dir.iterdir()):
                if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                    records.append(ImageRecord(str(file.relative_to(data_dir)), split, class_dir.name))
    if not records:
        raise DatasetError(f"no images found under {data_dir}")
    return records


def load_arrays(
    data_dir: Path,
    records: Iterable[ImageRecord | ManifestRecord],
    size: int = IMAGE_SIZE,
    workers: int = 4,
    preprocessing: Preprocessing | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess ``records`` with the client SDK's :class:`~braintumor.preprocessing.Preprocessing`.

    Args:
        data_dir: dataset root (manifest records hold absolute paths).
        records: the images.
        size: side of the output when ``preprocessing`` is not given (then a plain resize).
        workers: preprocessing threads.
        preprocessing: the model version's preprocessing parameters.

    Returns:
        ``(pixels, labels)``: uint8 ``(n, size, size, 3)`` and int32 ``(n,)`` (-1 for a tumour whose type is
        not one of the classes or not given).
    """
    records = list(records)
    data_dir = Path(data_dir)
    preprocessing = preprocessing or Preprocessing(size)
    pixels = np.empty((len(records), preprocessing.size, preprocessing.size, 3), dtype=np.uint8)

    def _one(i: int) -> None:
        pixels[i] = preprocessing(data_dir / records[i].path)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_one, range(len(records))))
    labels = np.array([-1 if r.label_index is None else r.label_index for r in records], dtype=np.int32)
    return pixels, labels
