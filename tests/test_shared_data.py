"""Tests on the real shared MRI dataset (skipped, with the reason, where it is absent)."""

import csv
import json

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from braintumor.cli import main
from braintumor.preprocessing import preprocess
from braintumor_training.dataset import load_arrays, scan_dataset

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]


def test_one_epoch_training_smoke_on_a_small_subset(shared_data, tmp_path):
    out = tmp_path / "smoke"
    args = ["train", "--data", str(shared_data), "--out", str(out), "--epochs", "1", "--limit-per-class", "16"]
    assert main(args) == 0
    audit = json.loads((out / "audit.json").read_text())
    assert audit["summary"]["test_images_with_near_duplicate_in_training"] >= 300
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert len(rows) == 1 and np.isfinite(float(rows[0]["loss"]))
    run = json.loads((out / "run.json").read_text())
    assert run["sessions"][0]["train_images"] == 4 * 16


def test_training_pixels_equal_sdk_pixels_on_real_mri_files(shared_data):
    records = scan_dataset(shared_data)[::500]  # RGB and grey JPEGs from both splits
    pixels, _ = load_arrays(shared_data, records)
    for i, record in enumerate(records):
        assert np.array_equal(pixels[i], preprocess((shared_data / record.path).read_bytes()))
