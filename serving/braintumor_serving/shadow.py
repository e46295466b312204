"""Shadow rollout: a candidate version answers a copy of live requests; only its agreement is kept.

``braintumor serve --shadow N`` serves a runtime copy of the repository (:func:`shadow_repository`): the
model keeps every version but N, so callers that name no version still get the current one (the
*primary*, the latest of the others), and version N is served alone as a second model, ``<model>_candidate``,
with one instance. The primary's configuration gets the parameter ``shadow`` (JSON, :class:`ShadowSpec`):
the ``onnxruntime_python`` backend of the primary version then puts a copy of each request's images and
of its answer on a bounded queue *after* computing the answer, and a background thread sends them to the
candidate (a BLS request) and counts, per image, in Triton's metrics (port 8002):

- ``braintumor_shadow_images_total{outcome="compared"|"error"|"dropped"}``: images compared; images whose
  candidate request failed (absent candidate, its error, timeout); images dropped because the queue was full;
- ``braintumor_shadow_disagreements_total{kind="class"|"tumour"|"probability"}``: a different top class; a
  different tumour decision (tumour probability ``1 − p(notumor)`` at or above 0.5 on one side only); a
  tumour probability that differs by more than ``probability_tolerance``;
- ``braintumor_shadow_tumour_probability_abs_difference_total``: the sum of ``|Δ tumour probability|``
  (divided by the compared images: the mean).

The candidate's answers never reach a caller, and a shadow failure never fails a caller's request. The
report (``python -m braintumor_serving.shadow report --metrics URL``) summarises a period.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from braintumor.config import MODEL_NAME, NO_TUMOR_INDEX
from braintumor.model_repository import CONFIG_FILE, CPU_CONFIG_NAME, LABELS_FILE, PREPROCESSING_FILE, versions

#: The model configuration parameter that turns the shadow on (JSON of :class:`ShadowSpec`).
PARAMETER = "shadow"
#: The candidate's model name is the model's name with this suffix.
CANDIDATE_SUFFIX = "_candidate"
IMAGES = "braintumor_shadow_images_total"
DISAGREEMENTS = "braintumor_shadow_disagreements_total"
ABS_DIFF_SUM = "braintumor_shadow_tumour_probability_abs_difference_total"
OUTCOMES = ("compared", "error", "dropped")
KINDS = ("class", "tumour", "probability")
#: Disagreement rate above which the report's verdict (and the alert rule) says the candidate is not ready.
DEFAULT_MAX_DISAGREEMENT = 0.02


class ShadowError(ValueError):
    """The shadow cannot be set up (unknown candidate, nothing left to serve, different preprocessing)."""


@dataclass(frozen=True)
class ShadowSpec:
    """What the primary version's backend needs to shadow its requests.

    Args:
        primary: the version whose requests are copied.
        candidate_model: the model name the candidate is served under.
        candidate_version: the candidate's version.
        queue: at most this many requests wait for the candidate; more are dropped and counted.
        probability_tolerance: a larger ``|Δ tumour probability|`` counts as a ``probability`` disagreement.
        timeout_s: seconds the candidate has for one request.
    """

    primary: int
    candidate_model: str
    candidate_version: int
    queue: int = 64
    probability_tolerance: float = 0.1
    timeout_s: float = 5.0

    def to_json(self) -> str:
        """The spec as the JSON of the ``shadow`` parameter."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ShadowSpec:
        """Parse the ``shadow`` parameter.

        Args:
            text: its JSON.

        Raises:
            ShadowError: when it is not a valid spec.
        """
        try:
            spec = cls(**json.loads(text))
            int(spec.primary), int(spec.candidate_version), int(spec.queue), float(spec.probability_tolerance)
        except (TypeError, ValueError) as err:
            raise ShadowError(f"invalid shadow parameter {text!r}: {err}") from err
        if spec.queue < 1 or spec.timeout_s <= 0:
            raise ShadowError(f"invalid shadow parameter {text!r}: queue must be ≥ 1 and timeout_s > 0")
        return spec


@dataclass(frozen=True)
class Agreement:
    """What comparing a batch of answers found.

    Args:
        images: images compared.
        class_disagreements: images whose top class differs.
        tumour_disagreements: images whose tumour decision (``1 − p(notumor) ≥ 0.5``) differs.
        probability_disagreements: images whose tumour probability differs by more than the tolerance.
        abs_diff_sum: sum of ``|Δ tumour probability|``.
    """

    images: int
    class_disagreements: int
    tumour_disagreements: int
    probability_disagreements: int
    abs_diff_sum: float


