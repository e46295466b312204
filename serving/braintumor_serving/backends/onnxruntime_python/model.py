"""A Python-based Triton backend that runs any ONNX model with ONNX Runtime.

The embedded Triton server bundled in the ``nvidia-pytriton`` wheel has only the python backend, not
the onnxruntime one, so this backend serves the very same ``model.onnx`` files the GPU container serves
with its native onnxruntime backend. Triton finds it as ``<backend-directory>/onnxruntime_python/model.py``
and a model selects it with ``backend: "onnxruntime_python"``; version folders hold only ``model.onnx``.

Triton hands ``execute`` every request its dynamic batcher gathered: they are concatenated into one
batch for a single ONNX Runtime call and the result is split back per request, so batching pays off.
Each response carries only the outputs its request asked for (a request that names none gets all).

Model configuration parameters (all optional): ``intra_op_num_threads`` (default 0 = ONNX Runtime's
choice), ``inter_op_num_threads``, ``graph_optimization_level`` (``disable``, ``basic``, ``extended``,
``all``; default ``all``), ``allow_spinning`` (``1`` or ``0``: whether idle threads spin; default ``1``),
``enable_cpu_mem_arena`` (``1`` or ``0``; default ``1``), ``lean_outputs`` (comma-separated output names:
a second session runs the graph cut down to them, for the requests that ask for nothing else; ONNX
Runtime otherwise computes every output at every call), ``shadow`` (JSON set by ``braintumor serve --shadow``,
see :mod:`braintumor_serving.shadow`: the named primary version copies each request's images and answer to a
bounded queue once its answer is computed, and a background thread has the candidate answer them too and
counts the agreement in Triton's metrics; nothing of it reaches the caller, and no shadow failure fails a
request), ``canary`` (JSON set by ``braintumor serve --canary``, see :mod:`braintumor_serving.shadow`: the
named routing version, which runs the primary's files, answers a seeded-random share of its requests from the
candidate (the requests of one batch drawn for it in one synchronous BLS request, whose ``timeout`` Triton applies
to the candidate's queueing only) and the rest itself; a failed candidate request is answered by
the primary instead; ``braintumor_canary_requests_total{answered_by=…}`` counts them). A configuration output
named ``answered_by`` (int32, ``[batch, 1]``; the canary's configuration has it) is not the graph's: every
version answers it with the version whose graph computed each image's answer (Triton 2.51's python backend
cannot set response parameters).
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import threading
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


_ARENA: bool | None = None


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def _shared_arena() -> bool:
    """Register one CPU arena for every session of this process (once); whether it is there."""
    global _ARENA
    if _ARENA is None:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({}))
            _ARENA = True
        except Exception:  # an older ONNX Runtime, or one already registered by someone else
            _ARENA = False
    return _ARENA


def _options(params: dict[str, str]) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(params.get("intra_op_num_threads", "0"))
    options.inter_op_num_threads = int(params.get("inter_op_num_threads", "0"))
    options.graph_optimization_level = _OPTIMIZATION[params.get("graph_optimization_level", "all")]
    options.enable_cpu_mem_arena = params.get("enable_cpu_mem_arena", "1") == "1"
    if options.enable_cpu_mem_arena and _shared_arena():
        # the full and the cut-down session of this stub draw from one arena: 60 MB less per stub
        options.add_session_config_entry("session.use_env_allocators", "1")
    # Idle ONNX Runtime threads spin by default, taking CPU from Triton and the stub between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "1"))
    return options


class _Shadow:
    """The primary's side of a shadow rollout: a bounded queue and the thread that feeds the candidate.

    Args:
        spec: the ``shadow`` parameter, parsed.
        input_name: the model's input tensor.
        output_name: the probabilities' tensor.
        labels: the metrics' labels for this instance.
        warmup_requests: how many requests Triton's warm-up sends this instance first (not shadowed).
    """

    def __init__(
        self, spec: Any, input_name: str, output_name: str, labels: dict[str, str], warmup_requests: int
    ) -> None:
        from braintumor_serving import shadow

        self.spec, self.input_name, self.output_name = spec, input_name, output_name
        #: requests of Triton's warm-up still to come to this instance (a batch-B sample comes as B requests);
        #: asking whether the model is READY instead breaks the stub while the server loads
        self.warmup = warmup_requests
        self.errors = 0
        self._compare = shadow.compare
        images = pb_utils.MetricFamily(
            name=shadow.IMAGES,
            description="images of the primary's requests, by shadow outcome",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        kinds = pb_utils.MetricFamily(
            name=shadow.DISAGREEMENTS,
            description="images the candidate answered differently, by kind",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        diff = pb_utils.MetricFamily(
            name=shadow.ABS_DIFF_SUM,
            description="sum of |candidate - primary| tumour probability",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        # the families must outlive their metrics (the stub refuses otherwise): keep them
        self._families = (images, kinds, diff)
        self.outcomes = {o: images.Metric(labels={**labels, "outcome": o}) for o in shadow.OUTCOMES}
        self.kinds = {k: kinds.Metric(labels={**labels, "kind": k}) for k in shadow.KINDS}
        self.abs_diff = diff.Metric(labels=labels)
        self.queue: queue.Queue[tuple[np.ndarray, np.ndarray] | None] = queue.Queue(maxsize=spec.queue)
        self.thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self.thread.start()

    def offer(self, images: np.ndarray, probabilities: np.ndarray) -> None:
        """Queue one request's images and the primary's answer; drop (and count) them when the queue is full.

        Args:
            images: the request's input (copied: the request's memory is freed once it is answered).
            probabilities: the primary's answer for them.
        """
        try:
            if self.warmup > 0:  # Triton's warm-up requests (random pixels) are not shadowed
                self.warmup -= 1
                return
            try:
                self.queue.put_nowait((np.array(images, copy=True), np.array(probabilities, copy=True)))
            except queue.Full:
                self.outcomes["dropped"].increment(len(images))
        except Exception as err:  # the shadow never fails the caller's request
            pb_utils.Logger.log_warn(f"shadow: could not queue a request: {err}")

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            images, primary = item
            try:
                request = pb_utils.InferenceRequest(
                    model_name=self.spec.candidate_model,
                    model_version=int(self.spec.candidate_version),
                    inputs=[pb_utils.Tensor(self.input_name, images)],
                    requested_output_names=[self.output_name],
                    timeout=int(self.spec.timeout_s * 1e6),
                )
                response = request.exec()
                if response.has_error():
                    raise RuntimeError(response.error().message())
                candidate = pb_utils.get_output_tensor_by_name(response, self.output_name).as_numpy()
                found = self._compare(primary, candidate, self.spec.probability_tolerance)
            except Exception as err:  # any failure of the candidate is counted, never raised
                self.outcomes["error"].increment(len(images))
                if self.errors % 1000 == 0:  # the first, then every thousandth: a dead candidate must not flood the log
                    pb_utils.Logger.log_warn(
                        f"shadow: candidate {self.spec.candidate_model} version {self.spec.candidate_version} "
                        f"failed ({self.errors + 1} failed requests so far): {err}"
                    )
                self.errors += 1
                continue
            self.outcomes["compared"].increment(found.images)
            self.kinds["class"].increment(found.class_disagreements)
            self.kinds["tumour"].increment(found.tumour_disagreements)
            self.kinds["probability"].increment(found.probability_disagreements)
            self.abs_diff.increment(found.abs_diff_sum)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread after the queued work (at most ``timeout`` seconds; the rest is abandoned).

        Args:
            timeout: seconds to wait.
        """
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self.thread.join(timeout)


