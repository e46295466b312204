"""Manifest datasets (mri-external): reading and checking rows, the split by near-duplicate group, the set
cross-entropy for tumours of another or unstated type, the sequence-contrast augmentation. A tiny run
trained on both datasets is in test_train_export.py."""

import subprocess
import sys

import numpy as np
import pytest

from synthetic import make_dataset, make_manifest_dataset, random_slice

tf = pytest.importorskip("tensorflow")
import keras

from braintumor.config import LABELS, NO_TUMOR_INDEX
from braintumor_training.augment import RandomIntensityRemap, RandomInversion, build_augmenter
from braintumor_training.external import (
    ManifestError,
    external_split,
    read_manifest,
    split_groups,
    target_mask,
)
from braintumor_training.train import SetCrossEntropy, balanced_weights, set_accuracy


def test_balanced_weights_per_kind_and_split_between_the_datasets_of_a_kind():
    kinds = np.array(["notumor"] * 12 + ["tumor"] * 4 + ["glioma"] * 5, dtype=object)
    sources = np.array(["kaggle"] * 10 + ["external"] * 6 + ["kaggle"] * 3 + ["external"] * 2, dtype=object)
    plain, split = balanced_weights(kinds), balanced_weights(kinds, sources)
    for weights in (plain, split):  # every kind weighs the same, and the weights sum to the number of images
        assert weights.sum() == pytest.approx(len(kinds))
        for kind in ("notumor", "tumor", "glioma"):
            assert weights[kinds == kind].sum() == pytest.approx(len(kinds) / 3)
    # split: within a kind each dataset gets half, however few images it has there
    for kind in ("notumor", "glioma"):
        for source in ("kaggle", "external"):
            assert split[(kinds == kind) & (sources == source)].sum() == pytest.approx(len(kinds) / 6)
    assert split[(kinds == "notumor") & (sources == "external")][0] == pytest.approx(3 * plain[0])  # 2 of 12 get half


@pytest.fixture(scope="module")
def manifest_data(tmp_path_factory):
    return make_manifest_dataset(tmp_path_factory.mktemp("external"), per_stratum=6, seed=5)


def test_target_masks_allow_the_class_or_every_tumour_class():
    assert target_mask("glioma").tolist() == [1, 0, 0, 0]
    assert target_mask("notumor").tolist() == [0, 0, 1, 0]
    for finding in ("tumor", "other_tumor"):
        mask = target_mask(finding)
        assert mask[NO_TUMOR_INDEX] == 0 and mask.sum() == len(LABELS) - 1
    with pytest.raises(ValueError, match="unknown finding"):
        target_mask("granuloma")


def test_set_cross_entropy_is_keras_cross_entropy_for_classes_and_tumour_loss_otherwise():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, len(LABELS))).astype(np.float32)
    one_hot = np.eye(len(LABELS), dtype=np.float32)[[0, 1, 2, 3, 0, 2]]
    ours = SetCrossEntropy(0.1, reduction=None)(one_hot, logits).numpy()
    keras_loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1, reduction=None)
    np.testing.assert_allclose(ours, keras_loss(one_hot, logits).numpy(), rtol=1e-5)

    tumour = np.stack([target_mask("tumor")] * 6)
    p_no = tf.nn.softmax(logits).numpy()[:, NO_TUMOR_INDEX]
    np.testing.assert_allclose(
        SetCrossEntropy(0.0, reduction=None)(tumour, logits).numpy(), -np.log(1 - p_no), rtol=1e-5
    )
    # a tumour-only target is right whatever tumour class comes first, wrong when notumor does
    predicted = np.eye(len(LABELS), dtype=np.float32)[[0, 1, 3, 2, 2, 0]] * 5
    assert set_accuracy(tumour, predicted).numpy().tolist() == [1, 1, 1, 0, 0, 1]


