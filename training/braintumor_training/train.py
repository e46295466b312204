"""``braintumor train``: audit the dataset, split it without leakage, and train MobileNetV3Small.

A run folder holds everything a run makes: the audit, the split, the configuration, checkpoints
(``best.keras``, ``last.keras``), a ``backup/`` for resuming, ``history.csv`` and TensorBoard logs.
Running the same command again on the same run folder resumes an interrupted run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from braintumor.config import IMAGE_SIZE, LABELS
from braintumor.preprocessing import Preprocessing
from braintumor_training.audit import DEFAULT_NEAR_DUPLICATE_THRESHOLD, audit_dataset
from braintumor_training.augment import build_augmenter
from braintumor_training.dataset import ImageRecord, load_arrays
from braintumor_training.external import ManifestRecord, external_split, read_manifest, target_mask
from braintumor_training.model import build_classifier

BEST_CHECKPOINT = "best.keras"
LAST_CHECKPOINT = "last.keras"
EXTERNAL_SPLIT_FILE = "external_split.json"


class TrainingError(RuntimeError):
    """Training cannot start or went wrong in a way the user must act on."""


#: How the loss weights images (:attr:`TrainConfig.balance`).
BALANCES = ("kind", "source", "kind-source")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json`` in the run folder).

    Args:
        data_dir: dataset root with ``Training/`` and ``Testing/`` class folders.
        out_dir: the run folder.
        image_size: side of the square model input.
        epochs: most epochs to train (early stopping may end sooner).
        batch_size: images per step.
        learning_rate: peak learning rate after warm-up.
        weight_decay: AdamW decoupled weight decay.
        label_smoothing: cross-entropy label smoothing.
        warmup_epochs: epochs of linear learning-rate warm-up before the cosine decay.
        patience: epochs without a better validation loss before stopping early.
        val_fraction: share of Training held out for validation.
        seed: seed of the split, the initial weights, shuffling and augmentation.
        threshold: near-duplicate Hamming distance used by the audit.
        weights: optional local backbone weights file to start from.
        limit_per_class: keep at most this many training images per class (smoke tests).
        collapse_grace_epochs: epochs before the collapse guard may stop a run.
        augmentation: augmentation profile, ``v1`` (mild) or ``robust`` (scanner and framing shifts).
        crop_to_head: preprocessing crops each image to the head (see :class:`braintumor.preprocessing.Preprocessing`).
        normalize_intensity: preprocessing stretches each image's intensity percentiles to 0–255.
        init_from: optional checkpoint (``best.keras`` of an earlier run) whose weights the run starts from: a
            second training phase with a new warm-up and cosine cycle. Its image size may differ (the network
            ends in global pooling, so its weights do not depend on the input size).
        external: optional manifest dataset (``manifest.csv``, see :mod:`braintumor_training.external`) whose
            training part joins the training images and whose validation part joins validation.
        jpeg_draft: preprocessing decodes JPEGs at a reduced DCT scale (Pillow's ``draft``); published with the
            version, so that training, evaluation and every client decode the same pixels.
        balance: how the loss weights images: ``kind`` gives each kind of target (a class, or "any tumour")
            the same total weight; ``source`` gives each (dataset, kind) pair the same total weight, so that
            a dataset's few normal slices are not outweighed by another dataset's many; ``kind-source`` keeps
            each kind's total weight as ``kind`` does and splits it equally between the datasets that have it
            (the share of normal slices in the loss, and so the prior, stays as under ``kind``).
        ema: momentum of an exponential moving average of the weights (Polyak averaging, Keras's
            ``use_ema``), or ``None`` for none. With it, validation and the checkpoints use the averaged
            weights, so the checkpoint chosen on validation is not one noisy step of the last epoch;
            0.998 averages over about 500 steps. Batch-normalisation statistics are not averaged.
    """

    data_dir: str
    out_dir: str
    image_size: int = IMAGE_SIZE
    epochs: int = 44
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_epochs: int = 2
    patience: int = 12
    val_fraction: float = 0.1
    seed: int = 42
    threshold: int = DEFAULT_NEAR_DUPLICATE_THRESHOLD
    weights: str | None = None
    limit_per_class: int | None = None
    collapse_grace_epochs: int = 5
    augmentation: str = "v1"
    crop_to_head: bool = False
    normalize_intensity: bool = False
    external: str | None = None
    init_from: str | None = None
    jpeg_draft: bool = False
    balance: str = "kind"
    ema: float | None = None

    @property
    def preprocessing(self) -> Preprocessing:
        """The shared preprocessing with this run's parameters (published with the model version)."""
        return Preprocessing(self.image_size, self.crop_to_head, self.normalize_intensity, jpeg_draft=self.jpeg_draft)


