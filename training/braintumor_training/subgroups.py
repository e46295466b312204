"""Where the model works and where it does not: metrics per subgroup, with 95 % Wilson intervals.

A subgroup is a source, an MRI sequence, a source and sequence, or a finding (for the folder dataset's Testing
split: a class), and, for images whose sequence was read by eye where the manifest gives none, the source and
that sequence (rows marked *(by eye)*). For each, :func:`subgroup_rows` counts tumour sensitivity, specificity
(where the subgroup holds normal slices), class accuracy and glioma-versus-meningioma accuracy (where the
tumour type is one of the classes), each a proportion ``k / n`` with its Wilson score interval. Tumours whose
type is not one of the classes or not given (``other_tumor``, ``tumor``) count only toward tumour sensitivity,
never toward a class accuracy. :data:`TARGETS` are the issue's targets; :func:`check_targets` says which are
met (on the point estimate; the interval is shown beside it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.config import LABELS, NO_TUMOR_INDEX, NO_TUMOR_LABEL
from braintumor_training.metrics import (
    binary_calibration_error,
    calibration_intervals,
    classification_metrics,
    partial_label_metrics,
)

#: A tumour is called when its tumour probability (1 − p(notumor)) is at least this, as served.
TUMOR_THRESHOLD = 0.5
#: Two-sided 95 % standard normal quantile.
Z95 = 1.959963984540054
#: Source name given to the folder dataset's images (which name no source or sequence).
FOLDER_SOURCE = "brain-tumor-mri"
#: Groupings of the folder dataset's Testing split: everything, and each class.
FOLDER_GROUPINGS: tuple[str, ...] = ("all", "finding")
#: Groupings of a manifest dataset: everything, each source, sequence, source and sequence, finding, and the
#: sequence read by eye where the manifest gives none (only the images that have one).
EXTERNAL_GROUPINGS: tuple[str, ...] = ("all", "source", "sequence", "source_sequence", "finding", "sequence_by_eye")
#: Classes whose accuracy is counted on a manifest dataset (its typed tumours; it has no pituitary).
EXTERNAL_ACCURACY_CLASSES: tuple[str, ...] = ("glioma", "meningioma")
#: The proportions each row holds, in the order tables show them.
PROPORTIONS: tuple[str, ...] = ("tumor_sensitivity", "specificity", "class_accuracy", "glioma_vs_meningioma")
PROPORTION_TITLES = {
    "tumor_sensitivity": "tumour sensitivity",
    "specificity": "specificity",
    "class_accuracy": "class accuracy",
    "glioma_vs_meningioma": "glioma vs meningioma",
}


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n``.

    Args:
        k: successes.
        n: trials (at least 1).
        z: standard normal quantile (1.96 for 95 %).

    Returns:
        ``(low, high)``, within [0, 1]; it always contains ``k / n``.
    """
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    return _wilson(k / n, n, z)


