"""Robustness to scanner and acquisition shifts: controlled, seeded image shifts at three severities.

Each shift is applied to the original image, before the shared preprocessing, as a different scanner or
protocol would have produced it; the published ONNX model of a version then classifies the result through
the same preprocessing its clients use. Results per shift and severity, on Testing and on its leak-free
subset: accuracy, macro-F1, tumor sensitivity and specificity.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageFilter

from braintumor.config import IMAGE_SIZE, INPUT_NAME, OUTPUT_NAME
from braintumor.model_repository import MODEL_FILE, read_preprocessing
from braintumor.preprocessing import Preprocessing, load_image, to_grey
from braintumor_training.dataset import TEST_SPLIT, scan_dataset
from braintumor_training.metrics import classification_metrics
from braintumor_training.model_card import set_section

Shift = Callable[[Image.Image, int, np.random.Generator], Image.Image]

#: Targets at the middle severity of every shift.
MIDDLE_SEVERITY = 2
TARGET_ACCURACY = 0.95
TARGET_TUMOR_SENSITIVITY = 0.98


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def _image(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def brightness(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """Add a constant: +20, +40, +60 grey levels."""
    return _image(_array(image) + (20, 40, 60)[level - 1])


def contrast(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """Scale around the mean by 0.8, 0.6, 0.4."""
    values = _array(image)
    return _image(values.mean() + (values - values.mean()) * (0.8, 0.6, 0.4)[level - 1])


def gamma(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """Gamma 1.3, 1.7, 2.2 on [0, 1] intensities."""
    return _image(255.0 * (_array(image) / 255.0) ** (1.3, 1.7, 2.2)[level - 1])


def bias_field(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """A smooth multiplicative MR bias field of amplitude ±20 %, ±35 %, ±50 % (random low-order polynomial)."""
    values = _array(image)
    y, x = np.mgrid[-1 : 1 : values.shape[0] * 1j, -1 : 1 : values.shape[1] * 1j]
    c = rng.normal(size=6)
    field = c[0] * x + c[1] * y + c[2] * x * y + c[3] * x**2 + c[4] * y**2 + c[5] * x**2 * y
    field = field / (np.abs(field).max() + 1e-9)
    return _image(values * (1.0 + (0.2, 0.35, 0.5)[level - 1] * field))


def gaussian_noise(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """Additive Gaussian noise, σ = 5, 10, 20 grey levels."""
    values = _array(image)
    return _image(values + rng.normal(0.0, (5, 10, 20)[level - 1], values.shape))


def rician_noise(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """Rician noise (magnitude of complex Gaussian noise), σ = 5, 10, 20, as in magnitude MR images."""
    values = _array(image)
    sigma = (5, 10, 20)[level - 1]
    return _image(np.hypot(values + rng.normal(0, sigma, values.shape), rng.normal(0, sigma, values.shape)))


def blur(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur, radius 0.7, 1.2, 2.0 pixels."""
    return image.filter(ImageFilter.GaussianBlur((0.7, 1.2, 2.0)[level - 1]))


