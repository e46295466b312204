"""Subgroup evaluation on hand-made probabilities: counts, Wilson intervals, targets, tables and the figure."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax, softmax

from braintumor.config import LABELS, NO_TUMOR_INDEX
from braintumor_training.dataset import ImageRecord
from braintumor_training.external import ManifestRecord
from braintumor_training.metrics import (
    binary_calibration_error,
    calibration_intervals,
    fit_temperature,
    partial_label_metrics,
    set_log_likelihood,
)
from braintumor_training.subgroups import (
    Target,
    check_targets,
    find_row,
    plot_forest,
    proportion,
    render_table,
    render_targets,
    score_set,
    subgroup_rows,
    wilson_interval,
)

G, M, N, P = (LABELS.index(x) for x in ("glioma", "meningioma", "notumor", "pituitary"))


def confident(k: int) -> list[float]:
    """Probabilities with 0.91 on class ``k``."""
    p = [0.03] * len(LABELS)
    p[k] = 0.91
    return p


def record(source: str, sequence: str, finding: str, i: int) -> ManifestRecord:
    return ManifestRecord(f"/x/{source}_{sequence}_{finding}_{i}.jpg", source, sequence, finding)


def labels_of(records: list[ManifestRecord]) -> np.ndarray:
    return np.array([-1 if r.label_index is None else r.label_index for r in records])


@pytest.fixture
def external() -> tuple[np.ndarray, list[ManifestRecord]]:
    """12 hand-made slices, each with what the model said of it."""
    return external_fixture()


def external_fixture() -> tuple[np.ndarray, list[ManifestRecord]]:
    """12 hand-made slices, each with what the model said of it."""
    cases = [
        # source, sequence, finding, predicted class
        ("feltrin", "T1", "glioma", G),  # right
        ("feltrin", "T1", "glioma", M),  # tumour found, wrong type
        ("feltrin", "T1", "meningioma", M),  # right
        ("feltrin", "T1", "notumor", N),  # right
        ("feltrin", "T2", "glioma", N),  # missed tumour
        ("feltrin", "T2", "meningioma", N),  # missed tumour
        ("feltrin", "T2", "notumor", N),  # right
        ("feltrin", "T2", "notumor", G),  # false alarm
        ("feltrin", "T2", "other_tumor", G),  # found; its "class" must never count
        ("feltrin", "T2", "other_tumor", N),  # missed
        ("br35h", "unknown", "tumor", P),  # found; its "class" must never count
        ("br35h", "unknown", "tumor", G),  # found
    ]
    p = np.array([confident(k) for *_, k in cases])
    return p, [record(s, q, f, i) for i, (s, q, f, _) in enumerate(cases)]


def test_wilson_interval_matches_published_values_and_contains_the_estimate():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    rng = np.random.default_rng(0)
    for n in rng.integers(1, 500, 200):
        k = int(rng.integers(0, n + 1))
        low, high = wilson_interval(k, int(n))
        assert 0.0 <= low <= k / n <= high <= 1.0
    assert proportion(0, 0) is None
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_subgroup_rows_count_sensitivity_specificity_and_class_accuracy(external):
    p, records = external
    rows = subgroup_rows(p, records)
    every = find_row(rows, "all", "all")
    assert (every["n"], every["n_tumor"], every["n_normal"], every["n_typed"]) == (12, 9, 3, 5)
    # tumours: 9, missed 3 (T2 glioma, T2 meningioma, one other_tumor)
    assert (every["tumor_sensitivity"]["k"], every["tumor_sensitivity"]["n"]) == (6, 9)
    assert (every["specificity"]["k"], every["specificity"]["n"]) == (2, 3)
    # typed: 3 gliomas, 2 meningiomas; right: T1 glioma, T1 meningioma
    assert (every["class_accuracy"]["k"], every["class_accuracy"]["n"]) == (2, 5)
    t2 = find_row(rows, "sequence", "T2")
    assert t2["tumor_sensitivity"]["k"] == 1 and t2["tumor_sensitivity"]["n"] == 4
    assert (t2["specificity"]["k"], t2["specificity"]["n"]) == (1, 2)
    br35h = find_row(rows, "source", "br35h")
    assert br35h["tumor_sensitivity"]["value"] == 1.0 and br35h["specificity"] is None
    assert br35h["class_accuracy"] is None and br35h["glioma_vs_meningioma"] is None
    for row in rows:  # every interval contains its point estimate
        for key in ("tumor_sensitivity", "specificity", "class_accuracy", "glioma_vs_meningioma"):
            cell = row[key]
            if cell:
                assert cell["low"] <= cell["value"] == cell["k"] / cell["n"] <= cell["high"]


def test_tumour_only_findings_never_count_toward_class_accuracy(external):
    p, records = external
    rows = subgroup_rows(p, records)
    for finding in ("other_tumor", "tumor"):
        row = find_row(rows, "finding", finding)
        assert row["n_typed"] == 0 and row["class_accuracy"] is None and row["glioma_vs_meningioma"] is None
    # calling every tumour-only slice a glioma changes no class accuracy anywhere
    tumour_only = np.array([r.finding in ("other_tumor", "tumor") for r in records])
    changed = p.copy()
    changed[tumour_only] = confident(G)
    before = {(r["grouping"], r["subgroup"]): r["class_accuracy"] for r in rows}
    after = {(r["grouping"], r["subgroup"]): r["class_accuracy"] for r in subgroup_rows(changed, records)}
    assert before == after


def test_glioma_versus_meningioma_looks_only_at_the_two_types(external):
    p, records = external
    glioma = find_row(subgroup_rows(p, records), "finding", "glioma")
    # T1 glioma right; T1 glioma said meningioma; T2 glioma said notumor (0.03 vs 0.03: ties go to glioma)
    assert (glioma["glioma_vs_meningioma"]["k"], glioma["glioma_vs_meningioma"]["n"]) == (2, 3)
    assert (glioma["class_accuracy"]["k"], glioma["class_accuracy"]["n"]) == (1, 3)


def test_rows_with_the_same_images_as_an_earlier_row_are_marked_and_left_out_of_tables(external):
    p, records = external
    rows = subgroup_rows(p, records)
    assert find_row(rows, "source_sequence", "feltrin / T1")["same_as"] == "sequence T1"
    assert find_row(rows, "finding", "tumor")["same_as"] == "source br35h"
    assert find_row(rows, "sequence", "T2")["same_as"] is None
    table = "\n".join(render_table({"v": rows}))
    assert "feltrin / T1 |" not in table and "| sequence T2 | 6 | 4 | 2 | 2 | 1/4: 0.250" in table


def test_sequences_read_by_eye_group_only_the_images_read(external):
    from dataclasses import replace

    p, records = external
    read = {10: "FLAIR", 11: "T2"}  # the two Br35H slices, whose manifest names no sequence
    records = [replace(r, sequence_by_eye=read.get(k, "")) for k, r in enumerate(records)]
    rows = [r for r in subgroup_rows(p, records) if r["grouping"] == "sequence_by_eye"]
    assert [(r["subgroup"], r["n"]) for r in rows] == [("br35h / FLAIR (by eye)", 1), ("br35h / T2 (by eye)", 1)]
    assert all(r["tumor_sensitivity"]["k"] == 1 and r["same_as"] is None for r in rows)
    assert not [r for r in subgroup_rows(p[:10], records[:10]) if r["grouping"] == "sequence_by_eye"]  # none read
    # both Br35H slices read as FLAIR: the row has the images of "source br35h" and is still shown
    records = [replace(r, sequence_by_eye="FLAIR" if k in read else "") for k, r in enumerate(records)]
    rows = subgroup_rows(p, records)
    flair = find_row(rows, "sequence_by_eye", "br35h / FLAIR (by eye)")
    assert flair["same_as"] is None and "br35h / FLAIR (by eye) | 2 | 2 |" in "\n".join(render_table({"v": rows}))


def test_the_card_says_what_it_knows_of_flair(external):
    from dataclasses import replace

    from braintumor_training.model_card import _flair_sentence

    p, records = external
    assert "FLAIR has no labelled test slices" in _flair_sentence(subgroup_rows(p, records))
    read = [replace(r, sequence_by_eye="FLAIR" if r.source == "br35h" else "") for r in records]
    assert (
        _flair_sentence(subgroup_rows(p, read))
        == " On FLAIR slices read by eye (the manifest labels none): br35h 2/2: 1.000 (0.342–1.000)."
    )
    labelled = [replace(r, sequence="FLAIR") if r.sequence == "T2" else r for r in records]
    assert _flair_sentence(subgroup_rows(p, labelled)).startswith(" On FLAIR slices: 1/4: 0.250")


def test_counting_groups_as_clusters_widens_the_interval_as_far_as_near_duplicates_agree():
    from dataclasses import replace

    from braintumor_training.subgroups import group_interval

    hits = np.array([True] * 90 + [False] * 10)
    alone = group_interval(hits, np.arange(100))  # every image its own group: about Wilson's interval
    wilson = wilson_interval(90, 100)
    assert alone[0] == pytest.approx(wilson[0], abs=0.005) and alone[1] == pytest.approx(wilson[1], abs=0.005)
    # ten copies of each of 10 images, passing or failing together: as wide as Wilson's over 10 images
    copies = group_interval(hits, np.arange(100) // 10)
    assert copies == pytest.approx(wilson_interval(9, 10), abs=0.02) and copies[1] - copies[0] > 2 * (
        alone[1] - alone[0]
    )
    mixed = group_interval(hits, np.arange(100) % 10)  # groups that mix passes and failures alike: no wider
    assert mixed[1] - mixed[0] <= alone[1] - alone[0] + 1e-9
    # no failure: every group is taken to agree within itself (one group of 5 counts as one image)
    assert group_interval(np.ones(5, bool), np.zeros(5)) == pytest.approx(wilson_interval(1, 1))
    assert group_interval(np.ones(100, bool), np.arange(100) // 10) == pytest.approx(wilson_interval(10, 10))
    with pytest.raises(ValueError, match="as many groups as images"):
        group_interval(hits, np.arange(10))

    p, records = external_fixture()
    plain = subgroup_rows(p, records)
    assert all("group_low" not in (r["tumor_sensitivity"] or {}) for r in plain)  # groups unknown: Wilson only
    grouped = [replace(r, group=k // 2) for k, r in enumerate(records)]
    every = find_row(subgroup_rows(p, grouped), "all", "all")["tumor_sensitivity"]
    assert every["group_low"] <= every["value"] <= every["group_high"]
    targets = check_targets({"external_test": score_set(p, labels_of(grouped), grouped, external=True)})
    sensitivity = next(t for t in targets if t["name"].endswith("on T2"))
    assert sensitivity["group_interval"] is not None
    assert "near duplicates as clusters" in "\n".join(render_targets(targets))


def test_folder_records_are_judged_per_class_on_all_four_classes():
    records = [ImageRecord(f"Testing/{label}/{i}.jpg", "Testing", label) for label in LABELS for i in range(3)]
    predicted = [G, G, M, M, M, M, N, N, G, P, P, N]  # one glioma as meningioma; a false alarm; a missed pituitary
    p = np.array([confident(k) for k in predicted])
    labels = np.array([r.label_index for r in records])
    scored = score_set(p, labels, records, external=False)
    every = find_row(scored["subgroups"], "all", "all")
    assert every["class_accuracy"]["k"] == 9 and every["class_accuracy"]["n"] == 12
    assert every["class_accuracy"]["value"] == pytest.approx(scored["accuracy"])
    assert every["tumor_sensitivity"]["value"] == pytest.approx(scored["tumor_sensitivity"])
    assert every["specificity"]["value"] == pytest.approx(scored["tumor_specificity"])
    assert [r["subgroup"] for r in scored["subgroups"]] == ["all", *LABELS]
    assert find_row(scored["subgroups"], "finding", "pituitary")["tumor_sensitivity"]["k"] == 2
    assert 0.0 <= scored["tumor_ece"] <= 1.0


def test_partial_label_metrics_screen_every_image_and_classify_only_the_typed(external):
    p, records = external
    labels = np.array([-1 if r.label_index is None else r.label_index for r in records])
    m = partial_label_metrics(p, labels)
    assert (m["n_images"], m["n_labelled"], m["n_tumor_only"]) == (12, 8, 4)
    assert m["tumor_sensitivity"] == pytest.approx(6 / 9) and m["tumor_specificity"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(4 / 8)  # typed: 3 gliomas, 2 meningiomas, 3 normal; right: 2 + 2
    assert m["labelled"]["n_images"] == 8


def test_set_likelihood_and_temperature_treat_a_tumour_of_no_class_as_any_tumour():
    logits = np.array([[2.0, 1.0, 0.5, -1.0], [0.1, 0.2, 3.0, 0.0]])
    logp = log_softmax(logits, axis=1)
    got = set_log_likelihood(logp, np.array([0, -1]))
    assert got[0] == pytest.approx(logp[0, 0])
    assert got[1] == pytest.approx(np.log(1.0 - softmax(logits[1])[NO_TUMOR_INDEX]))
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=4.0, size=(20000, 4))
    labels = np.array([rng.choice(4, p=q) for q in softmax(logits / 2.5, axis=1)])
    hidden = (labels != NO_TUMOR_INDEX) & (rng.random(len(labels)) < 0.3)  # some tumours lose their type
    assert fit_temperature(logits, np.where(hidden, -1, labels)) == pytest.approx(2.5, rel=0.07)


def test_binary_calibration_error_is_zero_when_calibrated_and_large_when_not():
    p = np.repeat([0.1, 0.9], 100)
    positive = np.concatenate([np.arange(100) < 10, np.arange(100) < 90])
    assert binary_calibration_error(p, positive) == pytest.approx(0.0)
    assert binary_calibration_error(p, ~positive) == pytest.approx(0.8)


def test_targets_are_met_missed_or_not_measured(external):
    p, records = external
    labels = np.array([-1 if r.label_index is None else r.label_index for r in records])
    sets = {"external_test": score_set(p, labels, records, external=True)}
    targets = (
        Target("T1 sensitivity", "external_test", "tumor_sensitivity", 0.95, "sequence", "T1"),
        Target("T2 sensitivity", "external_test", "tumor_sensitivity", 0.95, "sequence", "T2"),
        Target("FLAIR sensitivity", "external_test", "tumor_sensitivity", 0.95, "sequence", "FLAIR"),
        Target("ECE", "external_test", "tumor_ece", 0.02, at_most=True),
        Target("Testing accuracy", "test", "class_accuracy", 0.985),  # set not evaluated: left out
    )
    results = {r["name"]: r for r in check_targets(sets, targets)}
    assert set(results) == {"T1 sensitivity", "T2 sensitivity", "FLAIR sensitivity", "ECE"}
    assert results["T1 sensitivity"]["met"] is True and results["T1 sensitivity"]["low"] < 1.0
    assert results["T2 sensitivity"]["met"] is False and results["T2 sensitivity"]["value"] == 0.25
    assert results["FLAIR sensitivity"]["met"] is None
    ece = results["ECE"]
    assert ece["met"] is False and ece["low"] <= ece["value"] <= ece["high"]  # a bootstrap interval
    text = "\n".join(render_targets(list(results.values())))
    assert "T2 sensitivity ≥ 0.95: 0.2500 (95 % CI" in text and "**missed**" in text and "not measured" in text


def test_forest_plot_and_side_by_side_table(external, tmp_path):
    p, records = external
    labels = np.array([-1 if r.label_index is None else r.label_index for r in records])
    old = {"external_test": score_set(np.roll(p, 1, axis=1), labels, records, external=True)}
    new = {"external_test": score_set(p, labels, records, external=True)}
    plot_forest({"v2": old, "v3": new}, tmp_path / "subgroups.png")
    assert (tmp_path / "subgroups.png").stat().st_size > 5000
    table = render_table({"v2": old["external_test"]["subgroups"], "v3": new["external_test"]["subgroups"]})
    assert "tumour sensitivity (v2) | tumour sensitivity (v3)" in table[0]
    assert all(line.count("|") == table[0].count("|") for line in table)


def test_model_card_sections_need_the_external_metrics_and_show_both_versions(external):
    pytest.importorskip("tensorflow")
    import json

    from braintumor.config import DEFAULT_MODEL_REPOSITORY, MODEL_NAME
    from braintumor_training.model_card import subgroup_card_sections

    published = json.loads((DEFAULT_MODEL_REPOSITORY / MODEL_NAME / "2" / "metrics.json").read_text())
    assert subgroup_card_sections(published, 3, {}) == []  # an older run's metrics: no new sections

    p, records = external
    labels = np.array([-1 if r.label_index is None else r.label_index for r in records])
    old = {"external_test": score_set(np.roll(p, 1, axis=1), labels, records, external=True)}
    new = score_set(p, labels, records, external=True)
    metrics = {"external_test": new, "targets": check_targets({"external_test": new})}
    metrics["comparison"] = {"version": 2, "sets": old}
    card = "\n".join(subgroup_card_sections(metrics, 3, {"augmentation": "sequence"}))
    assert "## Where it works and where it does not" in card
    assert "| sequence T2 | 6 | 4 | 2 | 2 |" in card and "tumour sensitivity (v2) | tumour sensitivity (v3)" in card
    t2_old = find_row(old["external_test"]["subgroups"], "sequence", "T2")["tumor_sensitivity"]
    assert f"T2 {t2_old['value']:.3f} ({t2_old['low']:.3f}–{t2_old['high']:.3f})" in card  # version 2's figures
    assert "bright fluid meant no tumour" in card and "only the nearest of" in card
    assert "FLAIR has no labelled test slices" in card


def test_calibration_intervals_are_seeded_cover_the_estimate_and_narrow_with_more_images():
    rng = np.random.default_rng(3)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        p = rng.dirichlet([2.0] * len(LABELS), n)
        # labels drawn from the probabilities themselves: a calibrated model, ECE near 0 for many images
        labels = np.array([rng.choice(len(LABELS), p=row) for row in p])
        return p, labels

    p, labels = sample(300)
    first, again = calibration_intervals(p, labels, resamples=300), calibration_intervals(p, labels, resamples=300)
    assert first == again
    ece = binary_calibration_error(1.0 - p[:, NO_TUMOR_INDEX], labels != NO_TUMOR_INDEX)
    low, high = first["tumor_ece_interval"]
    assert low <= ece <= high
    p_big, labels_big = sample(6000)
    big = calibration_intervals(p_big, labels_big, resamples=300)
    assert big["ece_interval"][1] - big["ece_interval"][0] < first["ece_interval"][1] - first["ece_interval"][0]
    assert big["ece_interval"][1] < 0.05  # calibrated by construction
    untyped = calibration_intervals(p, np.full(len(p), -1), resamples=50)
    assert untyped["ece_interval"] is None and untyped["tumor_ece_interval"] is not None
