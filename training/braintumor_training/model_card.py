"""The model card of a published version: written by ``braintumor export``, sections added by later commands.

:func:`render_model_card` writes the whole card when a version is published; :func:`set_section` puts or
replaces one section of an existing card (``braintumor robustness`` adds its comparison there). Importing this
module does not import TensorFlow (``robustness`` runs without it): the card's renderers import the evaluation
and training helpers they need when they run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from braintumor.config import LABELS
from braintumor.model_repository import PREPROCESSING_FILE
from braintumor.preprocessing import Preprocessing
from braintumor_training.subgroups import find_row, format_proportion, render_table, render_targets

#: A published version's model card, beside its ``model.onnx``.
CARD_FILE = "model-card.md"

if TYPE_CHECKING:
    from braintumor_training.export import QualityGate

#: What each augmentation profile does, for the model card.
AUGMENTATION_DESCRIPTIONS = {
    "v1": "mild flip/rotation/zoom/brightness/contrast augmentation",
    "robust": "augmentation for what scanners vary and the preprocessing does not undo (flip, rotation, "
    "crops into the head, some zoom-out, aspect ratio, translation, gamma 0.5–2.2, MR bias field, noise, "
    "mild brightness/contrast)",
    "sequence": "the robust augmentation plus what another MRI sequence does to tissue contrast (a random, not "
    "necessarily monotone intensity remapping; an inversion of the head's intensities), so that the shape of a "
    "lesion, not the brightness of fluid, decides",
}
#: The manifest dataset's sources, for the model card.
EXTERNAL_SOURCES = (
    "*Brain Tumor MRI Images 44 classes* (Feltrin): slices of Radiopaedia cases, T1, T1 with contrast and T2, "
    "gliomas, meningiomas, other tumour types and normal slices; Radiopaedia publishes under **CC BY-NC-SA "
    "3.0** (non-commercial use only, attribution, share-alike: a model or data derived from it must be "
    "shared under the same terms)",
    "*Br35H :: Brain Tumor Detection 2020*, its tumour half (type not given; mixed sequences, about a third T2 "
    "and a quarter FLAIR); published for research on Kaggle (its normal half is already in the Kaggle set)",
)


def describe_preprocessing(preprocessing: Preprocessing) -> str:
    """One phrase saying what a version's preprocessing does (for its model card)."""
    steps = [
        "decode (JPEG at a reduced DCT scale, Pillow's draft)" if preprocessing.jpeg_draft else "decode",
        "convert to 8-bit grey",
    ]
    if preprocessing.crop_to_head:
        steps.append("crop to the head (borders, off-centre framing and pixel aspect undone)")
    if preprocessing.normalize_intensity:
        steps.append("stretch the 1st–99.5th intensity percentiles to 0–255 (brightness and contrast undone)")
    steps.append(f"resize to {preprocessing.size}×{preprocessing.size} (bilinear)")
    return ", ".join(steps) + f" (`{PREPROCESSING_FILE}`: `{preprocessing.to_json()}`)"