def jpeg(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """JPEG re-compression at quality 50, 25, 10."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=(50, 25, 10)[level - 1])
    return Image.open(buffer).convert("L")


def down_up(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """Down-sampling to 1/2, 1/3, 1/4 of the side, then back up (bilinear)."""
    factor = (2, 3, 4)[level - 1]
    small = image.resize((image.width // factor, image.height // factor), Image.Resampling.BILINEAR)
    return small.resize(image.size, Image.Resampling.BILINEAR)


def zoom_out(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """Shrink to 85 %, 70 %, 55 % of the side, centred on a black border (a wider field of view)."""
    scale = (0.85, 0.7, 0.55)[level - 1]
    small = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    canvas = Image.new("L", image.size, 0)
    canvas.paste(small, ((image.width - small.width) // 2, (image.height - small.height) // 2))
    return canvas


def zoom_in(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """Crop 90 %, 80 %, 70 % of the side at a random off-centre position, resized back."""
    keep = (0.9, 0.8, 0.7)[level - 1]
    w, h = round(image.width * keep), round(image.height * keep)
    left, top = int(rng.integers(0, image.width - w + 1)), int(rng.integers(0, image.height - h + 1))
    return image.crop((left, top, left + w, top + h)).resize(image.size, Image.Resampling.BILINEAR)


def rotation(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """Rotation by 10°, 20°, 30° in a random direction."""
    angle = (10, 20, 30)[level - 1] * (1 if rng.random() < 0.5 else -1)
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)


def aspect_ratio(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """Squeeze one axis to 87 %, 77 %, 67 % and pad with black (a different pixel aspect or field of view)."""
    keep = (0.87, 0.77, 0.67)[level - 1]
    canvas = Image.new("L", image.size, 0)
    if rng.random() < 0.5:
        squeezed = image.resize((round(image.width * keep), image.height), Image.Resampling.BILINEAR)
        canvas.paste(squeezed, ((image.width - squeezed.width) // 2, 0))
    else:
        squeezed = image.resize((image.width, round(image.height * keep)), Image.Resampling.BILINEAR)
        canvas.paste(squeezed, (0, (image.height - squeezed.height) // 2))
    return canvas


SHIFTS: dict[str, Shift] = {
    "brightness": brightness,
    "contrast": contrast,
    "gamma": gamma,
    "bias_field": bias_field,
    "gaussian_noise": gaussian_noise,
    "rician_noise": rician_noise,
    "blur": blur,
    "jpeg": jpeg,
    "down_up": down_up,
    "zoom_out": zoom_out,
    "zoom_in": zoom_in,
    "rotation": rotation,
    "aspect_ratio": aspect_ratio,
}


def misses_target(metrics: dict[str, Any]) -> bool:
    """Whether one cell's metrics miss the accuracy or the tumor-sensitivity target."""
    return metrics["accuracy"] < TARGET_ACCURACY or metrics["tumor_sensitivity"] < TARGET_TUMOR_SENSITIVITY


@dataclass(frozen=True)
class Robustness:
    """Results: ``metrics[set][shift][severity]`` (severity 0 is the clean image)."""

    model: str
    metrics: dict[str, dict[str, dict[int, dict[str, Any]]]]
    preprocessing: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"model": self.model, "preprocessing": self.preprocessing, "metrics": self.metrics}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Robustness:
        """Read :meth:`to_dict`'s form back (JSON turns the severities into strings)."""
        metrics = {
            set_name: {shift: {int(k): v for k, v in levels.items()} for shift, levels in by_shift.items()}
            for set_name, by_shift in data["metrics"].items()
        }
        return cls(data["model"], metrics, data.get("preprocessing"))

    def misses(self, set_name: str, level: int = MIDDLE_SEVERITY) -> list[str]:
        """The shifts that miss :data:`TARGET_ACCURACY` or :data:`TARGET_TUMOR_SENSITIVITY` at ``level``."""
        return [name for name, levels in self.metrics[set_name].items() if misses_target(levels[level])]


