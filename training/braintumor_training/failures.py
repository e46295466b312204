"""The external images a model gets wrong as a screen: each missed tumour and false alarm, and their groups.

A subgroup table says how often; this says which. Each missed tumour slice (tumour probability below the
threshold) and each false alarm (a normal slice at or above it) of a manifest dataset's test part is listed
with what is known of it and its group of near duplicates (the run's ``external_split.json``), so that a
reader sees that four missed slices may be one missed lesion, and a contact sheet shows them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.config import NO_TUMOR_INDEX

#: The two ways a slice is got wrong as a screen, in report order.
KINDS: tuple[str, ...] = ("missed tumour", "false alarm")


def failure_rows(
    probabilities: np.ndarray,
    records: Sequence[Any],
    groups: Mapping[str, int],
    tumor_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Each missed tumour and false alarm, missed tumours first, each kind by tumour probability.

    Args:
        probabilities: ``(n, classes)`` calibrated probabilities, in the order of ``records``.
        records: :class:`~braintumor_training.external.ManifestRecord` of the set.
        groups: near-duplicate group of each image path (``external_split.json``'s ``groups``); an image
            it does not name is its own group.
        tumor_threshold: a tumour is called when ``1 − p(notumor) ≥ tumor_threshold``.

    Returns:
        Rows with ``kind``, ``path``, ``source``, ``sequence``, ``sequence_by_eye``, ``finding``,
        ``detail``, ``group`` and ``tumor_probability``.
    """
    tumour = 1.0 - np.asarray(probabilities)[:, NO_TUMOR_INDEX]
    if len(tumour) != len(records):
        raise ValueError(f"{len(tumour)} probabilities for {len(records)} records")
    rows = []
    for record, p in zip(records, tumour, strict=True):
        called = bool(p >= tumor_threshold)
        if called == record.is_tumor:
            continue
        rows.append(
            {
                "kind": KINDS[0] if record.is_tumor else KINDS[1],
                "path": record.path,
                "source": record.source,
                "sequence": record.sequence,
                "sequence_by_eye": getattr(record, "sequence_by_eye", ""),
                "finding": record.finding,
                "detail": record.detail,
                "group": groups.get(record.path, record.path),
                "tumor_probability": float(p),
            }
        )
    rows.sort(key=lambda r: (KINDS.index(r["kind"]), r["tumor_probability"] * (1 if r["kind"] == KINDS[0] else -1)))
    return rows


def failure_summary(rows: Sequence[Mapping[str, Any]], records: Sequence[Any], groups: Mapping[str, int]) -> str:
    """One sentence: how many slices of each kind, in how many groups, out of how many.

    Args:
        rows: :func:`failure_rows` of ``records``.
        records: the set.
        groups: as for :func:`failure_rows`.
    """
    parts = []
    for kind, is_tumor in zip(KINDS, (True, False), strict=True):
        of = [r for r in records if r.is_tumor == is_tumor]
        wrong = [r for r in rows if r["kind"] == kind]
        of_groups = {groups.get(r.path, r.path) for r in of}
        wrong_groups = {r["group"] for r in wrong}
        parts.append(
            f"{len(wrong)} {kind}{'' if len(wrong) == 1 else 's'} of {len(of)} "
            f"{'tumour' if is_tumor else 'normal'} slices, in {len(wrong_groups)} of their {len(of_groups)} "
            "groups of near duplicates"
        )
    return "; ".join(parts) + "."


def render_failures(rows: Sequence[Mapping[str, Any]], root: Path | None = None) -> list[str]:
    """A Markdown table of :func:`failure_rows`, numbered as on the contact sheet.

    Args:
        rows: the rows.
        root: shown paths are relative to it (the manifest dataset's folder); absolute when ``None``.
    """
    lines = [
        "| # | kind | source | sequence | finding (source's type) | group | tumour probability | image |",
        "|---:|---|---|---|---|---:|---:|---|",
    ]
    for k, row in enumerate(rows, 1):
        sequence = row["sequence"] + (f" ({row['sequence_by_eye']} by eye)" if row["sequence_by_eye"] else "")
        finding = row["finding"] + (f" ({row['detail']})" if row["detail"] and row["detail"] != "unknown" else "")
        path = Path(row["path"])
        shown = path.relative_to(root) if root is not None and path.is_relative_to(root) else path
        lines.append(
            f"| {k} | {row['kind']} | {row['source']} | {sequence} | {finding} | {row['group']} "
            f"| {row['tumor_probability']:.3f} | `{shown}` |"
        )
    return lines


def failure_sheet(rows: Sequence[Mapping[str, Any]], out: Path, columns: int = 6, tile: int = 200) -> Path | None:
    """A numbered contact sheet of the rows' images (as :func:`render_failures` numbers them).

    With no rows it writes nothing, removes an earlier sheet at ``out`` and returns ``None``.

    Args:
        rows: :func:`failure_rows`.
        out: the PNG to write.
        columns: tiles per row.
        tile: side of a tile in pixels.
    """
    if not rows:
        Path(out).unlink(missing_ok=True)
        return None
    from braintumor_training.sequences import contact_sheet

    return contact_sheet([Path(r["path"]) for r in rows], out, columns=columns, tile=tile)