def compare_with_previous(version: int, metrics: dict[str, Any], previous: dict[str, Any] | None) -> list[str]:
    """Markdown lines comparing the clean results with the previous version's published ones."""
    if not previous:
        return []
    lines = [
        f"Against version {version - 1} (clean images; Δ in points):",
        "",
        "| set | accuracy | Δ | tumor sensitivity | Δ | tumor specificity | Δ |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("test", "test_leak_free"):
        now, before = metrics[name], previous[name]
        cells = []
        for key in ("accuracy", "tumor_sensitivity", "tumor_specificity"):
            cells += [f"{now[key]:.4f}", f"{100 * (now[key] - before[key]):+.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    loss = 100 * (previous["test_leak_free"]["accuracy"] - metrics["test_leak_free"]["accuracy"])
    verdict = "met" if loss <= 0.5 + 1e-9 else "**not met**"
    lines += ["", f"No loss of more than 0.5 points of leak-free accuracy against version {version - 1}: {verdict}."]
    return [*lines, ""]


#: The external subgroups whose tumour sensitivity the card names: (name, grouping, subgroup).
SCREENED_SUBGROUPS = (
    ("T1", "sequence", "T1"),
    ("T1C", "sequence", "T1C"),
    ("T2", "sequence", "T2"),
    ("Br35H", "source", "br35h"),
)


def _screening_figures(sets: dict[str, Any]) -> str:
    """``T1 0.935 (…), …, Br35H …, its specificity …``: the tumour sensitivity of each screened subgroup."""
    sensitivities = ", ".join(
        f"{name} {_cell(sets, grouping, subgroup)}" for name, grouping, subgroup in SCREENED_SUBGROUPS
    )
    return f"{sensitivities}, its specificity {_cell(sets, 'all', 'all', 'specificity')}"


def _cell(sets: dict[str, Any] | None, grouping: str, subgroup: str, key: str = "tumor_sensitivity") -> str:
    """One proportion of one external-test subgroup, formatted, or ``–``."""
    row = find_row(sets["external_test"]["subgroups"], grouping, subgroup) if sets and "external_test" in sets else None
    return format_proportion(row.get(key) if row else None)


def _flair_sentence(rows: list[dict[str, Any]]) -> str:
    """What the card says of FLAIR: its labelled rows, its rows read by eye, or that it has none."""
    labelled = find_row(rows, "sequence", "FLAIR")
    if labelled:
        return f" On FLAIR slices: {format_proportion(labelled.get('tumor_sensitivity'), counts=True)}."
    by_eye = [r for r in rows if r["grouping"] == "sequence_by_eye" and r["subgroup"].endswith("/ FLAIR (by eye)")]
    if by_eye:
        return (
            " On FLAIR slices read by eye (the manifest labels none): "
            + ", ".join(
                f"{r['subgroup'].split(' / ')[0]} {format_proportion(r.get('tumor_sensitivity'), counts=True)}"
                for r in by_eye
            )
            + "."
        )
    return " FLAIR has no labelled test slices of its own (Br35H mixes sequences without saying which)."


def subgroup_card_sections(metrics: dict[str, Any], version: int, config: dict[str, Any]) -> list[str]:
    """Model card sections for a run judged on a manifest dataset (empty for older runs).

    "Where it works and where it does not" (targets, and the external test part's subgroups with their
    intervals, beside the compared version's), the shortcut found in version 2, and how to read the class
    when the tumour type is not one of the four.

    Args:
        metrics: the run's evaluation.
        version: the version being published.
        config: the run's configuration.
    """
    from braintumor_training.evaluate import EVALUATION_DIR, external_summary_rows

    if "external_test" not in metrics:
        return []
    comparison = metrics.get("comparison")
    mine = {k: metrics[k] for k in ("test", "test_leak_free", "external_test") if k in metrics}
    models: dict[str, dict[str, Any]] = {}
    if comparison:
        models[f"v{comparison['version']}"] = comparison["sets"]
    models[f"v{version}" if f"v{version}" not in models else "this version"] = mine
    external = metrics["external_test"]
    lines = [
        "## Where it works and where it does not",
        "",
        f"Judged on the test part of the external data ({external['n_images']} slices the model never trained on "
        "and that chose nothing: not the temperature, not the checkpoint), split from its training part by "
        "near-duplicate group, and on Testing by class. Proportions with 95 % Wilson intervals; a tumour is "
        "called when the tumour probability is ≥ 0.5"
        + (
            f"; version {comparison['version']} scored on the same images with its own preprocessing"
            if comparison
            else ""
        )
        + ".",
        "",
        "Targets (set after version 2's shortcut was found; judged on the point estimate, its interval beside it):",
        "",
        *render_targets(metrics.get("targets", [])),
        "",
    ]
    for name, sets in models.items():
        if len(models) > 1:
            lines += [f"{name}:", ""]
        lines += [*external_summary_rows(sets, ("external_test",)), ""]
    proportions = ("tumor_sensitivity", "specificity", "class_accuracy")
    lines += [
        "External test part, by source, sequence and finding (class accuracy: gliomas and meningiomas, top class "
        "of the four):",
        "",
        *render_table({name: sets["external_test"]["subgroups"] for name, sets in models.items()}, proportions),
        "",
    ]
    if any(r["grouping"] == "sequence_by_eye" for r in external["subgroups"]):
        from braintumor_training.evaluate import BY_EYE_NOTE

        lines += [BY_EYE_NOTE.format(csv=metrics.get("sequences_by_eye") or "a hand-check CSV"), ""]
    if "subgroups" in metrics.get("test", {}):
        lines += [
            "Testing (Kaggle), by class:",
            "",
            *render_table(
                {name: sets["test"]["subgroups"] for name, sets in models.items() if "test" in sets},
                ("tumor_sensitivity", "specificity", "class_accuracy"),
            ),
            "",
        ]
    lines += [
        f"The forest plot of these intervals is the run's `{EVALUATION_DIR}/subgroups.png`.",
        "",
        "## The shortcut found in version 2",
        "",
        "In the Kaggle *Brain Tumor MRI Dataset* almost every tumour slice is T1 with contrast, and its T2 and "
        "FLAIR slices are nearly all in `notumor`. Version 2 learned that shortcut: bright fluid meant no "
        "tumour. It scored well on Testing, which shares the shortcut, and was never tested on other sources.",
    ]
    earlier = comparison["sets"] if comparison and comparison["version"] == 2 else None
    if earlier:
        lines[-1] += (
            " On the external test part its tumour sensitivity was "
            + _screening_figures(earlier)
            + " (95 % intervals)."
        )
    else:
        lines[-1] += " Its figures on the external test part: `docs/v2/external/subgroups.md`."
    lines += [
        "",
        f"Version {version} trains on the external training part too (tumours on T1, T2 and FLAIR)"
        + (
            ", with augmentation that changes tissue contrast as another sequence would"
            if config.get("augmentation") == "sequence"
            else ""
        )
        + ": on the same images its tumour sensitivity is "
        + _screening_figures(mine)
        + "."
        + _flair_sentence(external["subgroups"]),
        "",
        "## Reading the class when the tumour type is not one of the four",
        "",
        "The model knows four classes. A tumour of another type (schwannoma, metastasis, medulloblastoma, "
        "...) or of a type nobody gave was trained and is judged only on the **tumour probability** "
        "(1 − p(notumor)): that is the output to read. The class the model names for it is only the nearest of "
        "glioma, meningioma and pituitary, not a diagnosis of its type; such images never count toward a class "
        "accuracy above.",
        "",
    ]
    return lines


def earlier_phases(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The training phases a run continued (``--init-from``), oldest first: command, epochs and seconds of each.

    Args:
        config: the run's ``config.json``.
    """
    phases: list[dict[str, Any]] = []
    source = config.get("init_from")
    while source:
        run_dir = Path(source).parent
        try:
            run = json.loads((run_dir / "run.json").read_text())
            previous = json.loads((run_dir / "config.json").read_text())
        except FileNotFoundError:
            phases.insert(0, {"command": f"(weights of {source}; its run folder is gone)", "epochs": 0, "seconds": 0})
            break
        sessions = run.get("sessions", [])
        phases.insert(
            0,
            {
                "command": sessions[0].get("command", "braintumor train ...") if sessions else "braintumor train ...",
                "epochs": sum(x.get("epochs_run", 0) for x in sessions),
                "seconds": run.get("total_train_seconds", 0.0),
            },
        )
        source = previous.get("init_from")
    return phases


def render_model_card(
    model_name: str,
    version: int,
    metrics: dict[str, Any],
    run: dict[str, Any],
    audit: dict[str, Any],
    config: dict[str, Any],
    parity: dict[str, float],
    gate: QualityGate,
    previous: dict[str, Any] | None = None,
) -> str:
    """The model card published with a version (``previous``: the published metrics of the version before)."""
    from braintumor_training.evaluate import summary_rows
    from braintumor_training.train import run_preprocessing

    sessions = run.get("sessions", [])
    seconds = run.get("total_train_seconds", 0.0)
    last = sessions[-1] if sessions else {}
    versions = last.get("versions", {})
    s = audit["summary"]
    test, clean = metrics["test"], metrics["test_leak_free"]
    targets = [
        ("accuracy on Testing ≥ 0.98", test["accuracy"] >= 0.98),
        ("accuracy on the leak-free subset ≥ 0.97", clean["accuracy"] >= 0.97),
        (
            "tumor sensitivity ≥ 0.99 at specificity ≥ 0.97 (Testing, threshold 0.5)",
            test["tumor_sensitivity"] >= 0.99 and test["tumor_specificity"] >= 0.97,
        ),
    ]
    epochs = sum(x.get("epochs_run", 0) for x in sessions)
    earlier = earlier_phases(config)
    soup = run.get("soup") or {}  # braintumor soup: the runs whose weights were averaged
    return "\n".join(
        [
            f"# Model card: {model_name}, version {version}",
            "",
            "## What it is",
            "",
            f"A 4-class brain MRI slice classifier ({', '.join(LABELS)}): Keras MobileNetV3Small trained from "
            "scratch (no pretrained weights)"
            + (f" starting from `{config['weights']}`" if config.get("weights") else "")
            + f", input {config['image_size']}×{config['image_size']} grey pixels repeated over 3 channels (uint8, "
            "scaled inside the model) made by the shared preprocessing: "
            + describe_preprocessing(run_preprocessing(config))
            + "; output temperature-calibrated class probabilities and, for every class, a "
            "Grad-CAM map over the last convolution's grid (scaled to [0, 1]) showing where the evidence for that "
            "class lies. The tumor probability is 1 − p(notumor).",
            "",
            "## Intended use",
            "",
            "Research and clinical **decision support** only: it is **not a diagnostic device**, it is not "
            "cleared or approved by any regulator, and it must not be the basis of a diagnosis or treatment. A "
            "qualified reader reviews every scan; the model's output is a second opinion to prioritise or "
            "double-check, never a substitute.",
            "",
            "## Data",
            "",
            "Kaggle *Brain Tumor MRI Dataset* (Nickparvar, CC0; compiled from figshare, SARTAJ and Br35H), "
            "224×224 JPEG slices. The audit (perceptual hashing, 256-bit pHash, distance ≤ "
            f"{audit['threshold']}) found {s['exact_duplicate_groups']} groups of exact duplicates and "
            f"{s['test_images_with_near_duplicate_in_training']} of {s['test_images']} Testing images with a near "
            f"duplicate in Training. Validation ({s['val_images']} images) was split from Training (stratified, "
            f"seed {config['seed']}) keeping near-duplicate groups on one side; the model trained on "
            f"{last.get('train_images', s['train_images'])} images. Results are reported on the full Testing split "
            f"and on its leak-free subset ({clean['n_images']} images with no near duplicate in Training).",
            "",
            *(
                [
                    "Also trained on, and judged on, a second dataset of slices from other sources and sequences "
                    f"(`{config['external']}`, its test part {metrics['external_test']['n_images']} images), split by "
                    "near-duplicate group into training, validation and test parts. Its two sources:",
                    "",
                    *[f"- {source}." for source in EXTERNAL_SOURCES],
                    "",
                    "Use them for research and evaluation only; name both sources wherever this model is described.",
                    "",
                ]
                if "external_test" in metrics and config.get("external")
                else []
            ),
            "## How it was made",
            "",
            "```",
            *[phase["command"] for phase in earlier],
            *[ingredient["command"] for ingredient in soup.get("ingredients", [])],
            run.get("sessions", [{}])[0].get("command", "braintumor train ..."),
            f"braintumor evaluate {metrics['run_dir']}"
            + (" --tta flip" if metrics.get("tta") == "flip" else "")
            + (f" --compare-version {metrics['comparison']['version']}" if "comparison" in metrics else ""),
            f"braintumor export {metrics['run_dir']}",
            "```",
            "",
            "".join(
                f"Phase {k} ran {phase['epochs']} epochs in {phase['seconds'] / 60:.0f} minutes. "
                for k, phase in enumerate(earlier, start=1)
            )
            + (
                "Each later phase started from the previous one's best checkpoint with a new warm-up and cosine "
                f"cycle. This last phase (phase {len(earlier) + 1}): "
                if earlier
                else ""
            )
            + (
                f"{'a' if earlier else 'A'} model soup, the mean of the weights of {len(soup['ingredients'])} "
                "runs, each from the same start ("
                + "; ".join(
                    f"`{i['run']}`, {i['epochs']} epochs in {i['seconds'] / 60:.0f} minutes"
                    for i in soup["ingredients"]
                )
                + "), with the BatchNorm statistics recomputed on "
                f"{soup['batchnorm_batches']} augmented training batches of {soup['batch_size']}; together "
                if soup
                else ""
            )
            + f"{epochs} epochs, {seconds / 60:.0f} minutes of training on {versions.get('cpus', '?')} CPU cores"
            + (
                f" in {len(sessions)} sessions (" + "; ".join(str(x.get("finished")) for x in sessions[:-1]) + ")"
                if len(sessions) > 1
                else ""
            )
            + " "
            f"(TensorFlow {versions.get('tensorflow', '?')}, Keras {versions.get('keras', '?')}); batch "
            f"{config['batch_size']}, AdamW (peak learning rate {config['learning_rate']}, weight decay "
            f"{config['weight_decay']}), warm-up then cosine decay, label smoothing {config['label_smoothing']}, "
            + (
                f"validated and kept as an exponential moving average of the weights (momentum {config['ema']}), "
                if config.get("ema") and not soup
                else ""
            )
            + f"loss weights balanced by {config.get('balance', 'kind')}, BatchNorm momentum 0.9, "
            + AUGMENTATION_DESCRIPTIONS.get(
                config.get("augmentation", "v1"), f"{config.get('augmentation')} augmentation"
            )
            + ". "
            f"Calibration: temperature T = {metrics['temperature']:.4f} fitted on validation"
            + (
                " (Kaggle validation and the external validation part; a tumour of no class counts with the "
                "likelihood of 1 − p(notumor))"
                if len(metrics.get("temperature_fit", {}).get("sets", [])) > 1
                else ""
            )
            + ", built into the model."
            + (
                " Test-time augmentation, built into the model: the mean logits of the image and of its left-right "
                "mirror (twice the compute of one pass; the Grad-CAM maps are those of the image as sent)."
                if metrics.get("tta") == "flip"
                else ""
            ),
            "",
            "## Results",
            "",
            *summary_rows(metrics),
            "",
            f"Tumor ROC AUC on Testing {test.get('tumor_auc', float('nan')):.4f}, on the leak-free subset "
            f"{clean.get('tumor_auc', float('nan')):.4f}. Per-class figures are in `metrics.json`.",
            "",
            "Targets set for version 1:",
            "",
            *[f"- {name}: {'met' if ok else '**not met**'}" for name, ok in targets],
            "",
            *compare_with_previous(version, metrics, previous),
            f"Export checks: ONNX Runtime equals Keras on {parity['images']} Testing images (max |Δp| "
            f"{parity['max_abs_diff']:.1e}, {parity['argmax_mismatches']} different predictions; Grad-CAM maps "
            f"within {parity.get('heatmap_max_abs_diff', float('nan')):.1e}); quality gate "
            f"(accuracy ≥ {gate.min_accuracy}, leak-free accuracy ≥ {gate.min_leak_free_accuracy}, tumor "
            f"sensitivity ≥ {gate.min_tumor_sensitivity}) passed.",
            "",
            *subgroup_card_sections(metrics, version, config),
            "## Known limitations",
            "",
            "- One public dataset of 2-D slices, already resized to 224×224 with the aspect ratio lost; "
            "no patient identifiers, so the split cannot be made by patient, and the leak-free subset only removes "
            "images that *look* alike.",
            "- Only four classes: other lesions (metastases, haemorrhage, post-operative changes) are outside its "
            "scope and will be forced into one of them.",
            (
                "- Tested on two sources besides the Kaggle set (see *Where it works and where it does not*); other "
                "scanners, sites and sequences remain untested, and the external data's labels are per case, not "
                "per slice (a slice at the edge of a tumour may show little of it)."
                if "external_test" in metrics
                else "- Scanners, sequences and sites other than those in the dataset were not tested; accuracy may "
                "drop on them. Calibration was fitted on data from the same sources."
            ),
            "- A whole scan is a series of slices; the model judges one slice at a time.",
            *(
                [
                    "- The crop to the head looks for the largest bright region on a dark background; on an image "
                    "without a dark background it keeps the whole image, and a bright object beside the head as "
                    "large as a tenth of it widens the crop.",
                ]
                if run_preprocessing(config).crop_to_head
                else []
            ),
            "",
        ]
    )


def set_section(card: Path, heading: str, intro: str, body: str) -> None:
    """Put ``intro`` and ``body`` under ``heading`` in a model card, replacing that section when it is there.

    The section goes before "Known limitations" (or at the end); writing it twice gives the same card.

    Args:
        card: the ``model-card.md`` to edit.
        heading: the section's heading line (``## ...``).
        intro: a sentence saying where the section's figures come from.
        body: the section's text.
    """
    text = card.read_text()
    section = f"{heading}\n\n{intro}\n\n{body.strip()}\n\n"
    existing = re.search(rf"^{re.escape(heading)}$", text, flags=re.M)
    if existing:
        following = re.search(r"^## ", text[existing.end() :], flags=re.M)
        end = existing.end() + following.start() if following else len(text)
        text = text[: existing.start()] + section + text[end:]
    else:
        limitations = re.search(r"^## Known limitations$", text, flags=re.M)
        at = limitations.start() if limitations else len(text)
        text = text[:at] + ("" if text[:at].endswith("\n\n") else "\n") + section + text[at:]
    card.write_text(text.rstrip("\n") + "\n")