def run_preprocessing(config: dict[str, Any]) -> Preprocessing:
    """The preprocessing of a run from its saved ``config.json`` (runs before these options: a plain resize)."""
    return Preprocessing(
        int(config["image_size"]),
        bool(config.get("crop_to_head", False)),
        bool(config.get("normalize_intensity", False)),
        jpeg_draft=bool(config.get("jpeg_draft", False)),
    )


class SetCrossEntropy(keras.losses.Loss):
    """Cross-entropy against a set of allowed classes: ``-log Σ_{k allowed} p_k``, with label smoothing.

    ``y_true`` is a mask over the classes (:func:`braintumor_training.external.target_mask`): one-hot for a
    class label, where this is the usual cross-entropy; every tumour class for a tumour of another or an
    unstated type, where it is ``-log(1 − p(notumor))``, so no type is guessed. Label smoothing adds
    ``ε · mean_k(−log p_k)``, which for one-hot targets equals Keras' label smoothing.

    Args:
        label_smoothing: ε.
    """

    def __init__(self, label_smoothing: float = 0.0, name: str = "set_cross_entropy", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        log_total = tf.reduce_logsumexp(y_pred, axis=-1)
        allowed = tf.reduce_logsumexp(tf.where(y_true > 0, y_pred, -1e9), axis=-1)
        uniform = log_total - tf.reduce_mean(y_pred, axis=-1)
        return (1.0 - self.label_smoothing) * (log_total - allowed) + self.label_smoothing * uniform

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def set_accuracy(y_true, y_pred):
    """Share of images whose top class is an allowed one (accuracy, or tumour detection for tumour-only)."""
    top = tf.argmax(y_pred, axis=-1)
    return tf.cast(tf.gather(y_true, top, batch_dims=1) > 0, tf.float32)


class CollapseGuard(keras.callbacks.Callback):
    """Stops training when the model answers the same for every image in inference mode.

    A from-scratch MobileNetV3Small can do this when BatchNorm moving statistics lag the weights;
    the guard measures the spread of inference-mode probabilities over a fixed probe batch at each
    epoch end (logged as ``probe_std``) and stops after ``patience`` collapsed epochs past warm-up.

    Args:
        probe: a fixed batch of validation images (float pixels).
        min_std: a spread below this counts as collapsed.
        grace_epochs: epochs before the guard may stop training.
        patience: consecutive collapsed epochs that stop training.
    """

    def __init__(self, probe: np.ndarray, min_std: float = 0.01, grace_epochs: int = 3, patience: int = 3):
        super().__init__()
        self.probe, self.min_std = probe, min_std
        self.grace_epochs, self.patience = grace_epochs, patience
        self.collapsed_epochs = 0
        self.collapsed = False

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logits = self.model.predict(self.probe, verbose=0, batch_size=64)
        probabilities = tf.nn.softmax(logits).numpy()
        spread = float(probabilities.std(axis=0).max())
        if logs is not None:
            logs["probe_std"] = spread
        self.collapsed_epochs = self.collapsed_epochs + 1 if spread < self.min_std else 0
        if epoch + 1 >= self.grace_epochs and self.collapsed_epochs >= self.patience:
            self.collapsed = True
            self.model.stop_training = True
            print(
                f"\nCollapseGuard: inference-mode outputs have been constant (spread {spread:.2e}) for "
                f"{self.collapsed_epochs} epochs; stopping. Check BatchNorm momentum and learning rate."
            )


class AveragedWeights(keras.callbacks.SwapEMAWeights):
    """Keras' ``SwapEMAWeights(swap_on_epoch=True)``, also right when a run stops before its last epoch.

    With an optimizer that keeps an exponential moving average of the weights (``use_ema``), it puts the
    average into the model for validation and for the callbacks after it in the list (the checkpoints), and
    the raw weights back for training. Keras hands the average to the model at the end of ``fit`` only when
    the last epoch ran: after an early stop it would hand over the raw weights (which the swap left in the
    optimizer's slot). Placed after :class:`~keras.callbacks.EarlyStopping` in the list, this callback sees
    the stop and leaves the average in place.
    """

    def __init__(self) -> None:
        super().__init__(swap_on_epoch=True)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        if self.model.stop_training and epoch < self.params["epochs"] - 1:
            self._finalize_ema_values()  # the slot takes the average, which fit then copies into the model


def external_training_records(
    records: list[ManifestRecord], parts: dict[str, str], limit: int | None
) -> list[ManifestRecord]:
    """The manifest dataset's training part as a run trains on it (with ``limit``, a thinned subset).

    Args:
        records: the manifest dataset.
        parts: the run's split (``external_split.json`` ``parts``: path to ``train``, ``val`` or ``test``).
        limit: the run's ``limit_per_class`` (smoke tests), or ``None``.
    """
    chosen = [r for r in records if parts[r.path] == "train"]
    return chosen if limit is None else chosen[:: max(1, len(chosen) // (2 * limit))]


def software_versions() -> dict[str, Any]:
    """What a run was made with, kept in its ``run.json``: TensorFlow, Keras, Python, the machine and its CPUs."""
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def select_records(records: list[ImageRecord], paths: list[str], limit: int | None, seed: int) -> list[ImageRecord]:
    """The records of ``paths``, in that order; with ``limit``, at most that many per class (seeded)."""
    by_path = {r.path: r for r in records}
    chosen = [by_path[p] for p in paths]
    if limit is None:
        return chosen
    rng = np.random.default_rng(seed)
    kept: list[ImageRecord] = []
    for label in LABELS:
        of_label = [r for r in chosen if r.label == label]
        idx = rng.permutation(len(of_label))[:limit]
        kept += [of_label[i] for i in sorted(idx)]
    return kept


def make_dataset(
    pixels: np.ndarray,
    targets: np.ndarray,
    batch_size: int,
    *,
    training: bool,
    seed: int,
    augmentation: str = "v1",
    weights: np.ndarray | None = None,
) -> tf.data.Dataset:
    """A tf.data pipeline over already preprocessed uint8 pixels.

    The pixels come from :func:`braintumor.preprocessing.preprocess` (the client SDK's code), so the
    network sees in training exactly what a served model receives. Training batches are shuffled and
    augmented.

    Args:
        pixels: uint8 ``(n, size, size, 3)``.
        targets: class indices ``(n,)``, or masks of allowed classes ``(n, classes)`` (see
            :class:`SetCrossEntropy`).
        batch_size: images per batch.
        training: shuffle and augment.
        seed: seed of shuffling and augmentation.
        augmentation: the augmentation profile.
        weights: optional per-image loss weights.
    """
    masks = tf.one_hot(targets, len(LABELS)) if targets.ndim == 1 else tf.constant(targets, tf.float32)
    columns = (pixels, masks) if weights is None else (pixels, masks, weights.astype(np.float32))
    ds = tf.data.Dataset.from_tensor_slices(columns)
    if training:
        ds = ds.shuffle(len(targets), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    ds = ds.map(lambda x, *rest: (tf.cast(x, tf.float32), *rest), num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        augmenter = build_augmenter(seed, augmentation)
        ds = ds.map(lambda x, *rest: (augmenter(x), *rest), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def balanced_weights(kinds: np.ndarray, sources: np.ndarray | None = None) -> np.ndarray:
    """Per-image weights that give each kind of target (a class, or "any tumour") the same total weight.

    Args:
        kinds: the kind of target of each image.
        sources: optional dataset of each image: each kind's weight is then split equally between the
            datasets that have images of it.
    """
    values, inverse, counts = np.unique(kinds, return_inverse=True, return_counts=True)
    per_kind = len(kinds) / (len(values) * counts)
    weights = per_kind[inverse].astype(np.float64)
    if sources is not None:
        for k in range(len(values)):
            members = inverse == k
            names, where, per_source = np.unique(sources[members], return_inverse=True, return_counts=True)
            weights[members] = counts[k] * per_kind[k] / (len(names) * per_source[where])
    return weights.astype(np.float32)


def run_external_split(
    config: TrainConfig, records: list[ManifestRecord], out_dir: Path, training_images: list[Path]
) -> dict[str, Any]:
    """The split of the run's manifest dataset, kept as ``external_split.json`` in the run folder.

    A resumed run reads it back; a new run draws it (:func:`~braintumor_training.external.external_split`).

    Args:
        config: the run's configuration (its near-duplicate threshold and seed).
        records: the manifest dataset, already read and checked.
        out_dir: the run folder.
        training_images: the folder dataset's Training images: external groups near one of them stay in
            the external training part.
    """
    saved = out_dir / EXTERNAL_SPLIT_FILE
    if saved.exists():
        return json.loads(saved.read_text())
    split = external_split(records, config.threshold, config.seed, training_images=training_images)
    saved.write_text(json.dumps(split, indent=1))
    return split


def _check_config(out_dir: Path, config: TrainConfig) -> None:
    saved = out_dir / "config.json"
    if not saved.exists():
        return
    previous = json.loads(saved.read_text())
    current = dataclasses.asdict(config)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    # options added after the run started count as their default
    diff = {k: (previous.get(k), v) for k, v in current.items() if previous.get(k, defaults.get(k)) != v}
    if diff:
        raise TrainingError(
            f"{out_dir} holds a run with a different configuration ({diff}); "
            "use a new --out folder, or the same options to resume it"
        )


def _best_so_far(history: Path) -> float | None:
    """The lowest validation loss logged so far (a resumed run must not overwrite a better checkpoint)."""
    if not history.exists():
        return None
    with history.open() as f:
        losses = [float(row["val_loss"]) for row in csv.DictReader(f) if row.get("val_loss")]
    return min(losses) if losses else None


def train(config: TrainConfig, command: str | None = None) -> Path:
    """Audit, split and train; returns the run folder.

    Args:
        config: the run's configuration.
        command: the command line to record in the run (defaults to ``sys.argv``).
    """
    out_dir = Path(config.out_dir)
    if config.balance not in BALANCES:
        raise TrainingError(f"balance must be one of {', '.join(BALANCES)}, not {config.balance!r}")
    if config.ema is not None and not 0.0 < config.ema < 1.0:
        raise TrainingError(f"ema must be a momentum between 0 and 1 (e.g. 0.998), not {config.ema}")
    _check_config(out_dir, config)
    if (out_dir / LAST_CHECKPOINT).exists() and not (out_dir / "backup").exists():
        raise TrainingError(f"{out_dir} holds a finished run; evaluate it, or train into a new --out folder")
    external: list[ManifestRecord] = []
    if config.external:  # a bad manifest row stops the run before anything is written
        print(f"Checking {Path(config.external) / 'manifest.csv'} ...", flush=True)
        external = read_manifest(Path(config.external))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    keras.utils.set_random_seed(config.seed)

    print(f"Auditing {config.data_dir} ...", flush=True)
    report = audit_dataset(
        Path(config.data_dir), threshold=config.threshold, val_fraction=config.val_fraction, seed=config.seed
    )
    report.write(out_dir)
    s = report.summary
    print(
        f"  {s['images']} images, {s['unreadable']} unreadable, {s['exact_duplicate_groups']} exact-duplicate "
        f"groups, {s['test_images_with_near_duplicate_in_training']} Testing images with a near duplicate "
        f"in Training; split {s['train_images']} train / {s['val_images']} validation",
        flush=True,
    )
    from braintumor_training.dataset import scan_dataset

    records = scan_dataset(Path(config.data_dir))
    train_records = select_records(records, report.split["train"], config.limit_per_class, config.seed)
    val_limit = None if config.limit_per_class is None else max(2, config.limit_per_class // 4)
    val_records = select_records(records, report.split["val"], val_limit, config.seed)
    x_train, y_train = load_arrays(Path(config.data_dir), train_records, preprocessing=config.preprocessing)
    x_val, y_val = load_arrays(Path(config.data_dir), val_records, preprocessing=config.preprocessing)
    m_train, m_val = np.eye(len(LABELS), dtype=np.float32)[y_train], np.eye(len(LABELS), dtype=np.float32)[y_val]
    kinds = np.array([LABELS[k] for k in y_train], dtype=object)
    n_folder = len(kinds)  # the folder dataset's training images come first, the manifest dataset's after

    if external:
        training_images = [Path(config.data_dir) / p for p in report.split["train"] + report.split["val"]]
        split = run_external_split(config, external, out_dir, training_images)
        print(
            f"  {config.external}: {split['n_groups']} near-duplicate groups, split by group; "
            f"{split['near_other_training']} images near a Training image kept in its training part",
            flush=True,
        )
        parts = split["parts"]
        ext_train = external_training_records(external, parts, config.limit_per_class)
        ext_val = [r for r in external if parts[r.path] == "val"]
        if config.limit_per_class is not None:
            ext_val = ext_val[:: max(1, len(ext_val) // max(2, config.limit_per_class // 2))]
        extra: list[np.ndarray] = []
        for records_part in (ext_train, ext_val):
            pixels, _ = load_arrays(Path("/"), records_part, preprocessing=config.preprocessing)
            extra.append(pixels)
        x_train = np.concatenate([x_train, extra[0]])
        x_val = np.concatenate([x_val, extra[1]])
        m_train = np.concatenate([m_train, np.stack([target_mask(r.finding) for r in ext_train])])
        m_val = np.concatenate([m_val, np.stack([target_mask(r.finding) for r in ext_val])])
        kinds = np.concatenate([kinds, [r.finding if r.label_index is not None else "tumor" for r in ext_train]])
    print(f"Training on {len(m_train)} images, validating on {len(m_val)}", flush=True)

    sources = np.array(["brain-tumor-mri"] * n_folder + ["external"] * (len(kinds) - n_folder), dtype=object)
    if config.balance == "source":  # each (dataset, kind) pair is a kind of its own
        kinds[n_folder:] = [f"external:{k}" for k in kinds[n_folder:]]
    sample_weight = balanced_weights(kinds, sources if config.balance == "kind-source" else None)
    labels = [f"{s}:{k}" for s, k in zip(sources, kinds, strict=True)] if config.balance == "kind-source" else kinds
    class_weight = {str(k): float(w) for k, w in sorted(zip(labels, sample_weight, strict=True))}
    print(f"  loss weight per image ({config.balance}): " + ", ".join(f"{k} {w:.2f}" for k, w in class_weight.items()))

    steps_per_epoch = math.ceil(len(m_train) / config.batch_size)
    warmup = config.warmup_epochs * steps_per_epoch
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.learning_rate / 100,
        decay_steps=max(1, config.epochs * steps_per_epoch - warmup),
        warmup_target=config.learning_rate,
        warmup_steps=warmup,
        alpha=0.01,
    )
    model = build_classifier(config.image_size, weights=Path(config.weights) if config.weights else None)
    if config.init_from:
        earlier = keras.models.load_model(config.init_from, compile=False)
        model.set_weights(earlier.get_weights())
        print(f"Starting from the weights of {config.init_from}", flush=True)
    model.compile(
        optimizer=keras.optimizers.AdamW(
            learning_rate=schedule,
            weight_decay=config.weight_decay,
            use_ema=config.ema is not None,
            ema_momentum=config.ema or 0.99,
        ),
        loss=SetCrossEntropy(label_smoothing=config.label_smoothing),
        metrics=[set_accuracy],
    )
    # The probe mixes classes: a single-class probe has a small spread even when the model is healthy.
    probe_idx = np.concatenate([np.flatnonzero(y_val == k)[:16] for k in range(len(LABELS))])
    probe = x_val[probe_idx].astype(np.float32)
    guard = CollapseGuard(probe, grace_epochs=config.collapse_grace_epochs)
    callbacks = [
        keras.callbacks.BackupAndRestore(str(out_dir / "backup")),  # the raw weights and the optimizer's average
        guard,
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience),
        # with --ema: validation, the checkpoints and the last model use the averaged weights
        *([AveragedWeights()] if config.ema is not None else []),
        keras.callbacks.ModelCheckpoint(
            str(out_dir / BEST_CHECKPOINT),
            monitor="val_loss",
            save_best_only=True,
            initial_value_threshold=_best_so_far(out_dir / "history.csv"),  # a resumed run keeps its best
        ),
        keras.callbacks.CSVLogger(str(out_dir / "history.csv"), append=True),
        keras.callbacks.TensorBoard(str(out_dir / "tensorboard"), write_graph=False),
    ]
    started = time.time()
    history = model.fit(
        make_dataset(
            x_train,
            m_train,
            config.batch_size,
            training=True,
            seed=config.seed,
            augmentation=config.augmentation,
            weights=sample_weight,
        ),
        validation_data=make_dataset(x_val, m_val, 64, training=False, seed=config.seed),
        epochs=config.epochs,
        callbacks=callbacks,
        verbose=1 if sys.stdout.isatty() else 2,
    )
    elapsed = time.time() - started
    model.save(out_dir / LAST_CHECKPOINT)
    if guard.collapsed:
        raise TrainingError("training stopped: the model collapsed to a constant output (see CollapseGuard)")

    run_info = {
        "command": command or " ".join(["braintumor", *sys.argv[1:]]),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_seconds_this_session": round(elapsed, 1),
        "epochs_run": len(history.history.get("loss", [])),
        "train_images": len(m_train),
        "val_images": len(m_val),
        "class_weight": class_weight,
        "versions": software_versions(),
    }
    runs = out_dir / "run.json"
    previous = json.loads(runs.read_text()) if runs.exists() else {"sessions": []}
    previous["sessions"].append(run_info)
    previous["total_train_seconds"] = round(sum(x["train_seconds_this_session"] for x in previous["sessions"]), 1)
    runs.write_text(json.dumps(previous, indent=1))
    print(f"Done in {elapsed / 60:.1f} min; best checkpoint {out_dir / BEST_CHECKPOINT}", flush=True)
    return out_dir