def test_manifest_is_read_and_checked(manifest_data):
    records = read_manifest(manifest_data)
    assert len(records) == 13 * 6
    assert {r.sequence for r in records} == {"T1", "T1C", "T2", "unknown"}
    tumour_only = [r for r in records if r.finding in ("tumor", "other_tumor")]
    assert tumour_only and all(r.label_index is None and r.is_tumor for r in tumour_only)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda row: row.replace(",glioma,glioma,", ",granuloma,glioma,"), "unknown finding 'granuloma'"),
        (lambda row: row.replace(",T1,", ",PD,"), "unknown sequence 'PD'"),
        (lambda row: row.replace(".jpg,", "-gone.jpg,", 1), "file not found"),
    ],
)
def test_a_bad_manifest_row_is_named(manifest_data, tmp_path, change, message):
    lines = (manifest_data / "manifest.csv").read_text().splitlines()
    target = next(i for i, line in enumerate(lines) if ",T1,glioma," in line)
    lines[target] = change(lines[target])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "images").symlink_to(manifest_data / "images")
    (bad / "manifest.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=f"line {target + 1} .*{message}"):
        read_manifest(bad)


@pytest.mark.slow  # starts braintumor train
def test_an_unreadable_image_stops_training_before_the_run_folder_exists(manifest_data, tmp_path):
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    lines = (manifest_data / "manifest.csv").read_text().splitlines()
    for line in lines[1:]:
        name = line.split(",")[0]
        (bad / name).write_bytes((manifest_data / name).read_bytes())
    broken = lines[7].split(",")[0]
    (bad / broken).write_bytes(b"not a jpeg at all")
    (bad / "manifest.csv").write_text("\n".join(lines) + "\n")
    data = make_dataset(tmp_path / "data", {"Training": 3, "Testing": 1}, seed=1)
    out = tmp_path / "runs" / "never"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "braintumor.cli",
            "train",
            "--data",
            str(data),
            "--external",
            str(bad),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("braintumor train:")]
    assert len(errors) == 1 and "line 8" in errors[0] and "unreadable" in errors[0], result.stderr[-2000:]
    assert not out.exists(), "a refused run must leave nothing behind"


def test_split_keeps_every_group_on_one_side_and_is_seeded():
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 120, size=600)
    strata = [f"s{g % 5}" for g in groups]
    parts = np.array(split_groups(strata, groups, seed=3))
    for g in np.unique(groups):
        assert len(set(parts[groups == g])) == 1
    shares = {p: float((parts == p).mean()) for p in ("train", "val", "test")}
    assert 0.55 < shares["train"] < 0.85 and 0.04 < shares["val"] < 0.2 and 0.1 < shares["test"] < 0.3
    assert split_groups(strata, groups, seed=3) == parts.tolist()
    assert split_groups(strata, groups, seed=4) != parts.tolist()


def test_external_images_near_a_training_image_stay_in_training(manifest_data, tmp_path):
    records = read_manifest(manifest_data)
    free = external_split(records, threshold=24, seed=0)
    held_out = [r for r in records if free["parts"][r.path] != "train"]
    assert held_out, "the tiny split holds some images out"
    twin = tmp_path / "twin.png"
    from PIL import Image

    Image.open(held_out[0].path).save(twin)  # the same picture in the other dataset's Training
    tied = external_split(records, threshold=24, seed=0, training_images=[twin])
    assert tied["parts"][held_out[0].path] == "train" and tied["near_other_training"] >= 1


def test_sequence_contrast_transforms_keep_the_background_black_and_are_seeded():
    rng = np.random.default_rng(2)
    batch = np.stack([np.asarray(random_slice(rng, 64, k % 4), np.float32) for k in range(8)])[..., None]
    batch = tf.constant(np.repeat(batch, 3, axis=-1))
    background = batch.numpy() <= 8
    remapped = RandomIntensityRemap(probability=1.0, seed=7)(batch).numpy()
    assert np.all(remapped[background] == 0)
    assert np.abs(remapped - batch.numpy())[~background].mean() > 20
    assert np.array_equal(remapped, RandomIntensityRemap(probability=1.0, seed=7)(batch).numpy())
    inverted = RandomInversion(probability=1.0, seed=7)(batch).numpy()
    assert np.all(inverted[background] == 0)
    np.testing.assert_allclose(inverted[~background], 263.0 - batch.numpy()[~background])
    untouched = RandomIntensityRemap(probability=0.0, seed=7)(batch).numpy()
    np.testing.assert_array_equal(untouched, batch.numpy())
    augmented = build_augmenter(0, "sequence")(batch)
    assert augmented.shape == batch.shape and float(tf.reduce_min(augmented)) >= 0