def evaluate_robustness(
    model: Path,
    data_dir: Path,
    leak_free: set[str],
    seed: int = 0,
    shifts: dict[str, Shift] | None = None,
    limit: int | None = None,
    preprocessing: Preprocessing | None = None,
) -> Robustness:
    """Classify every Testing image under every shift and severity with the ONNX model of a version.

    Args:
        model: the version's ``model.onnx``.
        data_dir: dataset root with ``Testing/``.
        leak_free: Testing paths (relative to ``data_dir``) with no near duplicate in Training.
        seed: seed of the random parts of the shifts (the same for every version compared).
        shifts: the shifts to apply (default: all of :data:`SHIFTS`).
        limit: use only every n-th image so that about ``limit`` images remain (quick runs).
        preprocessing: the version's preprocessing (default: a plain resize to the model's input size).
    """
    shifts = SHIFTS if shifts is None else shifts
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    size = int(session.get_inputs()[0].shape[1])
    preprocessing = preprocessing or Preprocessing(size)
    records = [r for r in scan_dataset(data_dir, (TEST_SPLIT,))]
    if limit:
        records = records[:: max(1, len(records) // limit)]
    labels = np.array([r.label_index for r in records])
    clean_set = np.array([r.path in leak_free for r in records])
    originals = [to_grey(load_image(data_dir / r.path)) for r in records]

    def score(images: list[Image.Image]) -> np.ndarray:
        pixels = np.stack([preprocessing.apply(image)[0] for image in images])
        return np.concatenate(
            [session.run([OUTPUT_NAME], {INPUT_NAME: pixels[i : i + 64]})[0] for i in range(0, len(pixels), 64)]
        )

    results: dict[str, dict[str, dict[int, dict[str, Any]]]] = {"test": {}, "test_leak_free": {}}
    clean = score(originals)
    for name, shift in shifts.items():
        for level in (0, 1, 2, 3):
            if level == 0:
                probabilities = clean
            else:
                rng = np.random.default_rng([seed, list(SHIFTS).index(name) if name in SHIFTS else 99, level])
                probabilities = score([shift(image, level, rng) for image in originals])
            for set_name, mask in (("test", np.ones(len(records), bool)), ("test_leak_free", clean_set)):
                if mask.any():
                    m = classification_metrics(probabilities[mask], labels[mask])
                    results[set_name].setdefault(name, {})[level] = {
                        k: m[k] for k in ("n_images", "accuracy", "macro_f1", "tumor_sensitivity", "tumor_specificity")
                    }
    return Robustness(str(model), results, preprocessing.to_dict())


def render_table(result: Robustness, set_name: str) -> str:
    """Markdown: accuracy / tumor sensitivity per shift (rows) and severity (columns)."""
    lines = ["| shift | clean | severity 1 | severity 2 | severity 3 |", "|---|---:|---:|---:|---:|"]
    for name, levels in result.metrics[set_name].items():
        cells = [f"{levels[k]['accuracy']:.3f} / {levels[k]['tumor_sensitivity']:.3f}" for k in (0, 1, 2, 3)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _draw_grid(
    ax: Any, result: Robustness, set_name: str, shifts: list[str], key: str, fontsize: int
) -> tuple[Any, Any]:
    """One metric per shift (rows) and severity (columns) as an annotated heatmap on ``ax``."""
    grid = np.array([[result.metrics[set_name][s][k][key] for k in (0, 1, 2, 3)] for s in shifts])
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.5, vmax=1.0, aspect="auto")
    ax.set_xticks(range(4), ["clean", "sev. 1", "sev. 2", "sev. 3"])
    ax.set_yticks(range(len(shifts)), shifts)
    for i in range(len(shifts)):
        for j in range(4):
            ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=fontsize)
    return image, grid


def plot_heatmap(result: Robustness, path: Path, set_name: str = "test_leak_free") -> None:
    """Accuracy per shift and severity as a heatmap figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.metrics[set_name])
    fig, ax = plt.subplots(figsize=(6, 0.42 * len(names) + 1.4))
    image, _ = _draw_grid(ax, result, set_name, names, "accuracy", fontsize=8)
    ax.set_title(f"Accuracy under shifts ({set_name}, n={result.metrics[set_name][names[0]][0]['n_images']})")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_comparison(before: Robustness, after: Robustness, names: tuple[str, str]) -> str:
    """Markdown: two versions side by side at the middle severity (and clean), with the targets."""
    old, new = names
    lines = [
        f"Targets at severity {MIDDLE_SEVERITY} of every shift: accuracy ≥ {TARGET_ACCURACY:.2f} and tumor "
        f"sensitivity ≥ {TARGET_TUMOR_SENSITIVITY:.2f}. Cells: accuracy / tumor sensitivity, **bold** where a "
        "target is missed.",
        "",
    ]
    for set_name in ("test", "test_leak_free"):
        n = after.metrics[set_name][next(iter(after.metrics[set_name]))][0]["n_images"]
        lines += [
            f"### {set_name} ({n} images)",
            "",
            f"| shift | {old} clean | {new} clean | {old} severity {MIDDLE_SEVERITY} | {new} severity "
            f"{MIDDLE_SEVERITY} | {new} severity 3 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for shift, levels in after.metrics[set_name].items():
            earlier = before.metrics[set_name].get(shift)

            def cell(m: dict[str, Any] | None, level: int) -> str:
                if m is None:
                    return "–"
                text = f"{m['accuracy']:.3f} / {m['tumor_sensitivity']:.3f}"
                return f"**{text}**" if level == MIDDLE_SEVERITY and misses_target(m) else text

            lines.append(
                f"| {shift} | {cell(earlier and earlier[0], 0)} | {cell(levels[0], 0)} | "
                f"{cell(earlier and earlier[MIDDLE_SEVERITY], MIDDLE_SEVERITY)} | "
                f"{cell(levels[MIDDLE_SEVERITY], MIDDLE_SEVERITY)} | {cell(levels[3], 3)} |"
            )
        misses = after.misses(set_name)
        lines += [
            "",
            f"{new} misses a target at severity {MIDDLE_SEVERITY} on {len(misses)} of {len(after.metrics[set_name])} "
            f"shifts{': ' + ', '.join(misses) if misses else ''} ({old}: {len(before.misses(set_name))}).",
            "",
        ]
    return "\n".join(lines)


def plot_comparison(
    before: Robustness, after: Robustness, names: tuple[str, str], path: Path, set_name: str = "test_leak_free"
) -> None:
    """Two versions side by side: accuracy and tumor sensitivity per shift and severity, targets outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    shifts = [n for n in after.metrics[set_name] if n in before.metrics[set_name]]
    panels = [
        (result, name, key, target)
        for key, target in (("accuracy", TARGET_ACCURACY), ("tumor_sensitivity", TARGET_TUMOR_SENSITIVITY))
        for result, name in ((before, names[0]), (after, names[1]))
    ]
    fig, axes = plt.subplots(1, 4, figsize=(15, 0.42 * len(shifts) + 1.8), sharey=True)
    for ax, (result, name, key, target) in zip(axes, panels, strict=True):
        image, grid = _draw_grid(ax, result, set_name, shifts, key, fontsize=7)
        for i in range(len(shifts)):
            if grid[i, MIDDLE_SEVERITY] < target:  # a missed target at the middle severity
                ax.add_patch(Rectangle((MIDDLE_SEVERITY - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="black"))
        ax.set_title(f"{name}: {key.replace('_', ' ')} (target ≥ {target:.2f})", fontsize=9)
    n = after.metrics[set_name][shifts[0]][0]["n_images"]
    title = f"Robustness under shifts, {set_name} (n={n}); boxed: target missed at severity {MIDDLE_SEVERITY}"
    fig.suptitle(title, fontsize=10, y=1.02)
    fig.colorbar(image, ax=axes, fraction=0.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_report(result: Robustness, out_dir: Path) -> None:
    """``robustness.json``, ``robustness.md`` and ``robustness.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "robustness.json").write_text(json.dumps(result.to_dict(), indent=1))
    text = [f"# Robustness of `{result.model}`", "", "Cells: accuracy / tumor sensitivity.", ""]
    if result.preprocessing:
        text[1:1] = ["", f"Preprocessing: `{json.dumps(result.preprocessing, sort_keys=True)}`."]
    for set_name in ("test", "test_leak_free"):
        text += [f"## {set_name}", "", render_table(result, set_name), ""]
    (out_dir / "robustness.md").write_text("\n".join(text))
    plot_heatmap(result, out_dir / "robustness.png")


#: The model card section that :func:`compare_versions` writes.
CARD_HEADING = "## Robustness to scanner and acquisition shifts"


def evaluate_version(
    model_dir: Path, version: int, data_dir: Path, seed: int = 0, limit: int | None = None
) -> Robustness:
    """:func:`evaluate_robustness` of a published version, with the preprocessing it was trained with, on the
    Testing images of ``data_dir`` (and its leak-free subset, as its ``metrics.json`` lists it).

    Args:
        model_dir: the model's folder in the repository (``model_repository/<name>``).
        version: a published version.
        data_dir: the folder-per-class dataset.
        seed: seed of the shifts.
        limit: use about this many Testing images.
    """
    folder = model_dir / str(version)
    metrics = json.loads((folder / "metrics.json").read_text())
    leak_free = set(metrics.get("leak_free_test_images", []))
    preprocessing = read_preprocessing(model_dir, int(metrics.get("image_size", 0)) or IMAGE_SIZE)[version]
    result = evaluate_robustness(
        folder / MODEL_FILE, data_dir, leak_free, seed=seed, limit=limit, preprocessing=preprocessing
    )
    return Robustness(f"{model_dir.name} version {version}", result.metrics, result.preprocessing)


def same_images(before: Robustness, after: Robustness) -> bool:
    """Whether both results were measured on the same number of images in every set and shift they share."""
    return all(
        before.metrics[s][shift][0]["n_images"] == levels[0]["n_images"]
        for s in after.metrics
        for shift, levels in after.metrics[s].items()
        if shift in before.metrics.get(s, {})
    )


def compare_versions(before: Robustness, after: Robustness, baseline: Path, out_dir: Path, model_name: str) -> str:
    """Write ``comparison.md`` and ``comparison.png`` of two results into ``out_dir``; return the comparison.

    Args:
        before: the earlier version's result (read from ``baseline``).
        after: this version's result.
        baseline: the ``robustness.json`` ``before`` was read from (names it when its model is another's).
        out_dir: the report folder.
        model_name: the served model's name.
    """
    prefix = f"{model_name} version "
    earlier = f"v{before.model.removeprefix(prefix)}" if before.model.startswith(prefix) else baseline.parent.name
    names = (earlier, f"v{after.model.removeprefix(prefix)}")
    comparison = render_comparison(before, after, names)
    (out_dir / "comparison.md").write_text(
        f"# Robustness: {names[1]} against {names[0]}\n\n{comparison}\n![comparison](comparison.png)\n"
    )
    plot_comparison(before, after, names, out_dir / "comparison.png")
    return comparison


def write_card_section(card: Path, comparison: str) -> None:
    """Put the comparison into the version's model card (:data:`CARD_HEADING`), replacing an earlier one.

    Args:
        card: the version's ``model-card.md``.
        comparison: :func:`compare_versions`' text.
    """
    set_section(card, CARD_HEADING, "Seeded shifts of the Testing images (see `braintumor robustness`).", comparison)