def compare(primary: np.ndarray, candidate: np.ndarray, tolerance: float = 0.1) -> Agreement:
    """Compare two versions' probabilities for the same images.

    Args:
        primary: ``[n, classes]`` probabilities of the primary.
        candidate: the candidate's, same shape.
        tolerance: ``|Δ tumour probability|`` above this is a ``probability`` disagreement.

    Raises:
        ValueError: when the shapes differ.
    """
    a, b = np.asarray(primary, np.float64), np.asarray(candidate, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"cannot compare probabilities of shapes {a.shape} and {b.shape}")
    tumour_a, tumour_b = 1.0 - a[:, NO_TUMOR_INDEX], 1.0 - b[:, NO_TUMOR_INDEX]
    diff = np.abs(tumour_a - tumour_b)
    return Agreement(
        images=len(a),
        class_disagreements=int(np.sum(a.argmax(1) != b.argmax(1))),
        tumour_disagreements=int(np.sum((tumour_a >= 0.5) != (tumour_b >= 0.5))),
        probability_disagreements=int(np.sum(diff > tolerance)),
        abs_diff_sum=float(diff.sum()),
    )


def _rename(config: str, name: str) -> str:
    return re.sub(r'(?m)^name: ".*"$', f'name: "{name}"', config, count=1)


def shadow_repository(
    source: Path,
    candidate: int,
    destination: Path,
    model: str = MODEL_NAME,
    config_name: str = CPU_CONFIG_NAME,
    queue: int = 64,
    probability_tolerance: float = 0.1,
) -> ShadowSpec:
    """Write the repository that shadows ``candidate`` behind the current version.

    ``destination/<model>`` holds every version of ``source/<model>`` but the candidate, its ``configs/<name>``
    carrying the ``shadow`` parameter; ``destination/<model>_candidate`` holds the candidate alone, with one
    instance. Other models are copied as they are. Version folders are hard links where the filesystem allows.

    Args:
        source: the model repository.
        candidate: the version to shadow.
        destination: an empty or absent folder.
        model: the model whose versions these are.
        config_name: the configuration ``serve`` uses (the shadow needs the ``onnxruntime_python`` backend).
        queue: the shadow queue's cap, in requests.
        probability_tolerance: see :class:`ShadowSpec`.

    Raises:
        ShadowError: when the candidate is not published, no other version is, the configuration is not the
            python backend's, or the candidate's preprocessing differs from the primary's (the same tensor
            would then not mean the same image to both).
    """
    model_dir = source / model
    published = versions(model_dir)
    if candidate not in published:
        raise ShadowError(f"version {candidate} of {model} is not in {source} (published: {published})")
    others = [v for v in published if v != candidate]
    if not others:
        raise ShadowError(f"{model} has no version besides {candidate} to shadow it behind")
    primary = others[-1]
    config_path = model_dir / "configs" / f"{config_name}.pbtxt"
    if not config_path.is_file() or 'backend: "onnxruntime_python"' not in config_path.read_text():
        raise ShadowError(f"the shadow needs the onnxruntime_python backend's configuration ({config_path})")

    def spec_text(version: int) -> str:
        path = model_dir / str(version) / PREPROCESSING_FILE
        return json.dumps(json.loads(path.read_text()), sort_keys=True) if path.exists() else "plain resize"

    if spec_text(primary) != spec_text(candidate):
        raise ShadowError(
            f"version {candidate} has another preprocessing than version {primary} "
            f"({spec_text(candidate)} against {spec_text(primary)}): one tensor cannot stand for one image to both"
        )
    spec = ShadowSpec(primary, model + CANDIDATE_SUFFIX, candidate, queue, probability_tolerance)

    def copy(src: Path, dst: Path) -> None:
        shutil.copytree(src, dst, copy_function=_link_or_copy)

    destination.mkdir(parents=True, exist_ok=True)
    for other in sorted(p for p in source.iterdir() if p.is_dir() and p.name != model):
        copy(other, destination / other.name)
    ours = destination / model
    shutil.copytree(model_dir, ours, ignore=lambda d, names: [str(candidate)] if Path(d) == model_dir else [])
    config = config_path.read_text()
    parameter = spec.to_json().replace("\\", "\\\\").replace('"', '\\"')
    (ours / "configs" / f"{config_name}.pbtxt").write_text(
        config + "# Shadow rollout (braintumor serve --shadow): the primary copies its requests to the candidate.\n"
        f'parameters {{ key: "{PARAMETER}" value: {{ string_value: "{parameter}" }} }}\n'
    )
    theirs = destination / spec.candidate_model
    (theirs / "configs").mkdir(parents=True)
    copy(model_dir / str(candidate), theirs / str(candidate))
    shutil.copy2(model_dir / LABELS_FILE, theirs / LABELS_FILE)
    one_instance = re.sub(r"instance_group \[ \{ count: \d+", "instance_group [ { count: 1", config)
    (theirs / "configs" / f"{config_name}.pbtxt").write_text(_rename(one_instance, spec.candidate_model))
    if (model_dir / CONFIG_FILE).exists():
        (theirs / CONFIG_FILE).write_text(_rename((model_dir / CONFIG_FILE).read_text(), spec.candidate_model))
    return spec


def _link_or_copy(src: str, dst: str) -> str:
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)
    return dst


# --- the report ---------------------------------------------------------------------------------------


