"""The serving rule: a run is published only if, on validation, it is no worse than the served version by more
than a stated margin (``braintumor export --rule FILE``).

A rule is a JSON file, committed before the run it judges is scored (its history is the record of that):

.. code-block:: json

    {"description": "...",
     "conditions": [
       {"name": "missed external validation tumours", "count": {"external_val.missed": 1}, "at_most_more": 4},
       {"name": "weighted errors", "count": {"external_val.missed": 2, "validation.errors": 1}, "at_most_more": 0}
     ]}

Each condition adds up counts of errors, each with a positive weight, for the run and for the version it is
judged against, and is met when the run's total is at most the version's plus ``at_most_more`` (a negative
margin asks the run to be better by that much). The counts are read
from ``metrics.json`` (the run's evaluation, the published version's) on validation sets only:

- ``SET.errors``: images whose top class is wrong (a set with a confusion matrix: ``validation``);
- ``SET.missed``: tumours not called (``1 − p(notumor) < 0.5``), ``SET.false_alarms``: normal slices called
  tumours (a set with subgroups: ``external_val``).

Both sides must count over the same number of images, or the rule refuses to judge (it cannot see which
images they were: the evaluation keeps their number, not their names).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "COUNTS",
    "VALIDATION_SETS",
    "Condition",
    "RuleError",
    "ServingRule",
    "card_section",
    "describe",
    "error_count",
]

#: The sets a rule may read: validation only, never a test set.
VALIDATION_SETS = ("validation", "external_val")
#: What a rule may count in a set.
COUNTS = ("errors", "missed", "false_alarms")


class RuleError(RuntimeError):
    """The rule file is malformed, or the two sides cannot be compared."""


def error_count(metrics: dict[str, Any], key: str, whose: str = "the metrics") -> tuple[int, int]:
    """How many errors of kind ``key`` (``SET.COUNT``) a ``metrics.json`` holds, and over how many images.

    Args:
        metrics: a run's ``evaluation/metrics.json`` or a published version's ``metrics.json``.
        key: ``SET.COUNT``, a set of :data:`VALIDATION_SETS` and a count of :data:`COUNTS`.
        whose: whose metrics they are, for messages (e.g. "version 6's metrics.json").

    Raises:
        RuleError: an unknown set or count, or a set the metrics do not hold.
    """
    name, _, what = key.partition(".")
    if name not in VALIDATION_SETS or what not in COUNTS:
        raise RuleError(f"unknown count {key!r}: use SET.COUNT with SET in {VALIDATION_SETS} and COUNT in {COUNTS}")
    figures = metrics.get(name)
    if figures is None:
        raise RuleError(f"{whose} hold no {name!r} set to count {key!r} on")
    if what == "errors":
        if "confusion_matrix" not in figures:
            raise RuleError(f"{key!r}: the {name!r} set of {whose} has no confusion matrix")
        matrix = figures["confusion_matrix"]
        total = sum(sum(row) for row in matrix)
        return total - sum(matrix[k][k] for k in range(len(matrix))), total
    overall = next((g for g in figures.get("subgroups", []) if g.get("grouping") == "all"), None)
    if overall is None:
        raise RuleError(f"{key!r}: the {name!r} set of {whose} has no subgroups")
    share = overall["tumor_sensitivity" if what == "missed" else "specificity"]
    return share["n"] - share["k"], share["n"]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"{', '.join(repeated)} given twice")
    return dict(pairs)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a rule may hold")


def _number(value: Any, positive: bool = False) -> float:
    """A finite number (not a boolean); with ``positive``, above 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    if positive and value <= 0:
        raise ValueError(f"a weight must be positive, not {value}")
    return float(value)


@dataclass(frozen=True)
class Condition:
    """One condition of a rule.

    Args:
        name: what it is called in messages and the model card.
        count: weight of each count (``SET.COUNT``) in the total.
        at_most_more: how much larger the run's total may be than the version's.
    """

    name: str
    count: dict[str, float]
    at_most_more: float

    def totals(self, run: dict[str, Any], version: dict[str, Any], against: int | str = "") -> tuple[float, float]:
        """The run's and the version's weighted totals.

        Args:
            run: the run's ``evaluation/metrics.json``.
            version: the published version's ``metrics.json``.
            against: that version's number, for messages.

        Raises:
            RuleError: a count is missing on either side, or the two count over different numbers of images.
        """
        sums = [0.0, 0.0]
        for key, weight in self.count.items():
            k_run, n_run = error_count(run, key, "the run's evaluation")
            k_version, n_version = error_count(version, key, f"version {against}'s metrics.json")
            if n_run != n_version:
                raise RuleError(
                    f"{key}: the run counts over {n_run} images and version {against} over {n_version}: they were "
                    "not judged on the same validation images"
                )
            sums[0] += weight * k_run
            sums[1] += weight * k_version
        return sums[0], sums[1]