def _wilson(p: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` over ``n`` trials (``n`` may be an effective, fractional count)."""
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def group_interval(hits: np.ndarray, groups: np.ndarray, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson interval of a proportion over its effective number of images, given groups of near duplicates.

    Near duplicates (neighbouring slices, reprocessed copies) are not independent: when they pass or fail
    together, a Wilson interval over images is too narrow. The cluster-robust (linearization) variance of
    the proportion, groups as clusters, over the binomial one is the design effect (floored at 1); the Wilson
    interval is taken with the image count divided by it (Korn and Graubard's effective sample size, without
    their degrees-of-freedom correction). With every image its own group the design effect is about 1;
    when whole groups pass or fail together it is about the size-weighted mean group size. At a proportion
    of 0 or 1 nothing shows how groups vary, and every group is taken to agree within itself (effective
    count ``n² / Σ size²``). Near 1 with one or two failing groups the variance rests on those few groups
    and the interval stays too narrow when groups are strongly alike (simulated coverage about 0.9).

    Args:
        hits: ``(n,)`` booleans, one per counted image (a tumour found, a normal slice passed, ...).
        groups: ``(n,)`` the group of each image.
        z: standard normal quantile (1.96 for 95 %).

    Returns:
        ``(low, high)``, within [0, 1]; it always contains the proportion.
    """
    hits, groups = np.asarray(hits, bool), np.asarray(groups)
    if len(hits) == 0 or len(hits) != len(groups):
        raise ValueError(f"need as many groups as images, at least one: {len(hits)} images, {len(groups)} groups")
    n, p = len(hits), float(hits.mean())
    _, index = np.unique(groups, return_inverse=True)
    successes, trials = np.bincount(index, weights=hits.astype(float)), np.bincount(index).astype(float)
    clusters = len(trials)
    if p in (0.0, 1.0) or clusters < 2:
        effective = n * n / float((trials**2).sum())  # every group agrees within itself
    else:
        robust = clusters / (clusters - 1) * float(((successes - p * trials) ** 2).sum()) / n**2
        effective = n / max(1.0, robust / (p * (1 - p) / n))
    return _wilson(p, effective, z)


def proportion(k: int, n: int) -> dict[str, Any] | None:
    """``{"k", "n", "value", "low", "high"}`` with the 95 % Wilson interval, or ``None`` when ``n`` is 0.

    Args:
        k: successes.
        n: trials.
    """
    if n == 0:
        return None
    low, high = wilson_interval(int(k), int(n))
    return {"k": int(k), "n": int(n), "value": k / n, "low": low, "high": high}


@dataclass(frozen=True)
class Subject:
    """What a subgroup needs to know of an image.

    Args:
        source: the dataset the image comes from.
        sequence: its MRI sequence (``unknown`` where not given).
        finding: its class, ``other_tumor`` or ``tumor``.
        by_eye: its sequence read by eye, where the manifest gives none and it was read (else ``""``).
        group: its group of near duplicates, where known (else ``None``).
    """

    source: str
    sequence: str
    finding: str
    by_eye: str = ""
    group: int | None = None

    @classmethod
    def of(cls, record: Any) -> Subject:
        """From a manifest record (source, sequence, finding, sequence by eye, group) or a folder record."""
        if hasattr(record, "finding"):
            return cls(
                record.source,
                record.sequence,
                record.finding,
                getattr(record, "sequence_by_eye", ""),
                getattr(record, "group", None),
            )
        return cls(FOLDER_SOURCE, "unknown", record.label)


#: How each grouping names an image's subgroup (``None``: the image is in none of its subgroups).
GROUPINGS: dict[str, Callable[[Subject], str | None]] = {
    "all": lambda s: "all",
    "source": lambda s: s.source,
    "sequence": lambda s: s.sequence,
    "source_sequence": lambda s: f"{s.source} / {s.sequence}",
    "finding": lambda s: s.finding,
    "sequence_by_eye": lambda s: f"{s.source} / {s.by_eye} (by eye)" if s.by_eye else None,
}
#: Groupings whose rows are never marked ``same_as`` (and so never left out of tables and figures).
ALWAYS_SHOWN: frozenset[str] = frozenset({"sequence_by_eye"})
GROUPING_TITLES = {
    "all": "",
    "source": "source",
    "sequence": "sequence",
    "source_sequence": "",
    "finding": "",
    "sequence_by_eye": "",
}


def row_label(row: Mapping[str, Any]) -> str:
    """How a table or figure names a row: ``all``, ``source br35h``, ``sequence T2``, ``feltrin / T1``, ``glioma``."""
    title = GROUPING_TITLES.get(row["grouping"], row["grouping"])
    return f"{title} {row['subgroup']}".strip()


def subgroup_rows(
    probabilities: np.ndarray,
    records: Sequence[Any],
    groupings: Sequence[str] = EXTERNAL_GROUPINGS,
    accuracy_classes: Sequence[str] = EXTERNAL_ACCURACY_CLASSES,
    tumor_threshold: float = TUMOR_THRESHOLD,
) -> list[dict[str, Any]]:
    """One row of counts and proportions for each subgroup of ``records``.

    A subgroup with exactly the images of an earlier row names that row in ``same_as`` (on the external
    data, for instance, ``feltrin / T1`` is ``sequence T1``, and ``tumor`` is ``source br35h``); tables and
    figures leave such rows out, except those of :data:`ALWAYS_SHOWN`. A grouping that names no subgroup for
    an image (``None``: no sequence read by eye) leaves it out of that grouping's rows.

    Args:
        probabilities: ``(n, classes)`` predicted probabilities, in the order of ``records``.
        records: the images (:class:`~braintumor_training.external.ManifestRecord` or
            :class:`~braintumor_training.dataset.ImageRecord`).
        groupings: names of :data:`GROUPINGS`, in the order of the rows.
        accuracy_classes: the findings whose class accuracy is counted (their top class must be theirs).
        tumor_threshold: a tumour is called when ``1 − p(notumor) ≥ tumor_threshold``.

    Returns:
        Rows with ``grouping``, ``subgroup``, ``n``, ``n_tumor``, ``n_normal``, ``n_typed`` (images with a
        class in ``accuracy_classes``) and the proportions of :data:`PROPORTIONS` (each ``None`` where the
        subgroup has no image to count): ``tumor_sensitivity`` over tumours (typed or not),
        ``specificity`` over normal slices, ``class_accuracy`` (top class among all four is the true one)
        over ``accuracy_classes``, ``glioma_vs_meningioma`` (the larger of the two is the true one) over
        gliomas and meningiomas; ``same_as``: the label of an earlier row with the same images, or ``None``.
        Where every record knows its group of near duplicates (``group``), each proportion also holds
        ``group_low`` and ``group_high``: :func:`group_interval`, the interval that counts groups as clusters.
    """
    probabilities = np.asarray(probabilities)
    if len(probabilities) != len(records):
        raise ValueError(f"{len(probabilities)} probabilities for {len(records)} records")
    subjects = [Subject.of(r) for r in records]
    findings = np.array([s.finding for s in subjects], dtype=object)
    is_normal = findings == NO_TUMOR_LABEL
    called = 1.0 - probabilities[:, NO_TUMOR_INDEX] >= tumor_threshold
    predicted = np.array([LABELS[k] for k in probabilities.argmax(axis=1)], dtype=object)
    typed = np.isin(findings, list(accuracy_classes))
    glioma, meningioma = LABELS.index("glioma"), LABELS.index("meningioma")
    two_types = np.isin(findings, ["glioma", "meningioma"])
    says_glioma = probabilities[:, glioma] >= probabilities[:, meningioma]
    groups = np.array([-1 if s.group is None else s.group for s in subjects])
    grouped = all(s.group is not None for s in subjects) and len(subjects) > 0

    def cell(hits: np.ndarray, among: np.ndarray) -> dict[str, Any] | None:
        """The proportion of ``hits`` among ``among``, with the interval over groups where they are known."""
        counted = proportion(int((hits & among).sum()), int(among.sum()))
        if counted and grouped:
            counted["group_low"], counted["group_high"] = group_interval(hits[among], groups[among])
        return counted

    rows: list[dict[str, Any]] = []
    seen: dict[bytes, str] = {}
    for grouping in groupings:
        key = GROUPINGS[grouping]
        names = np.array([key(s) for s in subjects], dtype=object)
        for name in sorted(set(names) - {None}):
            member = names == name
            fingerprint = np.packbits(member).tobytes()
            label = row_label({"grouping": grouping, "subgroup": str(name)})
            # a row read by eye is always shown: it is what its reader looks for, whatever else it equals
            same_as = label if grouping in ALWAYS_SHOWN else seen.setdefault(fingerprint, label)
            tumor, normal = member & ~is_normal, member & is_normal
            counted, pair = member & typed, member & two_types
            rows.append(
                {
                    "grouping": grouping,
                    "subgroup": str(name),
                    "n": int(member.sum()),
                    "n_tumor": int(tumor.sum()),
                    "n_normal": int(normal.sum()),
                    "n_typed": int(counted.sum()),
                    "tumor_sensitivity": cell(called, tumor),
                    "specificity": cell(~called, normal),
                    "class_accuracy": cell(predicted == findings, counted),
                    "glioma_vs_meningioma": cell(says_glioma == (findings == "glioma"), pair),
                    "same_as": None if same_as == label else same_as,
                }
            )
    return rows


def score_set(probabilities: np.ndarray, labels: np.ndarray, records: Sequence[Any], external: bool) -> dict[str, Any]:
    """Everything reported for one image set: its metrics, both calibration errors and its subgroup rows.

    Args:
        probabilities: ``(n, classes)`` calibrated probabilities.
        labels: ``(n,)`` class indices (-1 for a tumour of no class).
        records: the images, in the same order.
        external: a manifest dataset (:func:`~braintumor_training.metrics.partial_label_metrics`, groupings
            :data:`EXTERNAL_GROUPINGS`) rather than the folder dataset (all four classes, per class).
    """
    if external:
        metrics = partial_label_metrics(probabilities, labels)
        metrics["subgroups"] = subgroup_rows(probabilities, records, EXTERNAL_GROUPINGS, EXTERNAL_ACCURACY_CLASSES)
    else:
        metrics = classification_metrics(probabilities, labels)
        metrics["tumor_ece"] = binary_calibration_error(
            1.0 - probabilities[:, NO_TUMOR_INDEX], np.asarray(labels) != NO_TUMOR_INDEX
        )
        metrics["subgroups"] = subgroup_rows(probabilities, records, FOLDER_GROUPINGS, LABELS)
    metrics.update(calibration_intervals(probabilities, labels))
    return metrics


def find_row(rows: Sequence[Mapping[str, Any]], grouping: str, subgroup: str) -> Mapping[str, Any] | None:
    """The row of a subgroup, or ``None``.

    Args:
        rows: rows of :func:`subgroup_rows`.
        grouping: the grouping asked for.
        subgroup: the subgroup's name.
    """
    return next((r for r in rows if r["grouping"] == grouping and r["subgroup"] == subgroup), None)


@dataclass(frozen=True)
class Target:
    """A target of the issue on one set.

    Args:
        name: how reports name it.
        set_name: the evaluated set (``test``, ``test_leak_free``, ``external_test``).
        metric: a proportion of :data:`PROPORTIONS` (on a subgroup row) or a set-level key (``ece``,
            ``tumor_ece``).
        bound: the target value.
        grouping: the subgroup's grouping (proportions only).
        subgroup: the subgroup's name (proportions only).
        at_most: the metric must stay at or below ``bound`` (calibration errors) instead of reaching it.
    """

    name: str
    set_name: str
    metric: str
    bound: float
    grouping: str = "all"
    subgroup: str = "all"
    at_most: bool = False


#: The targets of issue 13 ("Evaluate by subgroup").
TARGETS: tuple[Target, ...] = (
    *(
        Target(
            f"external test: tumour sensitivity on {seq}", "external_test", "tumor_sensitivity", 0.95, "sequence", seq
        )
        for seq in ("T1", "T1C", "T2")
    ),
    Target("external test: tumour sensitivity on br35h", "external_test", "tumor_sensitivity", 0.95, "source", "br35h"),
    Target("external test: specificity on its normal slices", "external_test", "specificity", 0.92),
    Target("Testing: accuracy", "test", "class_accuracy", 0.985),
    Target("Testing, leak-free subset: accuracy", "test_leak_free", "class_accuracy", 0.98),
    Target("Testing: tumour sensitivity", "test", "tumor_sensitivity", 0.995),
    Target("Testing: ECE", "test", "ece", 0.02, at_most=True),
    Target("external test: ECE (top label, images with a class)", "external_test", "ece", 0.02, at_most=True),
    Target(
        "external test: ECE of the tumour probability (all images)", "external_test", "tumor_ece", 0.02, at_most=True
    ),
)


def check_targets(sets: Mapping[str, Any], targets: Sequence[Target] = TARGETS) -> list[dict[str, Any]]:
    """Whether each target is met, judged on the point estimate.

    Args:
        sets: evaluated sets by name, each :func:`score_set`'s result (other keys are ignored).
        targets: the targets.

    Returns:
        For each target whose set was evaluated: ``name``, ``set``, ``bound``, ``at_most``, ``value``,
        ``low``, ``high`` (the Wilson interval of a proportion, a seeded bootstrap interval of a calibration
        error, ``None`` where not computed), ``group_interval`` (a proportion's interval counting groups of
        near duplicates as clusters, ``[low, high]``, where the groups are known; else ``None``) and ``met``
        (``None`` where the subgroup is absent).
    """
    results = []
    for target in targets:
        scored = sets.get(target.set_name)
        if not isinstance(scored, Mapping) or "subgroups" not in scored:
            continue
        value = low = high = None
        by_group = None
        if target.metric in PROPORTIONS:
            row = find_row(scored["subgroups"], target.grouping, target.subgroup)
            cell = row.get(target.metric) if row else None
            if cell:
                value, low, high = cell["value"], cell["low"], cell["high"]
                if "group_low" in cell:
                    by_group = [cell["group_low"], cell["group_high"]]
        elif scored.get(target.metric) is not None and not math.isnan(scored[target.metric]):
            value = float(scored[target.metric])
            interval = scored.get(f"{target.metric}_interval")
            if interval:
                low, high = interval
        met = None if value is None else (value <= target.bound if target.at_most else value >= target.bound)
        results.append(
            {
                "name": target.name,
                "set": target.set_name,
                "bound": target.bound,
                "at_most": target.at_most,
                "value": value,
                "low": low,
                "high": high,
                "group_interval": by_group,
                "met": met,
            }
        )
    return results


def format_proportion(cell: Mapping[str, Any] | None, counts: bool = False) -> str:
    """``0.912 (0.871–0.941)``, with ``k/n`` first when ``counts``; ``–`` for nothing to count.

    Args:
        cell: a :func:`proportion` or ``None``.
        counts: also show ``k/n``.
    """
    if not cell:
        return "–"
    text = f"{cell['value']:.3f} ({cell['low']:.3f}–{cell['high']:.3f})"
    return f"{cell['k']}/{cell['n']}: {text}" if counts else text


def render_targets(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown list of the targets: value, interval, and met / **missed**.

    Args:
        results: :func:`check_targets`'s result.
    """
    lines = []
    for r in results:
        sign = "≤" if r["at_most"] else "≥"
        if r["value"] is None:
            lines.append(f"- {r['name']} {sign} {r['bound']}: not measured (no such images)")
            continue
        interval = f" (95 % CI {r['low']:.3f}–{r['high']:.3f}" if r["low"] is not None else ""
        if interval:
            by_group = r.get("group_interval")
            interval += f"; near duplicates as clusters {by_group[0]:.3f}–{by_group[1]:.3f})" if by_group else ")"
        verdict = "met" if r["met"] else "**missed**"
        lines.append(f"- {r['name']} {sign} {r['bound']}: {r['value']:.4f}{interval}, {verdict}")
    return lines


def render_table(
    rows_by_model: Mapping[str, Sequence[Mapping[str, Any]]],
    proportions: Sequence[str] = PROPORTIONS,
) -> list[str]:
    """A Markdown table of subgroup rows; with several models, their cells side by side.

    Rows are those of the last model (the newest); a model without that row shows ``–``. Counts (images,
    tumours, normal slices, typed tumours) are the last model's: compared models see the same images.

    Args:
        rows_by_model: :func:`subgroup_rows` of each model, by the name shown in the header.
        proportions: which proportions to show.
    """
    names = list(rows_by_model)
    header = ["subgroup", "images", "tumours", "normal", "class counted"]
    for key in proportions:
        title = PROPORTION_TITLES[key]
        header += [f"{title} ({name})" for name in names] if len(names) > 1 else [title]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows_by_model[names[-1]]:
        if row.get("same_as"):
            continue
        cells = [row_label(row), str(row["n"]), str(row["n_tumor"]), str(row["n_normal"]), str(row["n_typed"])]
        for key in proportions:
            for name in names:
                other = find_row(rows_by_model[name], row["grouping"], row["subgroup"])
                cells.append(format_proportion(other.get(key) if other else None, counts=len(names) == 1))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _forest_rows(sets_by_model: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str, str]]:
    """``(set, grouping, subgroup, label)`` of the figure's rows: each folder test set's ``all`` row, then
    every row of the external test part."""
    last = sets_by_model[list(sets_by_model)[-1]]
    rows: list[tuple[str, str, str, str]] = []
    for set_name, title in (("test", "Testing"), ("test_leak_free", "Testing leak-free")):
        if set_name in last:
            rows.append((set_name, "all", "all", f"{title}: all (n={last[set_name]['n_images']})"))
    if "external_test" in last:
        for row in last["external_test"]["subgroups"]:
            if not row.get("same_as"):
                rows.append(
                    ("external_test", row["grouping"], row["subgroup"], f"external {row_label(row)} (n={row['n']})")
                )
    return rows


def plot_forest(sets_by_model: Mapping[str, Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Forest plot: tumour sensitivity and specificity (point, 95 % interval) per subgroup, per model.

    Args:
        sets_by_model: for each model (legend name), its scored sets by name (``test``, ``test_leak_free``,
            ``external_test``; see :func:`score_set`).
        path: the PNG to write.
        title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _forest_rows(sets_by_model)
    models = list(sets_by_model)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.32 * len(rows) * max(1, len(models) * 0.7) + 1.6), sharey=True)
    panels = (("tumor_sensitivity", "tumour sensitivity", 0.95), ("specificity", "specificity", 0.92))
    step = 0.6 / max(1, len(models))
    for ax, (key, name, bound) in zip(axes, panels, strict=True):
        for m, model in enumerate(models):
            ys, xs, lows, highs = [], [], [], []
            for i, (set_name, grouping, subgroup, _) in enumerate(rows):
                scored = sets_by_model[model].get(set_name)
                row = find_row(scored["subgroups"], grouping, subgroup) if scored else None
                cell = row.get(key) if row else None
                if cell:
                    ys.append(i + (m - (len(models) - 1) / 2) * step)
                    xs.append(cell["value"])
                    lows.append(cell["value"] - cell["low"])
                    highs.append(cell["high"] - cell["value"])
            ax.errorbar(xs, ys, xerr=[lows, highs], fmt="o", ms=4, capsize=2, color=f"C{m}", label=model)
        ax.axvline(bound, color="grey", ls="--", lw=1)
        external_rows = [i for i, (set_name, *_) in enumerate(rows) if set_name == "external_test"]
        if external_rows and external_rows[0] > 0:  # the folder dataset's rows above, the external ones below
            ax.axhline(external_rows[0] - 0.5, color="black", lw=0.6)
        ax.set_xlabel(f"{name} (95 % Wilson CI); dashed: target {bound}", fontsize=9)
        ax.set_xlim(min(0.5, ax.get_xlim()[0]), 1.01)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), [label for *_, label in rows], fontsize=8)
    axes[0].set_ylim(len(rows) - 0.5, -0.5)
    if len(models) > 1:
        axes[1].legend(loc="lower left", fontsize=8)
    fig.suptitle(title or "Tumour sensitivity and specificity by subgroup", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compact(scored: Mapping[str, Any]) -> dict[str, Any]:
    """A scored set without its bulky parts (reliability bins, the nested labelled metrics), for reports."""
    return {k: v for k, v in scored.items() if k not in ("reliability", "labelled", "per_class")}
