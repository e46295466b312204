"""Train a tiny model on synthetic images, evaluate it, and publish it through the quality gate."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import copy_repository, eager_training

from synthetic import make_dataset, make_manifest_dataset

pytest.importorskip("tensorflow")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from braintumor.cli import main
from braintumor.config import HEATMAP_NAME, INPUT_NAME, LABELS, OUTPUT_NAME
from braintumor.preprocessing import Preprocessing
from braintumor_training.train import TrainConfig, TrainingError, train

pytestmark = pytest.mark.slow
SIZE = 32
#: The tiny run uses the preprocessing of version 2 (crop to the head, intensity normalisation).
PREPROCESSING_FLAGS = ["--crop-to-head", "--normalize-intensity"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("syn"), {"Training": 20, "Testing": 5}, seed=11)


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """A tiny manifest dataset (two sources, three sequences, tumours of no class) trained on too."""
    return make_manifest_dataset(tmp_path_factory.mktemp("external"), per_stratum=5, seed=3)


@pytest.fixture(scope="module")
def run_dir(data, external, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    command = ["train", "--data", str(data), "--out", str(out), "--epochs", "2", "--image-size", str(SIZE)]
    assert main([*command, *PREPROCESSING_FLAGS, "--external", str(external)]) == 0
    # judged beside the committed version 2 on the same test images, as version 3 is
    assert main(["evaluate", str(out), "--compare-version", "2"]) == 0
    return out


def test_run_folder_has_audit_checkpoints_and_logs(run_dir):
    for name in ("audit.json", "audit.md", "config.json", "best.keras", "last.keras", "history.csv", "run.json"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "tensorboard").is_dir()
    rows = list(csv.DictReader((run_dir / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1] and "probe_std" in rows[0]
    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    assert metrics["temperature"] > 0 and metrics["test"]["n_images"] == 20
    for figure in ("confusion_test.png", "confusion_test_leak_free.png", "reliability.png", "subgroups.png"):
        assert (run_dir / "evaluation" / figure).stat().st_size > 1000


def test_evaluation_judges_the_external_test_part_by_subgroup(run_dir):
    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    split = json.loads((run_dir / "external_split.json").read_text())["parts"]
    assert metrics["external_test"]["n_images"] == sum(p == "test" for p in split.values()) > 0
    assert metrics["external_val"]["n_images"] == sum(p == "val" for p in split.values()) > 0
    assert metrics["temperature_fit"]["sets"] == ["validation", "external_val"]
    assert (
        metrics["temperature_fit"]["n_images"]
        == metrics["validation"]["n_images"] + metrics["external_val"]["n_images"]
    )
    rows = metrics["external_test"]["subgroups"]
    assert rows[0]["subgroup"] == "all" and rows[0]["n"] == metrics["external_test"]["n_images"]
    assert {r["grouping"] for r in rows} >= {"all", "source", "sequence", "finding"}
    for row in rows:
        if row["subgroup"] in ("other_tumor", "tumor", "br35h"):
            assert row["class_accuracy"] is None  # tumours of no class never count toward a class
    assert [r["subgroup"] for r in metrics["test"]["subgroups"]] == ["all", *LABELS]
    names = {t["name"] for t in metrics["targets"]}
    assert "external test: tumour sensitivity on T2" in names and "Testing: accuracy" in names
    comparison = metrics["comparison"]
    assert comparison["version"] == 2 and set(comparison["sets"]) == {"test", "test_leak_free", "external_test"}
    assert comparison["sets"]["external_test"]["n_images"] == metrics["external_test"]["n_images"]
    report = (run_dir / "evaluation" / "report.md").read_text()
    assert "## Subgroups" in report and "### external test part" in report and "(v2)" in report
    every = next(r for r in metrics["external_test"]["subgroups"] if r["grouping"] == "all")
    kinds = [f["kind"] for f in metrics["failures"]["rows"]]
    assert kinds.count("missed tumour") == every["tumor_sensitivity"]["n"] - every["tumor_sensitivity"]["k"]
    assert kinds.count("false alarm") == every["specificity"]["n"] - every["specificity"]["k"]
    assert all(not Path(f["path"]).is_absolute() for f in metrics["failures"]["rows"])  # relative to the manifest
    assert "## Missed tumours and false alarms of this run" in report and metrics["failures"]["summary"] in report
    assert (run_dir / "evaluation" / "failures.png").exists() == bool(metrics["failures"]["rows"])


def test_validation_logits_can_feed_the_trained_weights_another_input_size(run_dir):
    from braintumor_training.evaluate import load_classifier, validation_logits
    from braintumor_training.model import classifier_at_size

    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    logits, labels = validation_logits(run_dir)
    larger, same_labels = validation_logits(run_dir, image_size=SIZE + 16)
    for name in ("validation", "external_val"):  # the validation sets the evaluation counted, and nothing else
        assert len(logits[name]) == len(labels[name]) == len(larger[name]) == metrics[name]["n_images"]
        assert np.array_equal(labels[name], same_labels[name])
    assert not np.allclose(larger["validation"], logits["validation"])  # a size ignored would give the same
    # the rebuilt network carries every trained weight: at the run's own size it answers as the run does
    trained = load_classifier(run_dir)
    rebuilt = classifier_at_size(trained, SIZE)
    assert all(np.array_equal(a, b) for a, b in zip(trained.get_weights(), rebuilt.get_weights(), strict=True))
    pixels = np.random.default_rng(0).uniform(0, 255, (4, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(rebuilt(pixels, training=False), trained(pixels, training=False), atol=1e-5)


def test_a_published_version_is_judged_on_a_runs_external_test_part(run_dir, data, tmp_path):
    out = tmp_path / "v2-external"
    split = run_dir / "external_split.json"
    command = ["evaluate", "--version", "2", "--external-split", str(split), "--data", str(data), "--out", str(out)]
    assert main(command) == 0  # the manifest dataset is found through the run's config.json
    result = json.loads((out / "subgroups.json").read_text())
    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    assert result["sets"]["external_test"]["subgroups"] == metrics["comparison"]["sets"]["external_test"]["subgroups"]
    assert (out / "subgroups.png").stat().st_size > 1000 and "## Subgroups" in (out / "subgroups.md").read_text()
    assert main(["evaluate", "--version", "2"]) == 2  # needs --external-split


def test_sequences_read_by_eye_are_reported_beside_a_second_version(run_dir, data, external, tmp_path, capsys):
    split_file = run_dir / "external_split.json"
    parts = json.loads(split_file.read_text())["parts"]
    # only Br35H names no sequence: images/<source>_<sequence>_<finding>_<i>.jpg
    br35h = {
        part: sorted(Path(p) for p, q in parts.items() if q == part and "/br35h_" in p) for part in ("train", "test")
    }
    tested = br35h["test"]
    assert tested and br35h["train"]
    labels = tmp_path / "by-eye.csv"
    rows = ["index,sample,path,sequence,confidence,note"]
    rows += [f"{k},s,{path.relative_to(external)},{'FLAIR' if k % 2 else 'T2'},sure," for k, path in enumerate(tested)]
    labels.write_text("\n".join(rows) + "\n")
    out = tmp_path / "by-eye"
    command = ["evaluate", "--version", "2", "--compare-version", "1", "--external-split", str(split_file)]
    assert main([*command, "--data", str(data), "--out", str(out), "--sequences-by-eye", str(labels)]) == 0
    result = json.loads((out / "subgroups.json").read_text())
    by_eye = {
        r["subgroup"]: r for r in result["sets"]["external_test"]["subgroups"] if r["grouping"] == "sequence_by_eye"
    }
    assert sum(r["n"] for r in by_eye.values()) == len(tested)  # each labelled image in exactly one row
    assert set(by_eye) <= {"br35h / FLAIR (by eye)", "br35h / T2 (by eye)"}
    assert all(r["same_as"] is None for r in by_eye.values())  # shown even where it equals another row
    compared = result["compared_sets"]["external_test"]["subgroups"]
    assert [r["subgroup"] for r in compared] == [r["subgroup"] for r in result["sets"]["external_test"]["subgroups"]]
    report = (out / "subgroups.md").read_text()
    assert "(by eye)" in report and "(v1)" in report and "(v2)" in report
    # every missed tumour and false alarm of version 2 is listed, as many as its subgroup row counts
    every = next(r for r in result["sets"]["external_test"]["subgroups"] if r["grouping"] == "all")
    kinds = [f["kind"] for f in result["failures"]["rows"]]
    sensitivity, specificity = every["tumor_sensitivity"], every["specificity"]
    assert kinds.count("missed tumour") == sensitivity["n"] - sensitivity["k"]
    assert kinds.count("false alarm") == specificity["n"] - specificity["k"]
    assert "## Missed tumours and false alarms of version 2" in report
    assert (out / "failures.png").exists() == bool(kinds)
    # --card: the rows go into the version's model card, once however often it is run
    repository = tmp_path / "repository"
    copy_repository(repository, keep=(1, 2))
    card = repository / "braintumor" / "2" / "model-card.md"
    published = ["--repository", str(repository), "--sequences-by-eye", str(labels), "--card"]
    for _ in range(2):
        assert main([*command, "--data", str(data), "--out", str(tmp_path / "card"), *published]) == 0
    text = card.read_text()
    assert text.count("## Sequences read by eye") == 1 and "br35h / T2 (by eye)" in text
    assert text.index("## Sequences read by eye") < text.index("## Known limitations")
    assert f"--external-split {os.path.relpath(split_file)} --external" in text  # a command that can run again
    capsys.readouterr()
    assert main([*command, "--out", str(tmp_path / "nocsv"), "--card"]) == 2
    assert "give --sequences-by-eye" in capsys.readouterr().err
    assert main(["evaluate", str(run_dir), "--card"]) == 2  # a run has no published card
    assert "use it with --version" in capsys.readouterr().err

    def refused(text: str) -> str:
        csv_file = tmp_path / "refused.csv"
        csv_file.write_text(text)
        assert main([*command, "--out", str(tmp_path / "refused"), "--sequences-by-eye", str(csv_file)]) == 2
        assert not (tmp_path / "refused").exists()  # nothing scored, nothing written
        return capsys.readouterr().err

    first = tested[0].relative_to(external)
    assert "unknown sequence 'DWI'" in refused(f"path,sequence\n{first},DWI\n")
    assert "already labelled on line 2" in refused(f"path,sequence\n{first},T2\n{first},FLAIR\n")
    assert "names no image" in refused("path,sequence\n")
    assert "images/elsewhere/x.jpg is not an image of the manifest" in refused(
        "path,sequence\nimages/elsewhere/x.jpg,T2\n"
    )
    known = next(Path(p) for p, q in parts.items() if q == "test" and "/feltrin_T1_" in p).relative_to(external)
    assert "already names its sequence (T1)" in refused(f"path,sequence\n{known},FLAIR\n")
    trained = br35h["train"][0].relative_to(external)
    assert "none of its images is in the test part" in refused(f"path,sequence\n{trained},FLAIR\n")
    same = ["evaluate", "--version", "2", "--compare-version", "2", "--external-split", str(split_file)]
    assert main([*same, "--out", str(tmp_path / "same")]) == 2
    assert "is the version evaluated" in capsys.readouterr().err


def test_a_run_trains_on_both_datasets_and_the_ablation_judges_it(run_dir, external, tmp_path):
    from braintumor_training.ablation import main as ablation

    split = json.loads((run_dir / "external_split.json").read_text())
    assert set(split["parts"].values()) == {"train", "val", "test"}
    run = json.loads((run_dir / "run.json").read_text())["sessions"][0]
    n_external_train = sum(p == "train" for p in split["parts"].values())
    n_folder_train = len(json.loads((run_dir / "audit.json").read_text())["split"]["train"])
    assert run["train_images"] == n_folder_train + n_external_train
    # tumours of no class train as one kind of target ("tumor"), weighted like each class
    assert set(run["class_weight"]) == {"glioma", "meningioma", "notumor", "pituitary", "tumor"}
    out = tmp_path / "ablation"
    split_file = run_dir / "external_split.json"
    assert (
        ablation([str(run_dir), "--external-split", str(split_file), "--external", str(external), "--out", str(out)])
        == 0
    )
    result = json.loads((out / "ablation.json").read_text())[0]
    n_t2 = sum(
        1 for path, part in split["parts"].items() if part == "test" and "_T2_" in path and "notumor" not in path
    )
    assert result["cells"]["T2 sensitivity"]["n"] == n_t2
    assert "| brain-tumor-mri + mri-external | v1 | 2 |" in (out / "ablation.md").read_text()


def test_a_second_phase_starts_from_an_earlier_runs_weights(run_dir, data, tmp_path, capsys):
    import keras

    out = tmp_path / "phase2"
    command = ["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--image-size", str(SIZE)]
    start = ["--learning-rate", "1e-9", "--warmup-epochs", "0", "--init-from", str(run_dir / "best.keras")]
    with eager_training():
        assert main([*command, *start]) == 0
    assert "Starting from the weights of" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["init_from"] == str(run_dir / "best.keras")
    before = keras.models.load_model(run_dir / "best.keras", compile=False).get_layer("logits").get_weights()[0]
    after = keras.models.load_model(out / "last.keras", compile=False).get_layer("logits").get_weights()[0]
    np.testing.assert_allclose(after, before, atol=1e-4)  # a learning rate of 1e-9 leaves the start unchanged


def test_ema_validates_and_keeps_the_averaged_weights(run_dir, data, tmp_path):
    import keras

    with pytest.raises(TrainingError, match="ema must be a momentum between 0 and 1"):
        train(TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "bad"), ema=1.5))
    assert not (tmp_path / "bad").exists()
    start = run_dir / "best.keras"
    before = keras.models.load_model(start, compile=False).get_layer("logits").get_weights()[0]
    moved = {}
    for name, extra in (("raw", []), ("ema", ["--ema", "0.999"])):
        out = tmp_path / name
        command = ["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--image-size", str(SIZE)]
        args = ["--learning-rate", "1e-2", "--warmup-epochs", "0", "--batch-size", "2", "--init-from", str(start)]
        args += extra
        assert main([*command, *PREPROCESSING_FLAGS, *args]) == 0
        for checkpoint in ("best.keras", "last.keras"):
            after = keras.models.load_model(out / checkpoint, compile=False).get_layer("logits").get_weights()[0]
            moved[name, checkpoint] = float(np.abs(after - before).max())
    assert json.loads((tmp_path / "ema" / "config.json").read_text())["ema"] == 0.999
    # ~30 steps at a high learning rate move the raw weights; their average over ~1,000 steps stays near the
    # first step's weights (Keras starts the average there)
    assert moved["raw", "last.keras"] > 4 * moved["ema", "last.keras"], moved
    assert moved["raw", "best.keras"] > 4 * moved["ema", "best.keras"], moved


def test_source_balance_and_jpeg_draft_reach_the_loss_and_the_published_preprocessing(data, external, tmp_path):
    from braintumor_training.train import run_preprocessing

    with pytest.raises(TrainingError, match="balance must be one of kind, source, kind-source, not 'sources'"):
        train(TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "bad"), balance="sources"))
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "balanced"
    command = ["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--image-size", str(SIZE)]
    flags = ["--external", str(external), "--balance", "source", "--jpeg-draft"]
    with eager_training():
        assert main([*command, *PREPROCESSING_FLAGS, *flags]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["balance"] == "source" and run_preprocessing(config).jpeg_draft
    weights = json.loads((out / "run.json").read_text())["sessions"][0]["class_weight"]
    # each (dataset, kind) pair is its own kind of target: the external normals are no longer the folder's
    assert set(weights) == {
        "glioma",
        "meningioma",
        "notumor",
        "pituitary",
        "external:glioma",
        "external:meningioma",
        "external:notumor",
        "external:tumor",
    }
    parts = json.loads((out / "external_split.json").read_text())["parts"]
    n_normal = sum(1 for path, part in parts.items() if part == "train" and "notumor" in path)
    n_tumor = sum(1 for path, part in parts.items() if part == "train" and "notumor" not in path and "_tumor_" in path)
    assert n_normal and n_tumor  # the same total weight for both kinds
    assert weights["external:notumor"] * n_normal == pytest.approx(weights["external:tumor"] * n_tumor, rel=1e-4)


def test_finished_or_differently_configured_runs_are_not_overwritten(run_dir, data):
    config = TrainConfig(
        data_dir=str(data),
        out_dir=str(run_dir),
        epochs=2,
        image_size=SIZE,
        crop_to_head=True,
        normalize_intensity=True,
        external=json.loads((run_dir / "config.json").read_text())["external"],
    )
    command = ["train", "--data", str(data), "--out", str(run_dir), "--epochs", "2", "--image-size", str(SIZE)]
    assert main([*command, *PREPROCESSING_FLAGS, "--external", config.external]) == 2
    with pytest.raises(TrainingError, match="finished run"):
        train(config)
    config.epochs = 3
    with pytest.raises(TrainingError, match="different configuration"):
        train(config)


def test_quality_gate_refuses_a_weak_model(run_dir, tmp_path, capsys):
    repo = tmp_path / "model_repository"
    code = main(
        [
            "export",
            str(run_dir),
            "--repository",
            str(repo),
            "--tfserving-base",
            str(tmp_path / "tfs"),
            "--min-accuracy",
            "0.999",
        ]
    )
    assert code == 2
    assert "below the quality gate" in capsys.readouterr().err
    assert not (repo / "braintumor").exists()


def test_export_with_a_serving_rule_publishes_only_a_run_that_meets_it(run_dir, tmp_path, capsys):
    repo, tfs = tmp_path / "model_repository", tmp_path / "tfs"
    gates = ["--min-accuracy", "0", "--min-leak-free-accuracy", "0", "--min-tumor-sensitivity", "0"]
    base = ["export", str(run_dir), "--repository", str(repo), "--tfserving-base", str(tfs), *gates]
    rule = Path(__file__).parent.parent / "docs" / "serving-rule.json"
    assert main([*base, "--rule", str(rule)]) == 2  # nothing published yet to judge against
    assert "no version of braintumor is published yet" in capsys.readouterr().err
    assert main([*base, "--against", "1"]) == 2
    assert "give --rule too" in capsys.readouterr().err
    assert main(base) == 0
    strict = tmp_path / "strict.json"
    strict.write_text(
        json.dumps({"conditions": [{"name": "fewer errors", "count": {"validation.errors": 1}, "at_most_more": -1}]})
    )
    assert main([*base, "--rule", str(strict)]) == 2  # the same run has as many errors, not one fewer
    err = capsys.readouterr().err
    assert f"the serving rule {strict} is not met against version 1: fewer errors" in err and "NOT MET" in err
    assert main([*base, "--rule", str(rule), "--against", "7"]) == 2
    assert "version 7 of braintumor is not published" in capsys.readouterr().err
    assert main([*base, "--rule", str(rule), "--int8"]) == 2  # the rule judges fp32, not an int8 model
    assert "--rule judges the fp32 model's validation figures" in capsys.readouterr().err
    assert sorted(p.name for p in (repo / "braintumor").iterdir() if p.name.isdigit()) == ["1"]
    assert sorted(p.name for p in (tfs / "braintumor").iterdir()) == ["1"]
    assert main([*base, "--rule", str(rule)]) == 0  # no worse than itself
    assert "2 x missed tumours + false alarms + Kaggle errors" in capsys.readouterr().out
    published = json.loads((repo / "braintumor" / "2" / "metrics.json").read_text())["serving_rule"]
    assert published["met"] and published["against"] == 1 and published["rule"] == str(rule)
    card = (repo / "braintumor" / "2" / "model-card.md").read_text()
    assert f"serving rule `{rule}` against version 1" in card
    assert card.index("## Why it is served") < card.index("## Known limitations")


def test_export_publishes_verified_versions(run_dir, tmp_path):
    repo, tfs = tmp_path / "model_repository", tmp_path / "tfs"
    args = [
        "export",
        str(run_dir),
        "--repository",
        str(repo),
        "--tfserving-base",
        str(tfs),
        "--min-accuracy",
        "0",
        "--min-leak-free-accuracy",
        "0",
        "--min-tumor-sensitivity",
        "0",
    ]
    assert main(args) == 0
    assert main(args) == 0
    model_dir = repo / "braintumor"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "config.pbtxt", "configs", "labels.txt"]
    files = ["metrics.json", "model-card.md", "model.onnx", "preprocessing.json"]
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == files
    assert (model_dir / "labels.txt").read_text().split() == list(LABELS)
    config = (model_dir / "config.pbtxt").read_text()
    assert f"dims: [ {SIZE}, {SIZE}, 3 ]" in config and 'label_filename: "labels.txt"' in config
    # Each version's preprocessing travels with it: in its folder, and in both configurations for clients.
    spec = Preprocessing(SIZE, crop_to_head=True, normalize_intensity=True)
    for version in ("1", "2"):
        assert Preprocessing.from_json((model_dir / version / "preprocessing.json").read_text()) == spec
        assert Preprocessing.from_json((tfs / "braintumor" / version / "preprocessing.json").read_text()) == spec
    for text in (config, (model_dir / "configs" / "cpu.pbtxt").read_text()):
        for version in ("1", "2"):
            assert f'key: "preprocessing/{version}"' in text

    metrics = json.loads((model_dir / "2" / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "tumor_sensitivity", "tumor_specificity"):
        assert 0.0 <= metrics["test"][key] <= 1.0
    assert metrics["test_leak_free"]["n_images"] > 0 and "accuracy" in metrics["test_leak_free"]
    assert metrics["export_parity"]["max_abs_diff"] <= 1e-4
    card = (model_dir / "2" / "model-card.md").read_text()
    assert "not a diagnostic device" in card.replace("*", "") and "braintumor train" in card and "leak-free" in card
    assert "crop to the head" in card and "Against version 1" in card
    # judged on the external data by subgroup, beside version 2; its sources and their licences
    assert "## Where it works and where it does not" in card and "tumour sensitivity (v2)" in card
    assert "## The shortcut found in version 2" in card and "CC BY-NC-SA 3.0" in card and "Br35H" in card
    assert "only the nearest of" in card and "--compare-version 2" in card
    assert metrics["external_test"]["subgroups"] and metrics["comparison"]["version"] == 2

    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"))
    (inp,), outputs = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == (INPUT_NAME, "tensor(uint8)", [SIZE, SIZE, 3])
    assert [o.name for o in outputs] == [OUTPUT_NAME, HEATMAP_NAME]
    x = np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    p = session.run(None, {INPUT_NAME: x})[0]
    assert p.shape == (5, len(LABELS)) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    for version in ("1", "2"):
        assert (tfs / "braintumor" / version / "saved_model.pb").exists()
    assert not list(tmp_path.glob(".export-*")), "staging folders must not be left behind"


def test_export_needs_an_evaluated_run(data, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["export", str(tmp_path / "run"), "--repository", str(tmp_path / "r")]) == 2
    assert "run `braintumor evaluate" in capsys.readouterr().err


def test_interrupted_training_resumes_where_it_stopped(data, tmp_path):
    out = tmp_path / "resumable"
    command = [
        sys.executable,
        "-m",
        "braintumor.cli",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "6",
        "--image-size",
        str(SIZE),
        "--collapse-grace-epochs",
        "100",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    history = out / "history.csv"
    deadline = time.time() + 240
    while time.time() < deadline and (not history.exists() or len(history.read_text().splitlines()) < 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(history.read_text().splitlines()) - 1
    assert 2 <= done_before < 6, "the run was to be killed part way"
    assert (out / "backup").exists() and not (out / "last.keras").exists()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    epochs = [int(r["epoch"]) for r in csv.DictReader(history.open())]
    assert epochs[-1] == 5
    assert epochs.count(0) == 1, f"resumed run started again from scratch: {epochs}"
    assert (out / "last.keras").exists() and not (out / "backup").exists()
