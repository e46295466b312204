"""``braintumor soup``: the mean of two runs' weights, its BatchNorm statistics recomputed, evaluated and published."""

import json
import shutil

import numpy as np
import pytest

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
    batches = [rng.normal(k, 1 + k, (8, 3)).astype(np.float32) for k in range(3)]
    dataset = tf.data.Dataset.from_tensor_slices((np.concatenate(batches), np.zeros(24))).batch(8)
    assert recompute_batchnorm(model, dataset, count=10) == 3
    np.testing.assert_allclose(layer.moving_mean.numpy(), np.mean([b.mean(axis=0) for b in batches], axis=0), rtol=1e-5)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), np.mean([b.var(axis=0) for b in batches], axis=0), rtol=1e-4
    )
    assert layer.momentum == BN_MOMENTUM


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs on the same data, split and preprocessing: the second a phase from the first."""
    data = make_dataset(tmp_path_factory.mktemp("syn"), {"Training": 16, "Testing": 4}, seed=5)
    external = make_manifest_dataset(tmp_path_factory.mktemp("external"), per_stratum=4, seed=6)
    root = tmp_path_factory.mktemp("runs")
    base = ["train", "--data", str(data), "--external", str(external), "--epochs", "1", *FLAGS]
    assert main([*base, "--out", str(root / "a")]) == 0
    start = ["--init-from", str(root / "a" / "best.keras"), "--learning-rate", "1e-2", "--warmup-epochs", "0"]
    assert main([*base, "--out", str(root / "b"), *start]) == 0
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
    soup = json.loads((out / SOUP_FILE).read_text())
    assert [i["run"] for i in soup["ingredients"]] == [str(a), str(b)] and soup["batchnorm_batches"] == 3
    assert json.loads((out / "config.json").read_text())["soup_of"] == [str(a), str(b)]
    assert "Recomputed the BatchNorm statistics on 3 augmented batches" in capsys.readouterr().out

    assert main(["evaluate", str(out)]) == 0
    repo = tmp_path / "model_repository"
    gates = ["--min-accuracy", "0", "--min-leak-free-accuracy", "0", "--min-tumor-sensitivity", "0"]
    assert main(["export", str(out), "--repository", str(repo), "--tfserving-base", str(tmp_path / "tfs"), *gates]) == 0
    card = (repo / "braintumor" / "1" / "model-card.md").read_text()
    assert "A model soup, the mean of the weights of 2 runs" in card
    # how it was made: the first run, the phase from it, and the soup command, in order
    made = card.split("## How it was made")[1]
    assert made.index(f"--out {a}") < made.index(f"--out {b}") < made.index("braintumor soup")


@pytest.mark.slow
def test_runs_that_cannot_be_averaged_are_refused_and_nothing_is_written(runs, tmp_path, capsys):
    a, b = runs
    with pytest.raises(SoupError, match="at least two different runs"):
        check_ingredients([a, a])
    other = tmp_path / "other"
    shutil.copytree(b, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "jpeg_draft": True}))
    assert main(["soup", str(a), str(other), "--out", str(tmp_path / "mixed")]) == 2
    assert "differs from" in capsys.readouterr().err
    with pytest.raises(SoupError, match=r"in jpeg_draft \(True against False\)"):
        check_ingredients([a, other])
    (other / "config.json").write_text(json.dumps(config))
    (other / "best.keras").unlink()
    with pytest.raises(SoupError, match=r"has no best\.keras"):
        check_ingredients([a, other])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(SoupError, match="is not empty"):
        make_soup([a, b], taken)
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "mixed").exists()
