"""The missed tumours and false alarms of a set: which images, their groups of near duplicates, the sheet."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from braintumor.config import LABELS
from braintumor_training.external import ManifestRecord
from braintumor_training.failures import failure_rows, failure_sheet, failure_summary, render_failures

N = LABELS.index("notumor")


def probabilities(tumour: float) -> list[float]:
    """Probabilities whose tumour probability (1 − p(notumor)) is ``tumour``, all of it on glioma."""
    p = [0.0] * len(LABELS)
    p[N], p[LABELS.index("glioma")] = 1.0 - tumour, tumour
    return p


@pytest.fixture
def cases(tmp_path):
    rows = [  # finding, tumour probability, group
        ("glioma", 0.9, 1),  # found
        ("glioma", 0.2, 1),  # missed, group 1
        ("tumor", 0.1, 2),  # missed, group 2
        ("tumor", 0.4, 2),  # missed, group 2 again: one lesion
        ("notumor", 0.1, 3),  # right
        ("notumor", 0.7, 4),  # false alarm
        ("notumor", 0.5, 4),  # false alarm at the threshold: a tumour is called at >= 0.5
    ]
    records = []
    for k, (finding, _, group) in enumerate(rows):
        path = tmp_path / f"images/{k}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("L", (40, 40), 30 * k).save(path)
        records.append(ManifestRecord(str(path), "src", "T2" if k % 2 else "unknown", finding, "", group=group))
    return np.array([probabilities(p) for _, p, _ in rows]), records


def test_each_missed_tumour_and_false_alarm_is_listed_with_its_group(cases, tmp_path):
    p, records = cases
    rows = failure_rows(p, records, root=tmp_path)
    assert [(r["kind"], r["group"]) for r in rows] == [
        ("missed tumour", 2),  # lowest tumour probability first
        ("missed tumour", 1),
        ("missed tumour", 2),
        ("false alarm", 4),  # highest first
        ("false alarm", 4),
    ]
    assert [round(r["tumor_probability"], 3) for r in rows] == [0.1, 0.2, 0.4, 0.7, 0.5]
    summary = failure_summary(rows, records)
    assert summary == (
        "3 missed tumours of 4 tumour slices, in 2 of their 2 groups of near duplicates; "
        "2 false alarms of 3 normal slices, in 1 of their 2 groups of near duplicates."
    )
    table = render_failures(rows)
    assert (
        len(table) == 2 + len(rows)
        and "| 1 | missed tumour | src | unknown | tumor | 2 | 0.100 | `images/2.png` |" in table
    )
    assert render_failures([]) == ["None."]
    sheet = failure_sheet(rows, tmp_path / "failures.png", root=tmp_path, columns=3, tile=50)
    assert Image.open(sheet).size == (150, 100)  # 5 tiles, 3 a row
    assert failure_sheet([], sheet) is None and not sheet.exists()  # an earlier sheet does not outlive its rows
    with pytest.raises(ValueError, match="4 probabilities for 7 records"):
        failure_rows(p[:4], records)
    with pytest.raises(ValueError, match="1 images have no group of near duplicates"):
        failure_rows(p, [replace(r, group=None) if k == 6 else r for k, r in enumerate(records)])