def read_counters(metrics_url: str) -> dict[str, float]:
    """The shadow counters, summed over instances, from Triton's metrics endpoint.

    Args:
        metrics_url: e.g. ``http://127.0.0.1:8002/metrics``.

    Returns:
        ``{"compared": …, "error": …, "dropped": …, "class": …, "tumour": …, "probability": …,
        "abs_diff_sum": …}``.
    """
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    counters = dict.fromkeys((*OUTCOMES, *KINDS, "abs_diff_sum"), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == IMAGES and sample.labels.get("outcome") in OUTCOMES:
                counters[sample.labels["outcome"]] += sample.value
            elif sample.name == DISAGREEMENTS and sample.labels.get("kind") in KINDS:
                counters[sample.labels["kind"]] += sample.value
            elif sample.name == ABS_DIFF_SUM:
                counters["abs_diff_sum"] += sample.value
    return counters


def wilson(k: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % Wilson score interval of ``k`` successes in ``n`` trials (``(0, 1)`` when ``n`` is 0).

    Args:
        k: successes.
        n: trials.
        z: the normal quantile.
    """
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarise(counters: dict[str, float], max_disagreement: float = DEFAULT_MAX_DISAGREEMENT) -> dict[str, object]:
    """Summary of a shadow period: counts, rates with their Wilson intervals, mean |Δp|, and a verdict.

    The verdict is ``pass`` when the upper bound of the tumour-decision disagreement interval is at most
    ``max_disagreement`` and nothing failed, ``fail`` when its lower bound is above it, and otherwise
    ``undecided`` (too few images, or errors and drops to look at first).

    Args:
        counters: :func:`read_counters` (or a difference of two).
        max_disagreement: the highest acceptable rate of tumour-decision disagreement.
    """
    n = counters["compared"]
    rates = {}
    for kind in KINDS:
        low, high = wilson(counters[kind], n)
        rates[kind] = {"count": int(counters[kind]), "rate": counters[kind] / n if n else None, "ci95": [low, high]}
    low, high = rates["tumour"]["ci95"]
    failed = int(counters["error"] + counters["dropped"])
    if n and low > max_disagreement:
        verdict = "fail"
    elif n and high <= max_disagreement and not failed:
        verdict = "pass"
    else:
        verdict = "undecided"
    return {
        "compared": int(n),
        "errors": int(counters["error"]),
        "dropped": int(counters["dropped"]),
        "disagreements": rates,
        "mean_abs_tumour_probability_difference": counters["abs_diff_sum"] / n if n else None,
        "max_disagreement": max_disagreement,
        "verdict": verdict,
    }


def format_summary(summary: dict[str, object]) -> str:
    """A readable text of :func:`summarise`'s result.

    Args:
        summary: what :func:`summarise` returned.
    """
    lines = [
        f"images compared {summary['compared']}, candidate errors {summary['errors']}, dropped {summary['dropped']}"
    ]
    for kind, entry in summary["disagreements"].items():  # type: ignore[union-attr]
        rate = "n/a" if entry["rate"] is None else f"{entry['rate']:.4f}"
        low, high = entry["ci95"]
        lines.append(f"{kind:>12} disagreements {entry['count']:>6}  rate {rate} (95 % CI {low:.4f}–{high:.4f})")
    mean = summary["mean_abs_tumour_probability_difference"]
    lines.append(f"mean |Δ tumour probability| {'n/a' if mean is None else f'{mean:.4f}'}")
    lines.append(f"verdict: {summary['verdict']} (tumour-decision disagreement at most {summary['max_disagreement']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m braintumor_serving.shadow report``: summarise a shadow period.

    Args:
        argv: the arguments (default: the command line).
    """
    parser = argparse.ArgumentParser(prog="python -m braintumor_serving.shadow", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report", help="summarise the shadow counters of a period")
    p.add_argument("--metrics", default="http://127.0.0.1:8002/metrics", help="Triton's metrics URL")
    p.add_argument("--since", default=None, help="a snapshot saved by --save: report the period since then")
    p.add_argument("--save", default=None, help="also save the counters read now to this file (a snapshot)")
    p.add_argument("--seconds", type=float, default=0.0, help="read, wait this long, and report that period")
    p.add_argument("--max-disagreement", type=float, default=DEFAULT_MAX_DISAGREEMENT)
    p.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    try:
        start = json.loads(Path(args.since).read_text()) if args.since else None
        if args.seconds > 0:
            start = read_counters(args.metrics)
            time.sleep(args.seconds)
        now = read_counters(args.metrics)
    except (OSError, ValueError) as err:
        print(f"shadow report: {err}", file=sys.stderr)
        return 2
    if args.save:
        Path(args.save).write_text(json.dumps(now, indent=1) + "\n")
    period = {k: now[k] - (start or {}).get(k, 0.0) for k in now}
    if any(v < 0 for v in period.values()):
        print("shadow report: the counters went down since the snapshot (the server restarted)", file=sys.stderr)
        return 2
    summary = summarise(period, args.max_disagreement)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return {"pass": 0, "undecided": 3}.get(str(summary["verdict"]), 1)


if __name__ == "__main__":
    sys.exit(main())