@dataclass(frozen=True)
class ServingRule:
    """A serving rule (see the module's documentation).

    Args:
        description: why the rule is what it is.
        conditions: all must be met.
        source: the file it was read from.
        sha256: the file's digest, kept with a version it published.
    """

    description: str
    conditions: tuple[Condition, ...]
    source: str = ""
    sha256: str = ""

    @classmethod
    def from_file(cls, path: Path) -> ServingRule:
        """Read and check a rule file.

        Raises:
            RuleError: the file is missing or not JSON, or a condition is malformed (named in the message).
        """
        try:
            text = Path(path).read_text()
            data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except (OSError, ValueError) as err:
            raise RuleError(f"cannot read the rule {path}: {err}") from err
        if not isinstance(data, dict) or not isinstance(data.get("conditions", []), list):
            raise RuleError(f"{path}: a rule is an object with a list of conditions")
        conditions = []
        for k, item in enumerate(data.get("conditions") or []):
            try:
                count = {str(key): _number(w, positive=True) for key, w in dict(item["count"]).items()}
                condition = Condition(str(item["name"]), count, _number(item["at_most_more"]))
            except (KeyError, TypeError, ValueError) as err:
                raise RuleError(
                    f"{path}: condition {k + 1} needs a name, a count (positive weights) and a finite at_most_more "
                    f"({err})"
                ) from err
            if not count:
                raise RuleError(f"{path}: condition {k + 1} ({condition.name}) counts nothing")
            for key in count:
                name, _, what = key.partition(".")
                if name not in VALIDATION_SETS or what not in COUNTS:
                    raise RuleError(
                        f"{path}: condition {k + 1} ({condition.name}): unknown count {key!r} (SET.COUNT with SET "
                        f"in {VALIDATION_SETS} and COUNT in {COUNTS})"
                    )
            conditions.append(condition)
        if not conditions:
            raise RuleError(f"{path}: a rule needs at least one condition")
        digest = hashlib.sha256(text.encode()).hexdigest()
        return cls(str(data.get("description", "")), tuple(conditions), str(path), digest)

    def judge(self, run: dict[str, Any], version: dict[str, Any], against: int) -> dict[str, Any]:
        """Judge a run's metrics against a published version's; returns the record kept with the version.

        Args:
            run: the run's ``evaluation/metrics.json``.
            version: the published version's ``metrics.json``.
            against: that version's number.

        Raises:
            RuleError: see :meth:`Condition.totals`.
        """
        results = []
        for condition in self.conditions:
            mine, theirs = condition.totals(run, version, against)
            results.append(
                {
                    "name": condition.name,
                    "count": condition.count,
                    "at_most_more": condition.at_most_more,
                    "run": mine,
                    "version": theirs,
                    "limit": theirs + condition.at_most_more,
                    "met": mine <= theirs + condition.at_most_more + 1e-9,
                }
            )
        return {
            "rule": self.source,
            "sha256": self.sha256,
            "description": self.description,
            "against": against,
            "conditions": results,
            "met": all(r["met"] for r in results),
        }


def describe(result: dict[str, Any]) -> list[str]:
    """One line per condition of a judged rule: the run's total, the version's, the limit and the verdict."""
    return [
        f"{r['name']}: {r['run']:g} (version {result['against']}: {r['version']:g}; at most {r['limit']:g}) "
        + ("met" if r["met"] else "NOT MET")
        for r in result["conditions"]
    ]


def card_section(result: dict[str, Any]) -> list[str]:
    """The model card's section on the serving rule the version met."""
    return [
        "## Why it is served",
        "",
        f"It met the serving rule `{result['rule']}` against version {result['against']}, on validation only "
        "(a total of errors may be at most the version's plus a margin):",
        "",
        f"| condition | this version | version {result['against']} | at most |",
        "|---|---:|---:|---:|",
        *[
            f"| {r['name'].replace('|', '/')} | {r['run']:g} | {r['version']:g} | {r['limit']:g} |"
            for r in result["conditions"]
        ],
        "",
        *([f"Why the rule is what it is: {result['description']}", ""] if result.get("description") else []),
    ]