class _Canary:
    """The routing version's side of a canary: which requests go to the candidate, asking it, and the counts.

    Args:
        spec: the ``canary`` parameter, parsed.
        inputs: the model's input tensors' names.
        labels: the metrics' labels for this instance (``model_instance`` among them: it seeds the generator).
        warmup_requests: how many requests Triton's warm-up sends this instance first (never diverted nor counted).
    """

    def __init__(self, spec: Any, inputs: list[str], labels: dict[str, str], warmup_requests: int) -> None:
        import zlib

        from braintumor_serving import shadow

        self.spec, self.inputs, self.warmup, self.errors = spec, inputs, warmup_requests, 0
        self.rng = np.random.default_rng([int(spec.seed), zlib.crc32(labels["model_instance"].encode())])
        family = pb_utils.MetricFamily(
            name=shadow.CANARY_REQUESTS,
            description="requests of the canary's routing version, by the version that answered",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self._family = family  # the family must outlive its metrics
        self.counters = {a: family.Metric(labels={**labels, "answered_by": a}) for a in shadow.ANSWERED_BY}

    def choose(self) -> bool | None:
        """Whether the next request goes to the candidate; ``None`` for one of Triton's warm-up requests."""
        if self.warmup > 0:
            self.warmup -= 1
            return None
        return bool(self.rng.random() < self.spec.share)

    def ask(self, requests: list[Any], wanted: list[str], answered_by: list[str | None]) -> list[Any] | None:
        """The candidate's answers to ``requests`` (their images in one batched BLS request) as this model's
        responses, in order, or ``None`` when it failed (logged the first time and every thousandth).

        Args:
            requests: the callers' requests (of one batch, asking for the same outputs).
            wanted: the graph's outputs they ask for (the candidate is asked for these).
            answered_by: per request, the name of the ``answered_by`` output when it asks for it too.
        """
        try:
            arrays = {n: [pb_utils.get_input_tensor_by_name(r, n).as_numpy() for r in requests] for n in self.inputs}
            sizes = [len(a) for a in arrays[self.inputs[0]]]
            inputs = [pb_utils.Tensor(n, a[0] if len(a) == 1 else np.concatenate(a)) for n, a in arrays.items()]
            response = pb_utils.InferenceRequest(
                model_name=self.spec.candidate_model,
                model_version=int(self.spec.candidate_version),
                inputs=inputs,
                requested_output_names=wanted,
                timeout=int(self.spec.timeout_s * 1e6),  # Triton applies it to the queueing only
            ).exec()
            if response.has_error():
                raise RuntimeError(response.error().message())
            outputs = {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in wanted}
            bounds = np.cumsum([0, *sizes])
            answers = []
            for j, name in enumerate(answered_by):
                tensors = [
                    pb_utils.Tensor(n, np.ascontiguousarray(outputs[n][bounds[j] : bounds[j + 1]])) for n in wanted
                ]
                if name is not None:
                    version = np.full((sizes[j], 1), int(self.spec.candidate_version), np.int32)
                    tensors.append(pb_utils.Tensor(name, version))
                answers.append(pb_utils.InferenceResponse(output_tensors=tensors))
        except Exception as err:  # the primary answers instead: a canary failure never fails a caller
            if self.errors == 0 or (self.errors + len(requests)) // 1000 > self.errors // 1000:
                pb_utils.Logger.log_warn(
                    f"canary: candidate {self.spec.candidate_model} version {self.spec.candidate_version} failed "
                    f"({self.errors + len(requests)} failed requests so far; the primary answered them): {err}"
                )
            self.errors += len(requests)
            return None
        self.counters["candidate"].increment(len(requests))
        return answers


class TritonPythonModel:
    """Triton's python-backend model interface: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, str]) -> None:
        """Open the version's ONNX file (and its cut-down graph) and check it against the model configuration."""
        config = json.loads(args["model_config"])
        params = _parameters(config)
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        options = _options(params)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        session_inputs = {i.name for i in self.session.get_inputs()}
        session_outputs = {o.name for o in self.session.get_outputs()}
        self.inputs = [i["name"] for i in config["input"]]
        #: the configuration's ``answered_by`` output, answered by this backend rather than the graph
        self.answered_by = next((o["name"] for o in config["output"] if o["name"] == "answered_by"), None)
        self.outputs = [o["name"] for o in config["output"] if o["name"] != self.answered_by]
        #: the version this instance's own answers come from (the routing version runs the primary's files)
        self.version = int(args["model_version"])
        missing = sorted((set(self.inputs) - session_inputs) | (set(self.outputs) - session_outputs))
        if missing:
            raise pb_utils.TritonModelException(
                f"{path}: tensors {missing} of the model configuration are not in the ONNX model "
                f"(inputs {sorted(session_inputs)}, outputs {sorted(session_outputs)})"
            )
        self.output_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

        # (output names, session): the cut-down session first, used when a request asks only for its outputs
        self.sessions: list[tuple[list[str], ort.InferenceSession]] = []
        lean = [name.strip() for name in params.get("lean_outputs", "").split(",") if name.strip()]
        if lean and set(lean) < set(self.outputs):
            from braintumor_serving.onnx_outputs import keep_outputs

            session = ort.InferenceSession(keep_outputs(path, lean), options, providers=["CPUExecutionProvider"])
            ctypes.CDLL(None).malloc_trim(0)  # hand back what cutting the graph took (about 30 MB)
            self._warm_up(session, config, lean)
            self.sessions.append((lean, session))
        self.sessions.append((self.outputs, self.session))

        # Triton's warm-up requests reach this instance first: neither shadowed nor diverted nor counted
        warmup = sum(
            int(w.get("batch_size", 1)) * max(1, int(w.get("count", 1))) for w in config.get("model_warmup", [])
        )

        def rollout_labels(primary: int, candidate_model: str, candidate_version: int) -> dict[str, str]:
            return {
                "model": args["model_name"],
                "primary": str(primary),
                "candidate": f"{candidate_model}/{candidate_version}",
                "model_instance": args["model_instance_name"],
            }

        self.shadow: _Shadow | None = None
        if params.get("shadow"):
            from braintumor_serving.shadow import ShadowSpec

            spec = ShadowSpec.from_json(params["shadow"])
            if int(args["model_version"]) == spec.primary:
                labels = rollout_labels(spec.primary, spec.candidate_model, spec.candidate_version)
                self.shadow = _Shadow(spec, self.inputs[0], self.outputs[0], labels, warmup)

        self.canary: _Canary | None = None
        if params.get("canary"):
            from braintumor_serving.shadow import CanarySpec

            canary = CanarySpec.from_json(params["canary"])
            if int(args["model_version"]) == canary.router:
                labels = rollout_labels(canary.primary, canary.candidate_model, canary.candidate_version)
                self.canary = _Canary(canary, self.inputs, labels, warmup)
                self.version = canary.primary

    @staticmethod
    def _warm_up(session: ort.InferenceSession, config: dict[str, Any], outputs: list[str]) -> None:
        """Run a batch of 1 and a full batch (Triton's ``model_warmup`` reaches only the full session)."""
        for batch in sorted({1, max(1, int(config.get("max_batch_size", 1)))}):
            feeds = {
                i["name"]: np.zeros(
                    (batch, *[int(d) for d in i["dims"]]), pb_utils.triton_string_to_numpy(i["data_type"])
                )
                for i in config["input"]
            }
            session.run(outputs, feeds)

    def _session_for(self, wanted: set[str]) -> int:
        return next(k for k, (names, _) in enumerate(self.sessions) if wanted <= set(names))

    def execute(self, requests: list[Any]) -> list[Any]:
        """Run the ``requests`` as one ONNX Runtime batch per session they need; one response per request,
        in order. On a canary's routing version, the requests drawn for the candidate are answered by it first,
        in one batched BLS request per set of outputs asked for (those it fails join the primary's batch).

        Args:
            requests: Triton's requests for this instance.
        """
        asked = [set(r.requested_output_names()) for r in requests]
        #: the graph's outputs each request wants (all when it names none), and whether it wants ``answered_by``
        wanted = [(names - {self.answered_by}) if names else set(self.outputs) for names in asked]
        versions = [self.answered_by is not None and (not names or self.answered_by in names) for names in asked]
        responses: list[Any] = [None] * len(requests)
        #: who answers each request this instance answers itself, for the canary's counters
        answered: dict[int, str] = {}
        if self.canary is not None:
            #: the requests drawn for the candidate, by the outputs they want: one BLS request each
            diverted: dict[tuple[str, ...], list[int]] = {}
            for k in range(len(requests)):
                chosen = self.canary.choose()
                if chosen:
                    diverted.setdefault(tuple(n for n in self.outputs if n in wanted[k]), []).append(k)
                elif chosen is not None:
                    answered[k] = "primary"
            for outputs, members in diverted.items():
                names = [self.answered_by if versions[k] else None for k in members]
                answers = self.canary.ask([requests[k] for k in members], list(outputs), names)
                for k, answer in zip(members, answers or [None] * len(members), strict=True):
                    responses[k] = answer
                    if answer is None:
                        answered[k] = "fallback"
        groups: dict[int, list[int]] = {}
        for k, names in enumerate(wanted):
            if responses[k] is None:
                groups.setdefault(self._session_for(names), []).append(k)
        for index, members in groups.items():
            names, session = self.sessions[index]
            try:
                feeds: dict[str, np.ndarray] = {}
                sizes: list[int] = []
                for name in self.inputs:
                    arrays = [pb_utils.get_input_tensor_by_name(requests[k], name).as_numpy() for k in members]
                    sizes = [len(a) for a in arrays]
                    feeds[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
                results = dict(zip(names, session.run(names, feeds), strict=True))
            except Exception as err:
                error = pb_utils.TritonError(f"inference failed: {err}")
                for k in members:
                    responses[k] = pb_utils.InferenceResponse(output_tensors=[], error=error)
                    if k in answered and self.canary is not None:
                        self.canary.counters[answered[k]].increment(1)
                continue
            bounds = np.cumsum([0, *sizes])
            for j, k in enumerate(members):
                tensors = [
                    pb_utils.Tensor(
                        name, results[name][bounds[j] : bounds[j + 1]].astype(self.output_dtypes[name], copy=False)
                    )
                    for name in self.outputs
                    if name in wanted[k]
                ]
                if versions[k]:
                    answered_by = np.full((sizes[j], 1), self.version, np.int32)
                    tensors.append(pb_utils.Tensor(str(self.answered_by), answered_by))
                responses[k] = pb_utils.InferenceResponse(output_tensors=tensors)
                if k in answered and self.canary is not None:
                    self.canary.counters[answered[k]].increment(1)
                if self.shadow is not None:
                    self.shadow.offer(
                        feeds[self.inputs[0]][bounds[j] : bounds[j + 1]],
                        results[self.outputs[0]][bounds[j] : bounds[j + 1]],
                    )
        return responses

    def finalize(self) -> None:
        """Stop the shadow thread and release the ONNX Runtime sessions."""
        if self.shadow is not None:
            self.shadow.close()
            self.shadow = None
        self.canary = None
        self.session = None
        self.sessions = []
