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
    external_training_records,
    make_dataset,
    run_preprocessing,
    select_records,
    software_versions,
)

__all__ = ["SHARED_KEYS", "SOUP_FILE", "SoupError", "check_ingredients", "make_soup", "recompute_batchnorm"]

#: The soup's own record in its run folder.
SOUP_FILE = "soup.json"
#: ``config.json`` keys every ingredient must share: they fix the data, its split, the published
#: preprocessing, the augmentation the batch-normalisation statistics are recomputed under, and the
#: weights the runs started from (a soup averages runs from one start).
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
    "init_from",
    "weights",
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


def check_ingredients(runs: list[Path]) -> list[dict[str, Any]]:
    """Check that the runs can be averaged; returns their ``config.json``, in order.

    Args:
        runs: the ingredients' run folders (two or more, each with ``best.keras``).

    Raises:
        SoupError: fewer than two distinct runs, or one named twice; an unfinished run (no ``run.json`` or
            ``best.keras``, or a ``backup/`` left); runs that differ in data, split, preprocessing,
            augmentation or start (the key and both values are named).
    """
    resolved = [r.resolve() for r in runs]
    if len(set(resolved)) != len(runs) or len(runs) < 2:
        raise SoupError("a soup needs at least two different runs, each named once")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    configs = [_read(run / "config.json") for run in runs]
    audits = [_read(run / "audit.json") for run in runs]
    for run, config, audit in zip(runs, configs, audits, strict=True):
        _read(run / "run.json")  # written when training ends
        if not (run / BEST_CHECKPOINT).exists():
            raise SoupError(f"{run} has no {BEST_CHECKPOINT}")
        if (run / "backup").exists():
            raise SoupError(f"{run} is still training or was interrupted (its backup/ is there); finish it first")
        for key in SHARED_KEYS:
            first, this = configs[0].get(key, defaults.get(key)), config.get(key, defaults.get(key))
            if this != first:
                raise SoupError(f"{run} differs from {runs[0]} in {key} ({this!r} against {first!r})")
        if audit["split"] != audits[0]["split"]:
            raise SoupError(f"{run} was validated on other images than {runs[0]} (audit.json split)")
    if configs[0].get("external"):
        first = _read(runs[0] / EXTERNAL_SPLIT_FILE)["parts"]
        for run in runs[1:]:
            if _read(run / EXTERNAL_SPLIT_FILE)["parts"] != first:
                raise SoupError(f"{run} split {configs[0]['external']} otherwise than {runs[0]}")
    return configs


def _training_pixels(config: dict[str, Any], audit: dict[str, Any], parts: dict[str, str] | None) -> np.ndarray:
    """The runs' training images through their preprocessing (the folder dataset's, then the manifest's)."""
    preprocessing = run_preprocessing(config)
    limit = config.get("limit_per_class")
    records = select_records(scan_dataset(Path(config["data_dir"])), audit["split"]["train"], limit, config["seed"])
    pixels = [load_arrays(Path(config["data_dir"]), records, preprocessing=preprocessing)[0]]
    if parts is not None:
        external = external_training_records(read_manifest(Path(config["external"])), parts, limit)
        pixels.append(load_arrays(Path("/"), external, preprocessing=preprocessing)[0])
    return np.concatenate(pixels)


def recompute_batchnorm(model: keras.Model, batches: tf.data.Dataset, count: int) -> int:
    """Set every BatchNormalization layer's statistics to their mean over ``count`` batches, in training mode.

    The momentum of a batch is the share of the images seen before it, so the moving statistics become the
    mean of the batches', each weighted by its size (the first batch's replace what was there); it is set
    back to the training momentum after.

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
    used, seen = 0, 0
    try:
        for images, *_ in batches.take(count):
            n = int(images.shape[0])
            for layer in layers:
                layer.momentum = seen / (seen + n)
            model(images, training=True)
            used, seen = used + 1, seen + n
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
    configs = check_ingredients(runs)
    config = configs[0]
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
    soup_config = {**config, "out_dir": str(out_dir), "soup_of": [str(r) for r in runs]}
    (out_dir / "config.json").write_text(json.dumps(soup_config, indent=1))
    differences = {  # what the ingredients' configurations do not share (the soup's config.json is the first's)
        key: [c.get(key) for c in configs]
        for key in sorted(set().union(*configs) - {"out_dir"})
        if len({json.dumps(c.get(key)) for c in configs}) > 1
    }
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
    soup = {
        "ingredients": ingredients,
        "differences": differences,
        "batchnorm_batches": used,
        "batch_size": batch_size,
        "seconds": elapsed,
    }
    (out_dir / SOUP_FILE).write_text(json.dumps(soup, indent=1))
    session = {
        "command": command or " ".join(["braintumor", *sys.argv[1:]]),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # the ingredients' training and the soup's own time: what it took to make these weights
        "train_seconds_this_session": round(sum(i["seconds"] for i in ingredients) + elapsed, 1),
        "epochs_run": sum(i["epochs"] for i in ingredients),
        "train_images": len(pixels),
        "val_images": len(audit["split"]["val"]),
        "versions": software_versions(),
    }
    run_info = {"sessions": [session], "total_train_seconds": session["train_seconds_this_session"], "soup": soup}
    (out_dir / "run.json").write_text(json.dumps(run_info, indent=1))
    print(f"Done in {elapsed / 60:.1f} min; the soup is {out_dir / BEST_CHECKPOINT} ({len(LABELS)} classes)")
    return out_dir
