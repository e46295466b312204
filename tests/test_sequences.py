"""The sequence classifier and the audit's classes × sources × sequences tables, on synthetic heads."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from braintumor.cli import main
from braintumor.config import DEFAULT_DATA_DIR, LABELS, PROJECT_ROOT
from braintumor_training.audit import audit_dataset, audit_sequences, bias_summary, render_summary
from braintumor_training.sequences import (
    FEATURE_PREPROCESSING,
    N_FEATURES,
    UNCERTAIN,
    SequenceClassifier,
    agreement,
    contact_sheet,
    count_table,
    cross_validate,
    decide,
    estimate_sequences,
    features_of,
    hand_check_sample,
    read_hand_labels,
    slice_features,
)

#: Fluid and scalp intensities of the synthetic sequences: dark fluid (T1-like) or bright fluid (T2-like).
_CONTRAST = {"T1": {"fluid": 25, "brain": 125, "scalp": 235}, "T2": {"fluid": 245, "brain": 95, "scalp": 160}}


def synthetic_head(rng: np.random.Generator, sequence: str, size: int = 192) -> Image.Image:
    """A grey axial 'head': scalp, dark skull, fluid under it, brain with two ventricles and sulci.

    The fluid (ventricles, sulci, the rim under the skull) is dark for ``T1`` and bright for ``T2``; position,
    shape, texture and overall brightness vary at random.
    """
    c = _CONTRAST[sequence]
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05, 2)
    ax, ay = rng.uniform(0.32, 0.42), rng.uniform(0.38, 0.46)
    r = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)
    image = np.zeros((size, size))
    image[r < 1.0] = c["scalp"]
    image[r < 0.92] = 15  # skull
    image[r < 0.86] = c["fluid"]
    brain = r < 0.81
    image[brain] = c["brain"]
    angle = np.arctan2(yy - cy, xx - cx)
    sulci = brain & (r > 0.55) & (np.abs(np.sin(angle * rng.integers(9, 15) + rng.uniform(0, 6))) < 0.12)
    image[sulci] = c["fluid"]
    for side in (-1, 1):
        vx, vy = cx + side * rng.uniform(0.05, 0.08), cy + rng.uniform(-0.03, 0.03)
        ventricle = ((xx - vx) / 0.035) ** 2 + ((yy - vy) / rng.uniform(0.08, 0.12)) ** 2 < 1
        image[ventricle] = c["fluid"]
    image = image * rng.uniform(0.8, 1.1) + rng.normal(0, 6, image.shape) * (r < 1.0)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="L")


def _heads(rng: np.random.Generator, n: int) -> tuple[list[Image.Image], list[str]]:
    sequences = ["T1", "T2"] * (n // 2)
    return [synthetic_head(rng, s) for s in sequences], sequences


def _features(images: list[Image.Image]) -> np.ndarray:
    return np.stack([slice_features(FEATURE_PREPROCESSING.apply(image)[0]) for image in images])


def test_features_have_a_fixed_length_and_are_finite():
    rng = np.random.default_rng(0)
    images = [synthetic_head(rng, "T1"), synthetic_head(rng, "T2")]
    blank = Image.new("L", (160, 160), 0)  # no head: the whole frame is used
    features = _features([*images, blank])
    assert features.shape == (3, N_FEATURES) and np.isfinite(features).all()
    assert not np.allclose(features[0], features[1])


@pytest.mark.slow  # fits the sequence classifier (tens of seconds)
def test_classifier_tells_dark_fluid_from_bright_fluid():
    rng = np.random.default_rng(1)
    images, sequences = _heads(rng, 60)
    features = _features(images)
    result = cross_validate(features, sequences, groups=np.arange(60), folds=3, seed=0)
    assert result["n"] == 60 and set(result["per_sequence"]) == {"T1", "T2"}
    assert all(v["accuracy"] >= 0.9 for v in result["per_sequence"].values()), result
    assert sum(sum(row.values()) for row in result["confusion"].values()) == 60

    classifier = SequenceClassifier(seed=0).fit(features, sequences)
    fresh, truth = _heads(np.random.default_rng(2), 20)
    predicted = classifier.predict(_features(fresh), min_confidence=0)
    assert np.mean(np.array(predicted) == np.array(truth)) >= 0.9
    assert classifier.predict(_features(fresh), min_confidence=1.01) == [UNCERTAIN] * 20


def test_decide_answers_uncertain_below_the_threshold():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]])
    assert decide(probabilities, ["T1", "T1C", "T2"], 0.6) == ["T1", UNCERTAIN, "T2"]
    assert decide(np.zeros((0, 3)), ["T1", "T1C", "T2"], 0.6) == []


def test_hand_labels_and_agreement(tmp_path):
    path = tmp_path / "check.csv"
    path.write_text(
        "index,sample,path,sequence\n1,1,a.jpg,T1\n2,1,b.jpg,T2\n3,2,c.jpg,FLAIR\n4,2,d.jpg,T2\n5,2,e.jpg,T1C\n"
    )
    hand = read_hand_labels(path)
    assert hand == {"a.jpg": "T1", "b.jpg": "T2", "c.jpg": "FLAIR", "d.jpg": "T2", "e.jpg": "T1C"}
    assert read_hand_labels(path, sample="1") == {"a.jpg": "T1", "b.jpg": "T2"}
    result = agreement(hand, {"a.jpg": "T1", "b.jpg": "T1C", "c.jpg": "T1C", "d.jpg": "T2", "e.jpg": UNCERTAIN})
    assert (result["comparable"], result["agree"], result["certain"]) == (4, 2, 3)
    assert result["agreement"] == 0.5 and result["agree_when_certain"] == pytest.approx(2 / 3)
    assert result["confusion"]["FLAIR"] == {"T1": 0, "T1C": 1, "T2": 0, UNCERTAIN: 0}
    assert agreement(hand, {})["missing"] == 5
    path.write_text("path,sequence\nx.jpg,PD\n")
    with pytest.raises(ValueError, match=r"line 2.*unknown sequence 'PD'"):
        read_hand_labels(path)


def test_count_table_and_bias_summary():
    table = count_table(["glioma", "glioma", "notumor", "notumor", "notumor"], ["T1C", "T1C", "T2", "T2", "T1"])
    assert table == {"glioma": {"T1C": 2}, "notumor": {"T2": 2, "T1": 1}}
    bias = bias_summary(table)
    assert (bias["tumor"], bias["tumor_t1c"], bias["t2"], bias["t2_notumor"], bias["notumor"]) == (2, 2, 2, 2, 3)
    assert bias["tumor_t1c_share"] == 1.0 and bias["notumor_t2_share"] == pytest.approx(2 / 3)


# Folder dataset: tumour classes drawn as T1 (dark fluid), notumor as T2 (bright fluid), as in the real bias.
_FOLDER = {"Training": 6, "Testing": 2}
_FOLDER_SEQUENCE = {"glioma": "T1", "meningioma": "T1", "notumor": "T2", "pituitary": "T1"}


@pytest.fixture(scope="module")
def sequence_data(tmp_path_factory):
    """A tiny folder dataset, a tiny manifest dataset with labelled and unlabelled sequences, a hand check."""
    rng = np.random.default_rng(5)
    folder = tmp_path_factory.mktemp("folder")
    for split, n in _FOLDER.items():
        for label in LABELS:
            (folder / split / label).mkdir(parents=True)
            for i in range(n):
                synthetic_head(rng, _FOLDER_SEQUENCE[label]).save(folder / split / label / f"{label}_{i}.png")
    manifest = tmp_path_factory.mktemp("manifest")
    (manifest / "images").mkdir()
    rows = []
    strata = [("feltrin", "T1", "glioma", 14), ("feltrin", "T1", "notumor", 10), ("feltrin", "T2", "glioma", 12)]
    strata += [("feltrin", "T2", "meningioma", 12), ("br35h", "unknown", "tumor", 5)]
    for source, sequence, finding, n in strata:
        for i in range(n):
            name = f"images/{source}_{sequence}_{finding}_{i}.png"
            synthetic_head(rng, "T2" if sequence == "unknown" else sequence).save(manifest / name)
            rows.append({"path": name, "source": source, "sequence": sequence, "finding": finding, "detail": ""})
    with (manifest / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "source", "sequence", "finding", "detail", "original"])
        writer.writeheader()
        writer.writerows({**row, "original": row["path"]} for row in rows)
    check = folder.parent / "check.csv"
    check.write_text(
        "path,sequence,sample\nTraining/glioma/glioma_0.png,T1,1\nTraining/notumor/notumor_0.png,T2,1\n"
        "Testing/notumor/notumor_1.png,FLAIR,2\n"
    )
    return folder, manifest, check


@pytest.mark.slow  # fits the sequence classifier (tens of seconds)
def test_audit_counts_classes_against_sources_and_sequences(sequence_data):
    folder, manifest, check = sequence_data
    report = audit_dataset(folder, val_fraction=0.25, seed=1)
    audit_sequences(report, [manifest], hand_check=check, seed=0, folds=3, workers=1)

    (external,) = report.external
    assert external["name"] == manifest.name and external["n_images"] == 53
    assert external["finding_by_source"] == {
        "glioma": {"feltrin": 26},
        "notumor": {"feltrin": 10},
        "meningioma": {"feltrin": 12},
        "tumor": {"br35h": 5},
    }
    assert external["finding_by_sequence"] == {
        "glioma": {"T1": 14, "T2": 12},
        "notumor": {"T1": 10},
        "meningioma": {"T2": 12},
        "tumor": {"unknown": 5},
    }
    assert external["finding_by_estimated_sequence"] == {"br35h": {"tumor": {"T2": 5}}}

    seq = report.sequences
    assert seq["classifier"]["trained_on"] == {"feltrin": {"T1": 24, "T2": 24}}
    assert seq["classifier"]["cross_validation"]["n"] == 48
    for split, n in _FOLDER.items():
        assert seq["by_split"][split] == {label: {_FOLDER_SEQUENCE[label]: n} for label in LABELS}
    assert seq["all"]["notumor"] == {"T2": 8} and seq["all"]["glioma"] == {"T1": 8}
    assert seq["bias"]["t2_notumor_share"] == 1.0 and seq["bias"]["tumor_t1c"] == 0
    assert len(seq["images"]) == 32 and {"path", "split", "label", "sequence", "p_T1", "p_T2"} <= set(seq["images"][0])

    hand = seq["hand_check"]
    assert (hand["n"], hand["comparable"], hand["agree"]) == (3, 2, 2)
    assert hand["confusion"]["FLAIR"]["T2"] == 1
    assert hand["by_class"] == {"glioma": {"T1": 1}, "notumor": {"T2": 1, "FLAIR": 1}}
    assert set(hand["samples"]) == {"1", "2"} and hand["samples"]["1"]["agree"] == 2

    text = render_summary(report)
    assert "Finding × source" in text and "| glioma | 0 | 26 | 26 |" in text
    assert "Class × estimated sequence, Training" in text and "| notumor | 0 | 6 | 0 | 6 |" in text
    assert "**Bias.**" in text and "8 of 8 (100 %) slices estimated T2 are `notumor`" in text
    assert (
        "Agreement on the images" in text
        and "2 of 2 (100 %)" in text
        and "FLAIR slices in the hand check: 1 of 3" in text
    )


@pytest.mark.slow  # fits the sequence classifier (tens of seconds)
def test_audit_command_with_external_writes_tables_and_csv(sequence_data, tmp_path, capsys):
    folder, manifest, check = sequence_data
    args = ["audit", str(folder), "--out", str(tmp_path), "--val-fraction", "0.25"]
    assert main([*args, "--external", str(manifest), "--hand-check", str(check), "--workers", "1"]) == 0
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["external"][0]["n_images"] == 53 and report["sequences"]["all"]["pituitary"] == {"T1": 8}
    assert report["command"].startswith("braintumor audit ")
    with (tmp_path / "sequences.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 32 and {r["sequence"] for r in rows if r["label"] == "notumor"} == {"T2"}
    out = capsys.readouterr().out
    assert "Command: `braintumor audit" in out and "estimated sequences" in out
    assert main([*args[:4], "--hand-check", str(check)]) == 2  # a hand check needs --external


def test_plain_audit_has_no_sequence_section(sequence_data):
    folder, _, _ = sequence_data
    report = audit_dataset(folder, val_fraction=0.25)
    assert report.external == [] and report.sequences == {}
    assert "sequences" not in render_summary(report).lower()


def test_hand_check_sample_is_seeded_and_contact_sheet_is_numbered(sequence_data, tmp_path):
    folder, _, _ = sequence_data
    sample = hand_check_sample(folder, {"glioma": 3, "notumor": 2}, seed=4)
    assert sample == hand_check_sample(folder, {"glioma": 3, "notumor": 2}, seed=4)
    assert [p.split("/")[1] for p in sample] == ["glioma"] * 3 + ["notumor"] * 2
    assert len(set(sample)) == 5 and len(hand_check_sample(folder, 2)) == 8
    sheet = contact_sheet([folder / p for p in sample], tmp_path / "sheet.png", columns=4, tile=100)
    assert Image.open(sheet).size == (400, 200)


def test_estimate_sequences_fits_on_a_manifest(sequence_data):
    folder, manifest, _ = sequence_data
    paths = [folder / "Testing" / "glioma" / "glioma_0.png", folder / "Testing" / "notumor" / "notumor_0.png"]
    assert estimate_sequences(paths, external=[manifest], workers=1) == ["T1", "T2"]
    assert features_of([]).shape == (0, N_FEATURES)


_EXTERNAL_DIR = DEFAULT_DATA_DIR.parent / "mri-external"
_HAND_CHECK = PROJECT_ROOT / "docs" / "audit" / "sequence-check.csv"


@pytest.mark.slow
@pytest.mark.shared_data
def test_sequence_classifier_on_the_shared_data(shared_data):
    """Grouped cross-validation on mri-external's Feltrin slices, and agreement with the committed hand check."""
    if not (_EXTERNAL_DIR / "manifest.csv").is_file():
        pytest.skip(f"the manifest dataset mri-external is not at {_EXTERNAL_DIR} (see README: Data)")
    from braintumor_training.external import read_manifest
    from braintumor_training.sequences import labelled_slices

    data = labelled_slices(read_manifest(_EXTERNAL_DIR, check_images=False))
    assert set(data.sequences) == {"T1", "T1C", "T2"}
    result = cross_validate(data.features, data.sequences, data.groups)
    assert all(v["accuracy"] >= 0.85 for v in result["per_sequence"].values()), result["per_sequence"]

    classifier = SequenceClassifier().fit(data.features, data.sequences)
    hand = read_hand_labels(_HAND_CHECK)
    estimates = classifier.predict(features_of([shared_data / p for p in hand]), min_confidence=0)
    result = agreement(hand, dict(zip(hand, estimates, strict=True)))
    assert result["agreement"] >= 0.7, result
    assert result["confusion"]["T2"]["T2"] >= 0.8 * sum(result["confusion"]["T2"].values())
