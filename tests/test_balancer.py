"""nginx in front of two real replicas (``braintumor serve`` on 127.0.0.1 and 127.0.0.2, nginx on 127.0.0.3 with
TLS): plain ``tritonclient`` gRPC and ``curl`` HTTPS through it, a replica drained and stopped, then one
killed under load. Every request ends in a ledger: zero lost or wrong; none failed but the gRPC requests in
flight on the replica at the instant it was killed."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from balancing import (
    BALANCER_HOST,
    Load,
    access_log,
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
from braintumor_serving.balancer import (
    Balancer,
    BalancerConfig,
    BalancerError,
    Replica,
    default_body_bytes,
    main,
    render,
)
from braintumor_serving.drain import wait_idle
from synthetic import random_slice

pytest.importorskip("tritonclient.grpc")


def _nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not found:
        pytest.skip("nginx is not installed (scripts/setup.sh installs Debian's nginx)")
    return found


def test_rendered_configuration_passes_nginx_t(tmp_path):
    nginx = _nginx()
    config = BalancerConfig(replicas=(Replica("127.0.0.1", 8000, 8001), Replica("10.0.0.7", 8000, 8001, down=True)))
    text = render(config)
    assert "${" not in text
    assert "server 10.0.0.7:8001 max_fails=1 fail_timeout=5s down;" in text
    assert "grpc_pass grpc://braintumor_grpc;" in text and "listen 127.0.0.1:8081 http2;" in text
    assert f"client_max_body_size {default_body_bytes()};" in text
    # the front's limit for a JSON batch of 32: above the binary batch, not unbounded
    assert 32 * 160 * 160 * 3 * 4 < default_body_bytes() < 32 * 1024 * 1024
    for sub in ("logs", "tmp"):
        (tmp_path / sub).mkdir()
    (tmp_path / "nginx.conf").write_text(text)
    check = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--replica", "127.0.0.1:8000"], "HOST:HTTP_PORT:GRPC_PORT"),
        (["--replica", "127.0.0.1:8000:70000"], "between 1 and 65535"),
        (["--replica", "bad host;:8000:8001"], "not a host name"),
        ([], "at least one replica"),
        (["--replica", "127.0.0.1:8000:8001", "--tls-cert", "x.pem"], "both a certificate"),
        (["--replica", "127.0.0.1:8000:8001", "--tls-cert", "x.pem", "--tls-key", "x.key"], "not found"),
        (["--replica", "127.0.0.1:8000:8001", "--user", "root; daemon on"], "user must be"),
        (["--replica", "127.0.0.1:8000:8001", "--host", "0.0.0.0;"], "not a host name"),
    ],
)
def test_bad_balancer_arguments_get_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_nginx_refusing_a_configuration_keeps_the_running_one(tmp_path):
    _nginx()
    from dataclasses import replace

    from helpers import free_ports

    http, grpc = free_ports(2, "127.0.0.3")
    config = BalancerConfig(replicas=(Replica("127.0.0.1", 9, 9),), host="127.0.0.3", http_port=http, grpc_port=grpc)
    (tmp_path / "bad.pem").write_text("not a certificate")
    with Balancer(config, tmp_path / "prefix") as balancer:
        workers = balancer.workers()
        assert workers
        with pytest.raises(BalancerError, match="nginx refuses the configuration"):
            balancer.reload(replace(config, tls_cert=tmp_path / "bad.pem", tls_key=tmp_path / "bad.pem"))
        assert balancer.workers() == workers and balancer.config == config
        # a replica that refuses connections: a clear 502 from nginx, which keeps running
        try:
            urllib.request.urlopen(f"http://127.0.0.3:{http}/v2/health/ready", timeout=10)
        except urllib.error.HTTPError as err:
            assert err.code == 502
        else:
            raise AssertionError("nginx answered 200 for a replica that is not there")
        assert balancer.process.poll() is None


@pytest.mark.slow
def test_kill_and_drain_under_load_lose_nothing(tmp_path, capsys):
    _nginx()
    if shutil.which("curl") is None or shutil.which("openssl") is None:
        pytest.skip("curl and openssl are needed")
    repository = copy_repository(tmp_path / "model_repository")
    served = versions(repository / MODEL_NAME)[-2:]  # the version policy serves the latest two
    admin_key = new_admin_key()
    prefix = private_folder("nginx")
    pki = make_certificates(prefix / "pki")
    replicas = start_replicas(repository, tmp_path, admin_key)
    balancer = None
    load = None
    try:
        balancer = start_balancer(replicas, prefix, pki)
        rng = np.random.default_rng(18)
        from braintumor.preprocessing import preprocess_batch

        pixels = preprocess_batch([random_slice(rng, 224, k % 4) for k in range(6)])
        latest = served[-1]
        expected = {latest: infer_direct(replicas[0], pixels, latest)}
        assert np.allclose(expected[latest], infer_direct(replicas[1], pixels, latest), atol=1e-6)

        # The admin key passes through nginx untouched: statistics need it there as on a replica.
        stats = f"{balancer.config.scheme}://{BALANCER_HOST}:{balancer.config.http_port}/v2/models/{MODEL_NAME}/stats"
        import ssl

        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(stats, context=context, timeout=5)
        request = urllib.request.Request(stats, headers={"admin-key": admin_key})
        with urllib.request.urlopen(request, context=context, timeout=5) as response:
            assert response.status == 200

        before = [r.inference_count() for r in replicas]
        load = Load(
            balancer,
            pixels,
            expected,
            allowed={"grpc": {latest}, "curl": {latest}},
            grpc_clients={"grpc": ("", 8)},
            curl_clients={"curl": ("", 3)},
            ca=pki / "ca.pem",
            folder=tmp_path,
        ).start()
        time.sleep(4)
        shares = [r.inference_count() - b for r, b in zip(replicas, before, strict=True)]

        # (a) a graceful stop: out of nginx (its in-flight requests finish), idle, SIGTERM
        drain_s = balancer.set_down(1)
        assert wait_idle(replicas[1].metrics_url, quiet=0.5, timeout=20)
        replicas[1].stop()
        stopped = time.monotonic()
        time.sleep(2)
        during_drain = load.answered_since(stopped)
        replicas[1].start().wait_ready(300)
        balancer.set_down(1, down=False)

        # (b) SIGKILL of the other replica under load
        time.sleep(2)
        killed, killed_wall = time.monotonic(), time.time()
        replicas[0].kill()
        time.sleep(4)
        load.stop()
        ended = time.monotonic()
    finally:
        if load is not None:
            load.stop()
        if balancer is not None:
            balancer.stop()
            rows = access_log(balancer)
            logs = balancer.access_log.read_text() + balancer.error_log.read_text()
        for r in replicas:
            r.kill()
        shutil.rmtree(prefix, ignore_errors=True)
    ledger = load.ledger()
    errors = sorted({r.error for r in load.records if r.outcome == "errored"})[:5]
    gap = load.longest_gap(killed, ended)
    survivor = f"{replicas[1].host}:{replicas[1].http_port}", f"{replicas[1].host}:{replicas[1].grpc_port}"
    after = [row for row in rows if row[0] > killed_wall + 2]
    with capsys.disabled():
        print(
            f"\nbalancer ledger: {ledger}; shares per replica {shares}; drain {drain_s:.2f} s; "
            f"answered in 2 s after the graceful stop {during_drain}; longest gap after the kill {gap:.2f} s; "
            f"errors {errors}"
        )
    assert all(v["lost"] == 0 and v.get("wrong", 0) == 0 for v in ledger.values())
    # HTTP: nginx buffers the body and resends it, so nothing fails. gRPC: nginx streams the body (its grpc
    # module always does) and can resend only what it has not sent yet, so a request in flight on the killed
    # replica at that instant ends with a clear UNAVAILABLE (HTTP 502), which gRPC clients may retry.
    assert ledger["curl"].get("errored", 0) == 0
    failed = [r for r in load.records if r.outcome == "errored"]
    assert all(killed <= r.done <= killed + 2 and "UNAVAILABLE" in r.error and "502" in r.error for r in failed)
    assert len(failed) <= 8  # at most the gRPC requests in flight
    assert all(v.get("answered", 0) > 10 for v in ledger.values())
    assert min(shares) > 0.2 * sum(shares), "nginx did not spread the load over both replicas"
    assert during_drain > 0
    assert gap < 2.0, "the survivor did not take the load within 2 s"
    assert after and all(row[2] in survivor for row in after)
    assert admin_key not in logs


def test_drain_hook_refuses_bad_arguments_and_gives_up_on_an_absent_server(capsys):
    from braintumor_serving.drain import main as drain_main

    assert drain_main(["--wait", "-1"]) == 2
    assert "must be 0 or more" in capsys.readouterr().err
    started = time.monotonic()
    assert not wait_idle("http://127.0.0.1:9/metrics", timeout=5)  # nothing listens: no wait
    assert drain_main(["--metrics-url", "http://127.0.0.1:9/metrics", "--wait", "0"]) == 0
    assert "stopping anyway" in capsys.readouterr().err and time.monotonic() - started < 5
