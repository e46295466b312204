"""Locust load tests, a real Prometheus scraping Triton and the load generator, rules and dashboards."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from helpers import free_ports, metric

from braintumor.config import MODEL_NAME, PROJECT_ROOT

pytestmark = pytest.mark.slow
PROMETHEUS_DIR = PROJECT_ROOT / "deploy" / "prometheus"
LOCUSTFILE = PROJECT_ROOT / "loadtest" / "locustfile.py"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/setup.sh installs Debian's prometheus package)")
    return path


def _locust(host: str, out: Path, *extra: str, users: int = 4, seconds: int = 20) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("locust") is None:  # never import it here: it monkey-patches the process
        pytest.skip("locust is not installed")
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{seconds}s",
        "--csv",
        str(out / "stats"),
        "--html",
        str(out / "report.html"),
        "--max-images",
        "16",
        "--only-summary",
        "--stop-timeout",  # users finish their request in flight, so every request sent is counted
        "10",
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=seconds + 90, cwd=PROJECT_ROOT)


def _aggregated(out: Path) -> dict[str, str]:
    rows = list(csv.DictReader((out / "stats_stats.csv").open()))
    return next(r for r in rows if r["Name"] == "Aggregated")


def test_rules_are_valid_and_their_unit_tests_pass():
    promtool = _tool("promtool")
    for args in (
        ["check", "rules", "rules.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "rules_test.yml"],
    ):
        result = subprocess.run([promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_json_is_generated_from_its_builder():
    pytest.importorskip("grafanalib")
    sys.path.insert(0, str(PROJECT_ROOT / "deploy" / "grafana"))
    import dashboard

    committed = (PROJECT_ROOT / "deploy" / "grafana" / "dashboards" / "braintumor.json").read_text()
    assert dashboard.render() == committed, "run python deploy/grafana/dashboard.py and commit the result"
    data = json.loads(committed)
    titles = " ".join(p["title"] for p in data["panels"]).lower()
    for needed in ("request rate", "latency by stage", "batch size", "errors", "queue depth", "cpu and gpu"):
        assert needed in titles


def test_short_locust_run_meets_its_service_levels(triton, tmp_path):
    result = _locust(triton.config.grpc_url, tmp_path, "--p95-ms", "2000", users=4, seconds=20)
    assert result.returncode == 0, result.stderr[-3000:]
    total = _aggregated(tmp_path)
    assert int(total["Request Count"]) > 50 and int(total["Failure Count"]) == 0
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert "service level met" in result.stderr


def test_violated_service_level_makes_locust_exit_nonzero(triton, tmp_path):
    result = _locust(triton.config.grpc_url, tmp_path, "--p95-ms", "0.001", users=2, seconds=3)
    assert result.returncode == 1
    assert "service level not met: p95 latency" in result.stderr


def _query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _scalar(base: str, expr: str) -> float | None:
    result = _query(base, expr)
    return float(result[0]["value"][1]) if result else None


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def prometheus(triton, tmp_path):
    binary = _tool("prometheus")
    port, exporter = free_ports(2)
    config = tmp_path / "prometheus.yml"
    shutil.copy(PROMETHEUS_DIR / "rules.yml", tmp_path / "rules.yml")
    config.write_text(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [rules.yml]
scrape_configs:
  - job_name: triton
    static_configs: [{{targets: ["127.0.0.1:{triton.config.metrics_port}"]}}]
  - job_name: loadtest
    static_configs: [{{targets: ["127.0.0.1:{exporter}"]}}]
""")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _ready(base), 30, "Prometheus to start")
        yield base, exporter
    finally:
        proc.terminate()
        proc.wait(10)


def _ready(base: str) -> bool:
    try:
        return urllib.request.urlopen(f"{base}/-/ready", timeout=1).status == 200
    except OSError:
        return False


def test_prometheus_counts_agree_exactly_with_the_load_generator(triton, prometheus, tmp_path):
    base, exporter = prometheus
    served = f'sum(nv_inference_request_success{{model="{MODEL_NAME}"}})'
    before = metric(triton.config.metrics_url, "nv_inference_request_success", model=MODEL_NAME)
    _wait_for(lambda: _scalar(base, served) == before, 30, "Prometheus to scrape Triton")

    result = _locust(
        triton.config.grpc_url,
        tmp_path,
        "--metrics-port",
        str(exporter),
        "--metrics-linger",
        "4",
        "--p95-ms",
        "5000",
        users=8,
        seconds=8,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sent = int(_aggregated(tmp_path)["Request Count"])
    after = metric(triton.config.metrics_url, "nv_inference_request_success", model=MODEL_NAME)
    assert after - before == sent  # Triton itself counted exactly what Locust sent
    _wait_for(lambda: _scalar(base, served) == after, 30, "Prometheus to scrape the final Triton count")

    client_ok = _scalar(base, 'max_over_time(braintumor_loadtest_requests_total{outcome="success"}[5m])')
    client_failed = _scalar(base, 'max_over_time(braintumor_loadtest_requests_total{outcome="failure"}[5m])')
    assert client_ok == sent and client_failed == 0
    assert _scalar(base, served) - before == client_ok

    def window(expr: str) -> float | None:
        return _scalar(base, f"max_over_time(({expr})[2m:1s])")

    rate = window(f'sum(rate(nv_inference_request_success{{model="{MODEL_NAME}"}}[1m]))')
    queue_share = window("braintumor:queue_time:share_rate1m")
    batch = window("braintumor:batch_size:avg_rate1m")
    p95 = window("braintumor:client_latency_seconds:p95_rate1m")
    assert rate is not None and rate > 0
    assert queue_share is not None and 0.0 <= queue_share <= 1.0
    assert batch is not None and batch >= 1.0
    assert p95 is not None and 0 < p95 <= 5.0 and not math.isnan(p95)

    sys.path.insert(0, str(PROJECT_ROOT / "deploy" / "grafana"))
    import dashboard

    for expr in dashboard.queries():  # every dashboard query runs on this real Prometheus
        _query(base, expr)
