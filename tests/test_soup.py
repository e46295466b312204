"""``braintumor soup``: the mean of two runs' weights, its BatchNorm statistics recomputed, evaluated and published."""

import json
import shutil

import numpy as np
import pytest
from helpers import eager_training

from synthetic import make_dataset, make_manifest_dataset

pytest.importorskip("tensorflow")

import keras
import tensorflow as tf

from braintumor.cli import main
from braintumor_training.model import BN_MOMENTUM
from braintumor_training.soup import SOUP_FILE, SoupError, check_ingredients, make_soup, recompute_batchnorm

SIZE = 32
FLAGS = ["--crop-to-head", "--normalize-intensity", "--image-size", str(SIZE)]


def test_batchnorm_statistics_become_the_mean_of_the_batches():
    layer = keras.layers.BatchNormalization(momentum=BN_MOMENTUM)
    model = keras.Sequential([keras.Input((3,)), layer])
    rng = np.random.default_rng(0)
    batches = [rng.normal(k, 1 + k, (8 if k < 3 else 4, 3)).astype(np.float32) for k in range(4)]
    dataset = tf.data.Dataset.from_tensor_slices((np.concatenate(batches), np.zeros(28))).batch(8)
    assert recompute_batchnorm(model, dataset, count=10) == 4
    # the mean over images: each batch weighs as many images as it has (the last one is short)
    sizes = [len(b) for b in batches]
    np.testing.assert_allclose(layer.moving_mean.numpy(), np.concatenate(batches).mean(axis=0), rtol=1e-5)
    variances = np.average([b.var(axis=0) for b in batches], axis=0, weights=sizes)
    np.testing.assert_allclose(layer.moving_variance.numpy(), variances, rtol=1e-4)
    assert layer.momentum == BN_MOMENTUM


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny run, and two phases from it on the same data, split and preprocessing (the soup's ingredients)."""
    data = make_dataset(tmp_path_factory.mktemp("syn"), {"Training": 16, "Testing": 4}, seed=5)
    external = make_manifest_dataset(tmp_path_factory.mktemp("external"), per_stratum=4, seed=6)
    root = tmp_path_factory.mktemp("runs")
    command = ["train", "--data", str(data), "--external", str(external), "--epochs", "1", *FLAGS]
    start = ["--init-from", str(root / "start" / "best.keras"), "--warmup-epochs", "0"]
    with eager_training():
        assert main([*command, "--out", str(root / "start")]) == 0
        assert main([*command, "--out", str(root / "a"), *start, "--learning-rate", "1e-2"]) == 0
        assert main([*command, "--out", str(root / "b"), *start, "--learning-rate", "3e-3", "--ema", "0.9"]) == 0
    return root / "a", root / "b"


@pytest.mark.slow
def test_a_soup_averages_the_weights_and_is_evaluated_and_published_as_a_run(runs, tmp_path, capsys):
    a, b = runs
    out = tmp_path / "soup"
    assert main(["soup", str(a), str(b), "--out", str(out), "--batches", "3"]) == 0
    models = [keras.models.load_model(run / "best.keras", compile=False) for run in (a, b, out)]
    kernels = [m.get_layer("logits").get_weights()[0] for m in models]
    assert np.abs(kernels[0] - kernels[1]).max() > 1e-3  # two different runs
    np.testing.assert_allclose(kernels[2], (kernels[0] + kernels[1]) / 2, atol=1e-6)
    # the backbone's BatchNorm statistics (nested in MobileNetV3Small) were recomputed, not averaged
    stats = [
        next(
            layer for layer in m._flatten_layers(recursive=True) if isinstance(layer, keras.layers.BatchNormalization)
        ).moving_mean.numpy()
        for m in models
    ]
    assert np.abs(stats[2] - (stats[0] + stats[1]) / 2).max() > 0.1 * np.abs(stats[2]).max()
    soup = json.loads((out / SOUP_FILE).read_text())
    assert [i["run"] for i in soup["ingredients"]] == [str(a), str(b)] and soup["batchnorm_batches"] == 3
    assert soup["differences"] == {"ema": [None, 0.9], "learning_rate": [0.01, 0.003]}
    config = json.loads((out / "config.json").read_text())
    assert config["soup_of"] == [str(a), str(b)] and config["out_dir"] == str(out)
    assert "Recomputed the BatchNorm statistics on 3 augmented batches" in capsys.readouterr().out

    assert main(["evaluate", str(out)]) == 0
    repo = tmp_path / "model_repository"
    gates = ["--min-accuracy", "0", "--min-leak-free-accuracy", "0", "--min-tumor-sensitivity", "0"]
    assert main(["export", str(out), "--repository", str(repo), "--tfserving-base", str(tmp_path / "tfs"), *gates]) == 0
    card = (repo / "braintumor" / "1" / "model-card.md").read_text()
    soup_text = "This last phase (phase 2): a model soup, the mean of the weights of 2 runs, each from the same start"
    assert soup_text in card
    # how it was made: the start, the two phases from it, and the soup command, in order
    made = card.split("## How it was made")[1]
    assert made.index(f"--out {a}") < made.index(f"--out {b}") < made.index("braintumor soup")


@pytest.mark.slow
def test_runs_that_cannot_be_averaged_are_refused_and_nothing_is_written(runs, tmp_path, capsys):
    a, b = runs
    for named in ([a], [a, a], [a, b, a]):
        with pytest.raises(SoupError, match="at least two different runs, each named once"):
            check_ingredients(named)
    with pytest.raises(SoupError, match=r"in init_from \(None against"):  # not from the same start
        check_ingredients([a, a.parent / "start"])
    other = tmp_path / "other"
    shutil.copytree(b, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "jpeg_draft": True}))
    assert main(["soup", str(a), str(other), "--out", str(tmp_path / "mixed")]) == 2
    assert "differs from" in capsys.readouterr().err
    with pytest.raises(SoupError, match=r"in jpeg_draft \(True against False\)"):
        check_ingredients([a, other])
    (other / "config.json").write_text(json.dumps(config))
    (other / "backup").mkdir()
    with pytest.raises(SoupError, match="still training or was interrupted"):
        check_ingredients([a, other])
    (other / "backup").rmdir()
    (other / "run.json").unlink()
    assert main(["soup", str(a), str(other), "--out", str(tmp_path / "unfinished")]) == 2
    assert "not a finished training run (run.json missing)" in capsys.readouterr().err
    assert not (tmp_path / "unfinished").exists()
    shutil.copy2(b / "run.json", other / "run.json")
    (other / "best.keras").unlink()
    with pytest.raises(SoupError, match=r"has no best\.keras"):
        check_ingredients([a, b, other])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(SoupError, match="is not empty"):
        make_soup([a, b], taken)
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "mixed").exists()
