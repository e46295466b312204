"""Model soups: one classifier whose weights are the mean of several runs' (``braintumor soup``).

Runs fine-tuned from the same weights at a small learning rate stay in one basin of the loss, and the mean of
their weights often generalises better than each of them (Wortsman et al., "Model soups", ICML 2022). It
costs nothing at inference: the soup is one network of the same shape, not an ensemble. Batch
normalisation's statistics are not linear in the weights, so they are recomputed for the averaged weights,
on augmented training batches as training computed them.

The soup is written as a run folder (``best.keras``, the ingredients' shared ``config.json``, audit and
external split, a ``run.json`` that names the ingredients and ``soup.json``), so ``braintumor evaluate``
and ``braintumor export`` treat it as any run.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from braintumor.config import LABELS
from braintumor_training.dataset import load_arrays, scan_dataset
from braintumor_training.external import read_manifest
from braintumor_training.model import BN_MOMENTUM, build_classifier
from braintumor_training.train import (
    BEST_CHECKPOINT,
    EXTERNAL_SPLIT_FILE,
    TrainConfig,
    make_dataset,
    run_preprocessing,
    select_records,
)

__all__ = ["SHARED_KEYS", "SOUP_FILE", "SoupError", "check_ingredients", "make_soup", "recompute_batchnorm"]

#: The soup's own record in its run folder.
SOUP_FILE = "soup.json"
#: ``config.json`` keys every ingredient must share: they fix the data, its split, the published
#: preprocessing and the augmentation the batch-normalisation statistics are recomputed under.
SHARED_KEYS = (
    "data_dir",
    "external",
    "image_size",
    "seed",
    "val_fraction",
    "threshold",
    "limit_per_class",
    "crop_to_head",
    "normalize_intensity",
    "jpeg_draft",
    "augmentation",
)
#: Files copied from the first ingredient (checked equal where they define the split).
_COPIED = ("audit.json", "audit.md", EXTERNAL_SPLIT_FILE)


class SoupError(RuntimeError):
    """The ingredients cannot be averaged, or the soup's folder is taken."""


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise SoupError(f"{path.parent} is not a finished training run ({path.name} missing)") from err


def check_ingredients(runs: list[Path]) -> dict[str, Any]:
    """Check that the runs can be averaged; returns the first run's ``config.json``.

    Args:
        runs: the ingredients' run folders (two or more, each with ``best.keras``).

    Raises:
        SoupError: fewer than two distinct runs, a missing checkpoint, or runs that differ in data, split,
            preprocessing or augmentation (the key and both values are named).
    """
    if len({r.resolve() for r in runs}) < 2:
        raise SoupError("a soup needs at least two different runs")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    configs = [_read(run / "config.json") for run in runs]
    audits = [_read(run / "audit.json") for run in runs]
    for run, config, audit in zip(runs, configs, audits, strict=True):
        if not (run / BEST_CHECKPOINT).exists():
            raise SoupError(f"{run} has no {BEST_CHECKPOINT}")
        for key in SHARED_KEYS:
            first, this = configs[0].get(key, defaults.get(key)), config.get(key, defaults.get(key))
            if this != first:
                raise SoupError(f"{run} differs from {runs[0]} in {key} ({this!r} against {first!r})")
        if audit["split"] != audits[0]["split"]:
            raise SoupError(f"{run} was validated on other images than {runs[0]} (audit.json split)")
        if configs[0].get("external"):
            parts = _read(run / EXTERNAL_SPLIT_FILE)["parts"]
            if parts != _read(runs[0] / EXTERNAL_SPLIT_FILE)["parts"]:
                raise SoupError(f"{run} split {configs[0]['external']} otherwise than {runs[0]}")
    return configs[0]


