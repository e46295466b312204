"""Shadow rollout: a candidate version answers a copy of live requests; only its agreement is kept.

``braintumor serve --shadow N`` serves a runtime copy of the repository (:func:`shadow_repository`): the
model keeps every version but N, so callers that name no version still get the current one (the
*primary*, the latest of the others), and version N is served alone as a second model, ``<model>_candidate``,
with one instance. The model serves exactly the versions it served before, but the candidate (and the primary in
any case): its version policy becomes ``specific`` (:func:`served_versions`), so removing the candidate never brings
an older version into service. The primary's configuration gets the parameter ``shadow`` (JSON, :class:`ShadowSpec`):
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

The canary, the step after a passing shadow (``braintumor serve --canary N --canary-share F``,
:func:`canary_repository`), serves the same candidate model, but the candidate's answers reach a share of the
callers. Triton does not tell a backend whether a request named a version, so the runtime repository gets a
*routing version* ``R = 1_000_000 + primary`` (:data:`braintumor.model_repository.ROUTING_VERSION_BASE` plus the
primary; a hard link of the primary's files), a number ``export`` never publishes, so a client that cached it never
meets a real version of that number later: the requests that name no version reach it as the latest, and its
backend (configuration parameter ``canary``, JSON of
:class:`CanarySpec`) sends a seeded-random share ``F`` of them to the candidate (a synchronous BLS request)
and answers the rest with the primary's graph. Requests that pin a published version reach that version's
own instances and are never diverted. The configuration gets one more output, ``answered_by``
(:data:`braintumor.config.ANSWERED_BY_OUTPUT`, int32 ``[batch, 1]``): the version whose graph answered each
image (Triton 2.51's python backend cannot set response parameters); the SDK asks for it and reports it. A
failed candidate request is answered by the primary instead (a canary failure never fails a caller), and
counted:

- ``braintumor_canary_requests_total{answered_by="primary"|"candidate"|"fallback"}``: requests of the routing
  version answered by the primary, by the candidate, and by the primary after the candidate failed.
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
from typing import Any

import numpy as np

from braintumor.config import ANSWERED_BY_OUTPUT, MODEL_NAME, NO_TUMOR_INDEX
from braintumor.model_repository import (
    CONFIG_FILE,
    CPU_CONFIG_NAME,
    LABELS_FILE,
    PREPROCESSING_FILE,
    PREPROCESSING_PARAMETER,
    ROUTING_VERSION_BASE,
    versions,
)

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
#: The model configuration parameter that turns the canary on (JSON of :class:`CanarySpec`).
CANARY_PARAMETER = "canary"
#: The canary's counter of the routing version's requests, by who answered them (label ``answered_by``).
CANARY_REQUESTS = "braintumor_canary_requests_total"
#: Who answered a request of the canary's routing version (the label ``answered_by``).
ANSWERED_BY = ("primary", "candidate", "fallback")
#: Share of canary requests answered by the primary after a candidate failure above which the report fails.
DEFAULT_MAX_FALLBACK = 0.01


class ShadowError(ValueError):
    """The shadow cannot be set up (unknown candidate, nothing left to serve, different preprocessing)."""


class CanaryError(ShadowError):
    """The canary cannot be set up (a bad share, or any of :class:`ShadowError`'s reasons)."""


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
class CanarySpec:
    """What the routing version's backend needs to send a share of its requests to the candidate.

    Args:
        primary: the version whose graph answers the requests not diverted (the routing version runs its files).
        router: the routing version: the latest of the runtime repository, which requests naming no version reach.
        candidate_model: the model name the candidate is served under.
        candidate_version: the candidate's version.
        share: the probability (0 < share < 1) that one request is answered by the candidate.
        seed: the seed of each routing instance's random generator (mixed with the instance's name).
        timeout_s: seconds the candidate has for one request before the primary answers it instead.
    """

    primary: int
    router: int
    candidate_model: str
    candidate_version: int
    share: float
    seed: int = 0
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        """Check the fields (``CanaryError`` for a share outside (0, 1) or a timeout that is not positive)."""
        try:
            share, timeout = float(self.share), float(self.timeout_s)
            int(self.primary), int(self.router), int(self.candidate_version), int(self.seed)
        except (TypeError, ValueError) as err:
            raise CanaryError(f"invalid canary spec: {err}") from err
        if not 0.0 < share < 1.0:
            raise CanaryError(f"the canary share must be between 0 and 1 (exclusive), got {self.share!r}")
        if not timeout > 0:
            raise CanaryError(f"the canary timeout must be positive, got {self.timeout_s!r}")

    def to_json(self) -> str:
        """The spec as the JSON of the ``canary`` parameter."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CanarySpec:
        """Parse the ``canary`` parameter.

        Args:
            text: its JSON.

        Raises:
            CanaryError: when it is not a valid spec.
        """
        try:
            fields = json.loads(text)
            if not isinstance(fields, dict):
                raise TypeError("not a JSON object")
            return cls(**fields)
        except CanaryError as err:
            raise CanaryError(f"invalid canary parameter {text!r}: {err}") from err
        except (TypeError, ValueError) as err:
            raise CanaryError(f"invalid canary parameter {text!r}: {err}") from err


def parse_share(text: str) -> float:
    """A canary share from the command line: a number strictly between 0 and 1.

    Args:
        text: e.g. ``"0.05"``.

    Raises:
        CanaryError: when it is not such a number.
    """
    try:
        share = float(text)
    except ValueError:
        raise CanaryError(f"the canary share must be a number between 0 and 1 (exclusive), got {text!r}") from None
    if not 0.0 < share < 1.0:  # also refuses nan
        raise CanaryError(f"the canary share must be between 0 and 1 (exclusive), got {text!r}")
    return share


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


def _check(source: Path, candidate: int, model: str, config_name: str, error: type[ShadowError]) -> tuple[int, Path]:
    """The primary (the latest version but the candidate) and the configuration's path, once the candidate is
    checked (the checks of :func:`shadow_repository`, raising ``error``)."""
    model_dir = source / model
    published = versions(model_dir)
    if candidate not in published:
        raise error(f"version {candidate} of {model} is not in {source} (published: {published})")
    others = [v for v in published if v != candidate]
    if not others:
        raise error(f"{model} has no version besides {candidate} to serve beside it")
    primary = others[-1]
    config_path = model_dir / "configs" / f"{config_name}.pbtxt"
    if not config_path.is_file() or 'backend: "onnxruntime_python"' not in config_path.read_text():
        raise error(f"the candidate needs the onnxruntime_python backend's configuration ({config_path})")

    def spec_text(version: int) -> str:
        path = model_dir / str(version) / PREPROCESSING_FILE
        return json.dumps(json.loads(path.read_text()), sort_keys=True) if path.exists() else "plain resize"

    if spec_text(primary) != spec_text(candidate):
        raise error(
            f"version {candidate} has another preprocessing than version {primary} "
            f"({spec_text(candidate)} against {spec_text(primary)}): one tensor cannot stand for one image to both"
        )
    return primary, config_path


def _parameter(key: str, value: str) -> str:
    """A string parameter of a model configuration, its value escaped for the text format."""
    text = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'parameters {{ key: "{key}" value: {{ string_value: "{text}" }} }}\n'


def _write(
    source: Path, candidate: int, destination: Path, model: str, config_name: str, candidate_model: str
) -> tuple[Path, str]:
    """Copy the repository without the candidate's version, and serve the candidate alone as ``candidate_model``
    (one instance); the model's folder in ``destination`` and its configuration's text are for the caller to
    finish."""
    model_dir = source / model
    config_path = model_dir / "configs" / f"{config_name}.pbtxt"

    def copy(src: Path, dst: Path) -> None:
        shutil.copytree(src, dst, copy_function=_link_or_copy)

    destination.mkdir(parents=True, exist_ok=True)
    for other in sorted(p for p in source.iterdir() if p.is_dir() and p.name != model):
        copy(other, destination / other.name)
    ours = destination / model
    # copied, not linked: its configuration is rewritten, and a hard link would rewrite the source's
    shutil.copytree(model_dir, ours, ignore=lambda d, names: [str(candidate)] if Path(d) == model_dir else [])
    config = config_path.read_text()
    theirs = destination / candidate_model
    (theirs / "configs").mkdir(parents=True)
    copy(model_dir / str(candidate), theirs / str(candidate))
    shutil.copy2(model_dir / LABELS_FILE, theirs / LABELS_FILE)
    one_instance = re.sub(r"instance_group \[ \{ count: \d+", "instance_group [ { count: 1", config)
    (theirs / "configs" / f"{config_name}.pbtxt").write_text(_rename(one_instance, candidate_model))
    if (model_dir / CONFIG_FILE).exists():
        (theirs / CONFIG_FILE).write_text(_rename((model_dir / CONFIG_FILE).read_text(), candidate_model))
    return ours, config


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
    carrying the ``shadow`` parameter and a ``specific`` version policy (the versions served before but the
    candidate, and the primary); ``destination/<model>_candidate`` holds the candidate alone, with one
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
    primary, _ = _check(source, candidate, model, config_name, ShadowError)
    spec = ShadowSpec(primary, model + CANDIDATE_SUFFIX, candidate, queue, probability_tolerance)
    ours, config = _write(source, candidate, destination, model, config_name, spec.candidate_model)
    served = _still_served(config, versions(source / model), candidate, primary)
    (ours / "configs" / f"{config_name}.pbtxt").write_text(
        _serve_exactly(config, served)
        + "# Shadow rollout (braintumor serve --shadow): the primary copies its requests to the candidate.\n"
        + _parameter(PARAMETER, spec.to_json())
    )
    return spec


_POLICY = re.compile(r"version_policy:\s*\{\s*(?:[^{}]|\{[^{}]*\})*\}\s*\n?")


def served_versions(config: str, published: list[int]) -> list[int]:
    """The versions a configuration's version policy serves out of ``published``, ascending (Triton's rules:
    ``latest: k`` the highest ``k``, ``specific`` those listed, ``all`` every one, no policy the latest one).

    Args:
        config: the model configuration's text.
        published: the published version numbers.
    """
    ordered = sorted(published)
    policy = _POLICY.search(config)
    if policy is None:
        return ordered[-1:]
    text = policy.group(0)
    latest = re.search(r"latest:\s*\{\s*num_versions:\s*(\d+)", text)
    if latest:
        return ordered[-int(latest.group(1)) :] if int(latest.group(1)) else []
    specific = re.search(r"specific:\s*\{\s*versions:\s*\[([^\]]*)\]", text)
    if specific:
        listed = {int(v) for v in re.findall(r"\d+", specific.group(1))}
        return [v for v in ordered if v in listed]
    return ordered  # all


def _serve_exactly(config: str, served: list[int]) -> str:
    """The configuration with its version policy replaced by ``specific { versions: served }``."""
    policy = f"version_policy: {{ specific: {{ versions: [ {', '.join(str(v) for v in served)} ] }} }}\n"
    found = _POLICY.search(config)
    if found is None:
        return config.rstrip("\n") + "\n" + policy
    return config[: found.start()] + policy + config[found.end() :]


def _still_served(config: str, published: list[int], candidate: int, primary: int) -> list[int]:
    """What the runtime repository serves of the published versions: the ones served before but the candidate,
    and the primary (which answers the requests naming no version) in any case."""
    return sorted({v for v in served_versions(config, published) if v != candidate} | {primary})


def canary_repository(
    source: Path,
    candidate: int,
    destination: Path,
    share: float,
    model: str = MODEL_NAME,
    config_name: str = CPU_CONFIG_NAME,
    seed: int = 0,
    timeout_s: float = 5.0,
) -> CanarySpec:
    """Write the repository whose unversioned requests a canary share of go to ``candidate``.

    As :func:`shadow_repository`, ``destination/<model>_candidate`` holds the candidate alone (one instance) and
    ``destination/<model>`` every other version. Beside them, ``<model>`` gets the routing version ``R`` (one
    above every published version; the primary's files, hard-linked): the latest, so requests that name no
    version (and SDK clients that do not pin one, which resolve the latest) reach it. ``R`` is
    :data:`~braintumor.model_repository.ROUTING_VERSION_BASE` plus the primary, a number ``export`` never publishes.
    Its configuration gets the ``canary`` parameter (:class:`CanarySpec`), a ``preprocessing/R`` parameter equal to
    the primary's, the output ``answered_by`` (int32 ``[batch, 1]``: which version's graph answered each image;
    every version of the model answers it), and the version policy ``specific``: the versions served before but the
    candidate, the primary, and ``R`` (each published one answering only for itself; none that was not served
    before, as widening ``latest: k`` would bring in).

    Args:
        source: the model repository.
        candidate: the version to send the share to.
        destination: an empty or absent folder.
        share: the share of the routing version's requests the candidate answers, 0 < share < 1.
        model: the model whose versions these are.
        config_name: the configuration ``serve`` uses (the canary needs the ``onnxruntime_python`` backend).
        seed: see :class:`CanarySpec`.
        timeout_s: see :class:`CanarySpec`.

    Raises:
        CanaryError: a bad share, or any reason :func:`shadow_repository` refuses for.
    """
    primary, _ = _check(source, candidate, model, config_name, CanaryError)
    router = ROUTING_VERSION_BASE + primary
    spec = CanarySpec(primary, router, model + CANDIDATE_SUFFIX, candidate, share, seed, timeout_s)
    ours, config = _write(source, candidate, destination, model, config_name, spec.candidate_model)
    shutil.copytree(source / model / str(primary), ours / str(router), copy_function=_link_or_copy)
    key = f"{PREPROCESSING_PARAMETER}{primary}"
    preprocessing = re.search(
        rf'parameters \{{ key: "{re.escape(key)}" value: \{{ string_value: "((?:[^"\\]|\\.)*)" \}} \}}', config
    )
    extra = ""
    if preprocessing:
        escaped = preprocessing.group(1)  # already escaped for the text format
        extra = f'parameters {{ key: "{PREPROCESSING_PARAMETER}{router}" value: {{ string_value: "{escaped}" }} }}\n'
    served = [*_still_served(config, versions(source / model), candidate, primary), router]
    (ours / "configs" / f"{config_name}.pbtxt").write_text(
        _serve_exactly(config, served)
        + f"# Canary (braintumor serve --canary): version {router} routes; a share of its requests go to the "
        "candidate.\n"
        + f'output [ {{ name: "{ANSWERED_BY_OUTPUT}" data_type: TYPE_INT32 dims: [ 1 ] }} ]\n'
        + _parameter(CANARY_PARAMETER, spec.to_json())
        + extra
    )
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
        "abs_diff_sum": …, "canary_primary": …, "canary_candidate": …, "canary_fallback": …}`` (the last three
        are the canary's requests by who answered them).
    """
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    counters = dict.fromkeys((*OUTCOMES, *KINDS, "abs_diff_sum", *(f"canary_{a}" for a in ANSWERED_BY)), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == IMAGES and sample.labels.get("outcome") in OUTCOMES:
                counters[sample.labels["outcome"]] += sample.value
            elif sample.name == DISAGREEMENTS and sample.labels.get("kind") in KINDS:
                counters[sample.labels["kind"]] += sample.value
            elif sample.name == ABS_DIFF_SUM:
                counters["abs_diff_sum"] += sample.value
            elif sample.name == CANARY_REQUESTS and sample.labels.get("answered_by") in ANSWERED_BY:
                counters[f"canary_{sample.labels['answered_by']}"] += sample.value
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


def summarise_canary(counters: dict[str, float], max_fallback: float = DEFAULT_MAX_FALLBACK) -> dict[str, object]:
    """Summary of a canary period: requests by who answered, the candidate's observed share, the fallbacks.

    The candidate was *asked* for ``candidate + fallback`` requests (the observed share, with its Wilson
    interval, is that over all requests); ``fallback`` of them it failed. The verdict is ``pass`` when the upper
    bound of the fallback rate's interval (fallbacks among the requests the candidate was asked for) is at most
    ``max_fallback``, ``fail`` when its lower bound is above it, else ``undecided`` (too few requests).

    Args:
        counters: :func:`read_counters` (or a difference of two).
        max_fallback: the highest acceptable share of the candidate's requests that it failed.
    """
    primary, candidate, fallback = (counters.get(f"canary_{a}", 0.0) for a in ANSWERED_BY)
    total, asked = primary + candidate + fallback, candidate + fallback
    share_low, share_high = wilson(asked, total)
    low, high = wilson(fallback, asked)
    if asked and low > max_fallback:
        verdict = "fail"
    elif asked and high <= max_fallback:
        verdict = "pass"
    else:
        verdict = "undecided"
    return {
        "requests": int(total),
        "answered_by": {"primary": int(primary), "candidate": int(candidate), "fallback": int(fallback)},
        "candidate_share": {"asked": asked / total if total else None, "ci95": [share_low, share_high]},
        "fallback_rate": {"rate": fallback / asked if asked else None, "ci95": [low, high]},
        "max_fallback": max_fallback,
        "verdict": verdict,
    }


def format_canary(summary: dict[str, Any]) -> str:
    """A readable text of :func:`summarise_canary`'s result.

    Args:
        summary: what :func:`summarise_canary` returned.
    """
    by, share, fallback = summary["answered_by"], summary["candidate_share"], summary["fallback_rate"]
    asked = "n/a" if share["asked"] is None else f"{share['asked']:.4f}"
    rate = "n/a" if fallback["rate"] is None else f"{fallback['rate']:.4f}"
    return "\n".join(
        [
            f"canary requests {summary['requests']}: primary {by['primary']}, candidate {by['candidate']}, "
            f"fallback {by['fallback']} (candidate failed, primary answered)",
            f"candidate share asked {asked} (95 % CI {share['ci95'][0]:.4f}–{share['ci95'][1]:.4f})",
            f"fallback rate {rate} (95 % CI {fallback['ci95'][0]:.4f}–{fallback['ci95'][1]:.4f})",
            f"canary verdict: {summary['verdict']} (fallbacks at most {summary['max_fallback']} of its requests)",
        ]
    )


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
    """``python -m braintumor_serving.shadow report``: summarise a shadow or canary period.

    A period with canary requests also gets :func:`summarise_canary` (the key ``canary``), and the verdict is
    the canary's (the worse of both when the period also shadowed).

    Args:
        argv: the arguments (default: the command line).
    """
    parser = argparse.ArgumentParser(prog="python -m braintumor_serving.shadow", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report", help="summarise the shadow (and canary) counters of a period")
    p.add_argument("--metrics", default="http://127.0.0.1:8002/metrics", help="Triton's metrics URL")
    p.add_argument("--since", default=None, help="a snapshot saved by --save: report the period since then")
    p.add_argument("--save", default=None, help="also save the counters read now to this file (a snapshot)")
    p.add_argument("--seconds", type=float, default=0.0, help="read, wait this long, and report that period")
    p.add_argument("--max-disagreement", type=float, default=DEFAULT_MAX_DISAGREEMENT)
    p.add_argument(
        "--max-fallback",
        type=float,
        default=DEFAULT_MAX_FALLBACK,
        help="canary: the highest acceptable share of the candidate's requests it failed",
    )
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
    text = format_summary(summary)
    if any(period[f"canary_{a}"] for a in ANSWERED_BY):  # a canary period: its summary, and its verdict
        canary = summarise_canary(period, args.max_fallback)
        summary["canary"] = canary
        shadowed = any(period[o] for o in OUTCOMES)
        verdicts = {str(canary["verdict"]), *([str(summary["verdict"])] if shadowed else [])}
        summary["verdict"] = next(v for v in ("fail", "undecided", "pass") if v in verdicts)
        text = (text + "\n" if shadowed else "") + format_canary(canary)
    print(json.dumps(summary, indent=1) if args.json else text)
    return {"pass": 0, "undecided": 3}.get(str(summary["verdict"]), 1)


if __name__ == "__main__":
    sys.exit(main())
