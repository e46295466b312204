import json
import shutil

import numpy as np
import pytest

from braintumor.cli import main
from braintumor_training.audit import audit_dataset, duplicate_groups, hamming_pairs, split_training
from braintumor_training.dataset import DatasetError, ImageRecord
from synthetic import make_dataset, near_copy, random_slice


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """24 training and 6 testing images per class, plus planted duplicates and one corrupt file."""
    root = make_dataset(tmp_path_factory.mktemp("data"), {"Training": 24, "Testing": 6}, seed=3)
    train_img = root / "Training" / "glioma" / "Tr_glioma_000.png"
    shutil.copy(train_img, root / "Testing" / "glioma" / "exact_copy.png")  # exact, across splits
    near_copy(random_slice(np.random.default_rng(9), label=3)).save(root / "Testing" / "pituitary" / "a.png")
    random_slice(np.random.default_rng(9), label=3).save(root / "Training" / "pituitary" / "a_orig.png")
    near_copy(random_slice(np.random.default_rng(11), label=1)).save(root / "Training" / "meningioma" / "b.png")
    random_slice(np.random.default_rng(11), label=1).save(root / "Training" / "meningioma" / "b_orig.png")
    (root / "Training" / "notumor" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_hamming_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 256, (300, 32), dtype=np.uint8)
    hashes[7] = hashes[100]
    hashes[8] = hashes[200] ^ np.eye(32, dtype=np.uint8)[3]  # one bit apart
    got = {(i, j) for i, j, _ in hamming_pairs(hashes, threshold=100, block=64)}
    bits = np.unpackbits(hashes, axis=1).astype(int)
    distance = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    want = {(i, j) for i in range(300) for j in range(i + 1, 300) if distance[i, j] <= 100}
    assert got == want and (7, 100) in got and (8, 200) in got


def test_audit_finds_corrupt_exact_and_near_duplicates(dataset):
    report = audit_dataset(dataset)
    s = report.summary
    assert [u["path"] for u in report.unreadable] == ["Training/notumor/corrupt.jpg"]
    assert s["images"] == 4 * 30 + 6
    assert ["Testing/glioma/exact_copy.png", "Training/glioma/Tr_glioma_000.png"] in report.exact_duplicate_groups
    pairs = {frozenset((p["a"], p["b"])) for p in report.near_duplicate_pairs}
    assert frozenset(("Testing/pituitary/a.png", "Training/pituitary/a_orig.png")) in pairs
    assert frozenset(("Training/meningioma/b.png", "Training/meningioma/b_orig.png")) in pairs
    # the distinct synthetic images are not near duplicates of each other
    assert s["near_duplicate_pairs_across_splits"] == 2 and s["near_duplicate_pairs_within_Training"] == 1
    assert s["test_images_with_near_duplicate_in_training"] == 2
    assert "Testing/pituitary/a.png" not in report.leak_free_test
    assert "Testing/glioma/exact_copy.png" not in report.leak_free_test
    assert len(report.leak_free_test) == 24


def test_validation_split_keeps_duplicates_together_and_is_stratified(dataset):
    report = audit_dataset(dataset, val_fraction=0.25, seed=5)
    train, val = set(report.split["train"]), set(report.split["val"])
    assert not train & val
    assert len(train) + len(val) == 4 * 24 + 3  # the corrupt file is left out
    pair = {"Training/meningioma/b.png", "Training/meningioma/b_orig.png"}
    assert pair <= train or pair <= val
    per_class = {
        label: sum(p.split("/")[1] == label for p in val) for label in ("glioma", "meningioma", "notumor", "pituitary")
    }
    assert all(4 <= n <= 8 for n in per_class.values()), per_class
    assert report.split == audit_dataset(dataset, val_fraction=0.25, seed=5).split  # seeded


def test_split_never_separates_a_group():
    records = [ImageRecord(f"Training/glioma/{i}.png", "Training", ("glioma", "notumor")[i % 2]) for i in range(60)]
    pairs = [(i, i + 2, 0) for i in range(0, 40, 2)]  # a chain: one big group of the even images < 42
    groups = duplicate_groups(60, pairs)
    _, val = split_training(records, groups, 0.2, seed=1)
    for i, j, _ in pairs:
        assert (i in val) == (j in val)


def test_audit_command_writes_json_and_summary(dataset, tmp_path, capsys):
    assert main(["audit", str(dataset), "--out", str(tmp_path)]) == 1  # non-zero: a file is unreadable
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["summary"]["unreadable"] == 1
    text = (tmp_path / "audit.md").read_text()
    assert "Testing images with a near duplicate in Training: 2 of 26" in text
    assert "Unreadable files" in capsys.readouterr().out


def test_bad_layout_gives_a_clear_error(tmp_path):
    (tmp_path / "Training" / "cats").mkdir(parents=True)
    (tmp_path / "Testing").mkdir()
    with pytest.raises(DatasetError, match="unknown class folder"):
        audit_dataset(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        audit_dataset(tmp_path / "nowhere")


@pytest.mark.slow  # hashes all 7,023 images of the shared dataset
def test_shared_dataset_audit_finds_the_known_leak(shared_data):
    report = audit_dataset(shared_data)
    s = report.summary
    assert s["images"] == 7019 and s["unreadable"] == 0
    assert s["test_images_with_near_duplicate_in_training"] >= 300  # hundreds, as documented
    assert s["exact_duplicate_groups"] > 0
    val = set(report.split["val"])
    for pair in report.near_duplicate_pairs:
        if pair["kind"] == "within_Training":
            assert (pair["a"] in val) == (pair["b"] in val)