def _training_pixels(config: dict[str, Any], audit: dict[str, Any], parts: dict[str, str] | None) -> np.ndarray:
    """The runs' training images through their preprocessing (the folder dataset's, then the manifest's)."""
    preprocessing = run_preprocessing(config)
    limit = config.get("limit_per_class")
    records = select_records(scan_dataset(Path(config["data_dir"])), audit["split"]["train"], limit, config["seed"])
    pixels = [load_arrays(Path(config["data_dir"]), records, preprocessing=preprocessing)[0]]
    if parts is not None:
        external = [r for r in read_manifest(Path(config["external"])) if parts[r.path] == "train"]
        if limit is not None:
            external = external[:: max(1, len(external) // (2 * limit))]
        pixels.append(load_arrays(Path("/"), external, preprocessing=preprocessing)[0])
    return np.concatenate(pixels)


def recompute_batchnorm(model: keras.Model, batches: tf.data.Dataset, count: int) -> int:
    """Set every BatchNormalization layer's statistics to their mean over ``count`` batches, in training mode.

    The momentum of batch ``k`` is ``(k − 1)/k``, so the moving statistics become the plain mean of the
    batches' (the first batch's replace what was there); it is set back to the training momentum after.

    Args:
        model: the classifier (its weights are not changed, only the statistics).
        batches: image batches, augmented as in training.
        count: how many batches to take.

    Returns:
        How many batches were used.
    """
    layers = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    used = 0
    try:
        for used, (images, *_) in enumerate(batches.take(count), start=1):
            for layer in layers:
                layer.momentum = (used - 1) / used
            model(images, training=True)
    finally:
        for layer in layers:
            layer.momentum = BN_MOMENTUM
    return used


def make_soup(
    runs: list[Path], out_dir: Path, batches: int = 200, batch_size: int = 32, command: str | None = None
) -> Path:
    """Average the ingredients' ``best.keras`` weights into a new run folder; returns it.

    Args:
        runs: the ingredients' run folders (see :func:`check_ingredients`).
        out_dir: the soup's run folder; it must not exist yet, or be empty.
        batches: augmented training batches the batch-normalisation statistics are recomputed on.
        batch_size: images per batch.
        command: the command line to record (defaults to ``sys.argv``).

    Raises:
        SoupError: see :func:`check_ingredients`; ``out_dir`` is taken; ``batches`` is not positive.
    """
    if batches < 1:
        raise SoupError(f"batches must be at least 1, not {batches}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SoupError(f"{out_dir} is not empty; a soup goes into a new folder")
    config = check_ingredients(runs)
    started = time.time()
    print(f"Averaging the weights of {', '.join(str(r / BEST_CHECKPOINT) for r in runs)} ...", flush=True)
    weights = [keras.models.load_model(run / BEST_CHECKPOINT, compile=False).get_weights() for run in runs]
    model = build_classifier(config["image_size"])
    model.set_weights([np.mean(np.stack(group), axis=0).astype(group[0].dtype) for group in zip(*weights, strict=True)])

    audit = _read(runs[0] / "audit.json")
    parts = _read(runs[0] / EXTERNAL_SPLIT_FILE)["parts"] if config.get("external") else None
    pixels = _training_pixels(config, audit, parts)
    keras.utils.set_random_seed(config["seed"])
    dataset = make_dataset(
        pixels,
        np.zeros(len(pixels), dtype=np.int64),
        batch_size,
        training=True,
        seed=config["seed"],
        augmentation=config.get("augmentation", "v1"),
    )
    used = recompute_batchnorm(model, dataset, batches)
    print(f"Recomputed the BatchNorm statistics on {used} augmented batches of {len(pixels)} training images")

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / BEST_CHECKPOINT)
    for name in _COPIED:
        if (runs[0] / name).exists():
            shutil.copy2(runs[0] / name, out_dir / name)
    (out_dir / "config.json").write_text(json.dumps({**config, "soup_of": [str(r) for r in runs]}, indent=1))
    ingredients = []
    for run in runs:
        record = _read(run / "run.json")
        sessions = record.get("sessions", [])
        ingredients.append(
            {
                "run": str(run),
                "command": sessions[0].get("command", "braintumor train ...") if sessions else "braintumor train ...",
                "epochs": sum(s.get("epochs_run", 0) for s in sessions),
                "seconds": record.get("total_train_seconds", 0.0),
            }
        )
    elapsed = time.time() - started
    soup = {"ingredients": ingredients, "batchnorm_batches": used, "batch_size": batch_size, "seconds": elapsed}
    (out_dir / SOUP_FILE).write_text(json.dumps(soup, indent=1))
    session = {
        "command": command or " ".join(["braintumor", *sys.argv[1:]]),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # the ingredients' training and the soup's own time: what it took to make these weights
        "train_seconds_this_session": round(sum(i["seconds"] for i in ingredients) + elapsed, 1),
        "epochs_run": sum(i["epochs"] for i in ingredients),
        "train_images": len(pixels),
        "val_images": len(audit["split"]["val"]),
        "versions": {
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": __import__("os").cpu_count(),
        },
    }
    run_info = {"sessions": [session], "total_train_seconds": session["train_seconds_this_session"], "soup": soup}
    (out_dir / "run.json").write_text(json.dumps(run_info, indent=1))
    print(f"Done in {elapsed / 60:.1f} min; the soup is {out_dir / BEST_CHECKPOINT} ({len(LABELS)} classes)")
    return out_dir
