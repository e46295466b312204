"""Scanner and acquisition shifts: seeded, graded, and evaluated through the served preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synthetic import make_dataset, random_slice

pytest.importorskip("onnxruntime")

from braintumor.cli import main
from braintumor.config import DEFAULT_MODEL_REPOSITORY, MODEL_NAME
from braintumor.model_repository import versions
from braintumor.preprocessing import Preprocessing
from braintumor_training.robustness import (
    SHIFTS,
    Robustness,
    evaluate_robustness,
    plot_comparison,
    render_comparison,
    write_report,
)

SETS = ("test", "test_leak_free")


@pytest.mark.parametrize("name", list(SHIFTS))
def test_each_shift_is_seeded_and_grows_with_severity(name):
    image = random_slice(np.random.default_rng(0))
    shift = SHIFTS[name]
    first = np.asarray(shift(image, 2, np.random.default_rng(5)), dtype=float)
    again = np.asarray(shift(image, 2, np.random.default_rng(5)), dtype=float)
    assert np.array_equal(first, again)  # its own seeded generator: reproducible
    original = np.asarray(image, dtype=float)
    changes = [
        np.abs(np.asarray(shift(image, k, np.random.default_rng(5)), dtype=float) - original).mean() for k in (1, 2, 3)
    ]
    assert changes[0] > 0 and changes[2] >= changes[0], changes
    assert first.shape == original.shape


def test_evaluation_reports_every_shift_and_severity(tmp_path):
    data = make_dataset(tmp_path / "data", {"Testing": 3}, seed=2)
    model = DEFAULT_MODEL_REPOSITORY / MODEL_NAME / str(versions(DEFAULT_MODEL_REPOSITORY / MODEL_NAME)[-1])
    leak_free = {p.relative_to(data).as_posix() for p in (data / "Testing" / "glioma").iterdir()}
    chosen = {k: SHIFTS[k] for k in ("contrast", "zoom_out")}
    spec = Preprocessing(crop_to_head=True, normalize_intensity=True)
    result = evaluate_robustness(model / "model.onnx", data, leak_free, seed=1, shifts=chosen, preprocessing=spec)
    assert result.preprocessing == spec.to_dict()
    for name in chosen:
        assert sorted(result.metrics["test"][name]) == [0, 1, 2, 3]
        assert result.metrics["test"][name][0]["n_images"] == 12
        assert result.metrics["test_leak_free"][name][0]["n_images"] == 3
    assert result.metrics["test"]["contrast"][0] == result.metrics["test"]["zoom_out"][0]  # same clean baseline
    write_report(result, tmp_path / "report")
    saved = json.loads((tmp_path / "report" / "robustness.json").read_text())
    assert set(saved["metrics"]["test"]) == set(chosen)
    assert (tmp_path / "report" / "robustness.png").stat().st_size > 1000
    back = Robustness.from_dict(saved)  # severities come back as numbers (NaN-safe comparison through JSON)
    assert sorted(back.metrics["test"]["contrast"]) == [0, 1, 2, 3]
    assert json.dumps(back.to_dict()) == json.dumps(result.to_dict())


def _cells(accuracy: float, sensitivity: float) -> dict[int, dict[str, float]]:
    return {k: {"accuracy": accuracy, "tumor_sensitivity": sensitivity, "n_images": 10} for k in (0, 1, 2, 3)}


def test_comparison_marks_the_missed_targets_of_each_version():
    before = Robustness("v1", {s: {"gamma": _cells(0.84, 0.99), "blur": _cells(0.98, 0.99)} for s in SETS})
    after = Robustness("v2", {s: {"gamma": _cells(0.96, 0.99), "blur": _cells(0.97, 0.97)} for s in SETS})
    assert before.misses("test") == ["gamma"] and after.misses("test") == ["blur"]
    text = render_comparison(before, after, ("v1", "v2"))
    assert "**0.840 / 0.990**" in text and "| gamma | 0.840 / 0.990 | 0.960 / 0.990 |" in text
    assert "**0.970 / 0.970**" in text  # sensitivity below 0.98 misses too
    assert "v2 misses a target at severity 2 on 1 of 2 shifts: blur (v1: 1)" in text


def test_comparison_figure(tmp_path):
    before = Robustness("v1", {s: {"gamma": _cells(0.84, 0.99), "blur": _cells(0.98, 0.99)} for s in SETS})
    after = Robustness("v2", {s: {"gamma": _cells(0.96, 0.99), "blur": _cells(0.97, 0.97)} for s in SETS})
    plot_comparison(before, after, ("v1", "v2"), tmp_path / "comparison.png")
    assert (tmp_path / "comparison.png").stat().st_size > 5000


@pytest.mark.slow
def test_robustness_command_on_the_shared_data(shared_data, tmp_path, capsys):
    assert main(["robustness", "--limit", "40", "--out", str(tmp_path)]) == 0
    assert "zoom_out" in capsys.readouterr().out
    assert (tmp_path / "robustness.md").read_text().count("|") > 50
