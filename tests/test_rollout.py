"""A rolling update of two real replicas from version N to N+1 behind nginx, under load: each replica is
drained (out of nginx, in-flight requests finished), restarted on the new repository and put back once
ready, one after the other. No request fails or is lost, every answer comes from a version its client may
see, and a client pinned to the version that leaves keeps it while a replica still serves it."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
from balancing import (
    Load,
    infer_direct,
    make_certificates,
    new_admin_key,
    private_folder,
    start_balancer,
    start_replicas,
)
from helpers import copy_repository

from braintumor.config import MODEL_NAME
from braintumor.model_repository import versions
from braintumor.preprocessing import preprocess_batch
from braintumor_serving.rollout import RolloutError, rolling_update
from synthetic import random_slice

pytest.importorskip("tritonclient.grpc")
pytestmark = pytest.mark.slow


def test_rolling_update_under_load_fails_no_request(tmp_path, capsys):
    if not shutil.which("nginx") and not shutil.which("/usr/sbin/nginx"):
        pytest.skip("nginx is not installed (scripts/setup.sh installs Debian's nginx)")
    if shutil.which("curl") is None or shutil.which("openssl") is None:
        pytest.skip("curl and openssl are needed")
    n = versions(copy_repository(tmp_path / "all") / MODEL_NAME)[-1]
    # Before: versions N-1 and N (the policy serves the latest two). After: N+1 is published (a copy of N,
    # so that its answers are known), and the replicas serve N and N+1.
    before = copy_repository(tmp_path / "before", keep=(n - 1, n))
    after = copy_repository(tmp_path / "after", keep=(n - 1, n), extra_versions=1)
    model = after / MODEL_NAME
    assert (model / str(n + 1) / "model.onnx").read_bytes() == (model / str(n) / "model.onnx").read_bytes()
    admin_key = new_admin_key()
    prefix = private_folder("nginx")
    pki = make_certificates(prefix / "pki")
    replicas = start_replicas(before, tmp_path, admin_key)
    balancer = load = None
    try:
        balancer = start_balancer(replicas, prefix, pki)
        pixels = preprocess_batch([random_slice(np.random.default_rng(7), 224, k % 4) for k in range(4)])
        expected = {v: infer_direct(replicas[0], pixels, v) for v in (n - 1, n)}
        expected[n + 1] = expected[n]
        load = Load(
            balancer,
            pixels,
            expected,
            allowed={"latest": {n, n + 1}, "pinned": {n}, "curl-latest": {n, n + 1}, "old": {n - 1}},
            grpc_clients={"latest": ("", 6), "pinned": (str(n), 2)},
            curl_clients={"curl-latest": ("", 1), "old": (str(n - 1), 2)},
            ca=pki / "ca.pem",
            folder=tmp_path,
        ).start()
        time.sleep(2)
        steps = rolling_update(balancer, replicas, after, ready_timeout=300, min_ready=3)
        finished = time.monotonic()
        time.sleep(2)
        load.stop()
        # Refused: taking a replica out while no other can take its load.
        replicas[1].kill()
        with pytest.raises(RolloutError, match="no other replica is ready"):
            rolling_update(balancer, replicas, before)
        assert replicas[0].is_ready()  # nothing was stopped
    finally:
        if load is not None:
            load.stop()
        if balancer is not None:
            balancer.stop()
        for r in replicas:
            r.kill()
        shutil.rmtree(prefix, ignore_errors=True)
    ledger = load.ledger()
    seen = {name: sorted({r.version for r in load.records if r.client == name and r.version}) for name in ledger}
    old_errors = [r for r in load.records if r.client == "old" and r.outcome == "errored"]
    with capsys.disabled():
        print(
            f"\nrollout ledger: {ledger}; versions seen {seen}; steps {steps}; "
            f"errors of the pinned N-1 client: {sorted({r.error[:90] for r in old_errors})[:3]}"
        )
    assert [s.versions for s in steps] == [(n, n + 1), (n, n + 1)]
    assert all(v["lost"] == 0 and v.get("wrong", 0) == 0 for v in ledger.values())
    for name in ("latest", "pinned", "curl-latest"):
        assert ledger[name].get("errored", 0) == 0 and ledger[name]["answered"] > 5, name
    assert seen["latest"] == [n, n + 1] and seen["pinned"] == [n]
    late = [r for r in load.records if r.client == "latest" and r.done > finished + 0.5]
    assert late and {r.version for r in late} == {n + 1}
    # Pinned to N-1: answered by N-1 while a replica still served it (after the first replica moved, nginx
    # sends its 404 on to the other), and a clear 404 only once the last replica serving it left.
    kept = [r for r in load.records if r.client == "old" and steps[0].back_at + 0.5 < r.done < steps[1].left_at]
    assert kept and all(r.outcome == "answered" for r in kept)
    assert all(r.done > steps[1].left_at and r.error.startswith("404") for r in old_errors)
