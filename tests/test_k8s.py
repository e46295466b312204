"""Kubernetes manifests: every overlay renders, validates against a stated Kubernetes version, passes
checkov, and uses exactly the ports, paths, model names and flags the serving code uses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from braintumor.config import MODEL_NAME, PROJECT_ROOT
from braintumor.model_repository import CPU_CONFIG_NAME
from braintumor_serving.front import FRONT_KEY_HEADER
from braintumor_serving.triton import ServerConfig, TritonServer

K8S = PROJECT_ROOT / "deploy" / "k8s"
TOOLS = PROJECT_ROOT / ".tools" / "bin"
KUBERNETES_VERSION = "1.31.0"
TARGETS = {
    "gpu": K8S / "overlays" / "gpu",
    "cpu": K8S / "overlays" / "cpu",
    "cpu-ingress": K8S / "overlays" / "cpu-ingress",
    "tfserving": K8S / "tfserving",
}
RESTRICTED = "model-repository,shared-memory,statistics,trace,logging:admin-key=$(ADMIN_KEY)"


def _tool(path: Path | None, name: str) -> str:
    found = str(path) if path and path.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (scripts/setup.sh installs it)")
    return found


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    kubectl = _tool(None, "kubectl")
    out = tmp_path_factory.mktemp("rendered")
    result = {}
    for name, folder in TARGETS.items():
        text = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, check=True).stdout
        path = out / f"{name}.yaml"
        path.write_text(text)
        result[name] = (path, [d for d in yaml.safe_load_all(text) if d])
    return result


def _one(docs: list[dict], kind: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def _named(docs: list[dict], kind: str, name: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _container(docs: list[dict]) -> dict:
    return _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("name", list(TARGETS))
def test_schema_validation_against_a_stated_kubernetes_version(rendered, name):
    validate = _tool(TOOLS / "kubernetes-validate", "kubernetes-validate")
    path, docs = rendered[name]
    result = subprocess.run([validate, "-k", KUBERNETES_VERSION, "--strict", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    validated = result.stdout + result.stderr
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # a CRD without a published schema: checked by test_monitoring_matches_the_pods below
        assert f"{doc['kind'].lower()}/{doc['metadata']['name']}" in validated


def _checkov(path: Path, framework: str) -> tuple[dict, str]:
    """Run checkov offline on one file; returns its summary and its raw report."""
    checkov = _tool(TOOLS / "checkov", "checkov")
    result = subprocess.run(
        [checkov, "-f", str(path), "--framework", framework, "--skip-download", "--quiet", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(result.stdout)
    return (report[0] if isinstance(report, list) else report)["summary"], result.stdout[-3000:]


@pytest.mark.parametrize("name", list(TARGETS))
def test_checkov_finds_no_failed_check(rendered, name):
    summary, report = _checkov(rendered[name][0], "kubernetes")
    assert summary["failed"] == 0 and summary["passed"] > 50, report


def test_dockerfile_passes_checkov_and_runs_the_embedded_server():
    dockerfile = PROJECT_ROOT / "deploy" / "docker" / "Dockerfile"
    summary, report = _checkov(dockerfile, "dockerfile")
    assert summary["failed"] == 0 and summary["passed"] > 20, report
    text = dockerfile.read_text()
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2  # multi-stage
    assert re.search(r"^USER 10001", text, re.M)
    assert all(":latest" not in line for line in text.splitlines() if line.startswith("FROM"))
    assert "COPY model_repository /opt/braintumor/model_repository" in text
    assert '"braintumor", "serve", "--host", "0.0.0.0", "--repository", "/opt/braintumor/model_repository"' in text
    requirements = (PROJECT_ROOT / "deploy" / "docker" / "requirements-serve.txt").read_text().splitlines()
    pins = [line for line in requirements if line.strip() and not line.startswith("#")]
    assert pins and all("==" in line for line in pins)


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_ports_probes_and_flags_match_the_serving_code(rendered, name):
    _, docs = rendered[name]
    defaults = ServerConfig()
    ports = {"http": defaults.http_port, "grpc": defaults.grpc_port, "metrics": defaults.metrics_port}
    container = _container(docs)
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == ports
    service = _named(docs, "Service", "braintumor")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    assert {p["name"]: p.get("appProtocol") for p in service["spec"]["ports"]}["grpc"] == "kubernetes.io/h2c"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    args = container["args"]
    for flag, port in (
        ("--http-port", ports["http"]),
        ("--grpc-port", ports["grpc"]),
        ("--metrics-port", ports["metrics"]),
    ):
        assert f"{flag}={port}" in args
    if name == "cpu":  # braintumor serve adds the flags itself, with the key from $ADMIN_KEY
        assert "--admin-key-env=ADMIN_KEY" in args
        args = TritonServer(ServerConfig(admin_key="$(ADMIN_KEY)")).command(Path("/backends"))
    assert "--model-control-mode=none" in args
    assert f"--http-restricted-api={RESTRICTED}" in args and f"--grpc-restricted-protocol={RESTRICTED}" in args
    # HTTP inference reaches Triton only through serve's checking front (cpu: Triton's HTTP on loopback, with
    # the front's key) or from admin-key holders (gpu): Triton aborts on some malformed HTTP inference requests.
    # gRPC inference, which refuses them cleanly, stays open.
    if name == "cpu":
        assert "--http-address=127.0.0.1" in args
        assert any(a.startswith(f"--http-restricted-api=inference:{FRONT_KEY_HEADER}=") for a in args)
    else:
        assert "--http-restricted-api=inference:admin-key=$(ADMIN_KEY)" in args
    assert not any("inference" in a for a in args if a.startswith("--grpc-restricted-protocol"))
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault" and security["runAsNonRoot"]
    policy = _one(docs, "NetworkPolicy")["spec"]["ingress"]
    client_ports = {p["port"] for p in policy[0]["ports"]}
    monitoring_ports = {p["port"] for p in policy[1]["ports"]}
    assert client_ports == {ports["http"], ports["grpc"]} and monitoring_ports == {ports["metrics"]}


def test_gpu_overlay_serves_the_repositorys_gpu_configuration(rendered):
    _, docs = rendered["gpu"]
    container = _container(docs)
    args = container["args"]
    assert container["command"] == ["tritonserver"]
    assert not any(a.startswith("--model-config-name") for a in args)  # so config.pbtxt (GPU) is used
    config = (PROJECT_ROOT / "model_repository" / MODEL_NAME / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in config and 'name: "tensorrt"' in config and "KIND_GPU" in config
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    repository = _one(docs, "ConfigMap")["data"]["MODEL_REPOSITORY"]
    assert repository.startswith(("s3://", "gs://")) and "--model-repository=$(MODEL_REPOSITORY)" in args


def test_cpu_overlay_serves_the_repositorys_cpu_configuration(rendered):
    assert ServerConfig().model_config_name == CPU_CONFIG_NAME  # braintumor serve picks configs/cpu.pbtxt
    config = (PROJECT_ROOT / "model_repository" / MODEL_NAME / "configs" / f"{CPU_CONFIG_NAME}.pbtxt").read_text()
    assert 'backend: "onnxruntime_python"' in config
    command = TritonServer(ServerConfig()).command(Path("/backends"))
    assert f"--model-config-name={CPU_CONFIG_NAME}" in command


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_monitoring_and_autoscaling_match_the_pods(rendered, name):
    _, docs = rendered[name]
    deployment = _one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    monitor = _one(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in {p["name"] for p in _container(docs)["ports"]}
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())["rules"][0]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == adapter["name"]["as"]
    assert "nv_inference_request_success" in adapter["seriesQuery"]


def test_tfserving_serves_the_exported_savedmodel(rendered):
    _, docs = rendered["tfserving"]
    container = _container(docs)
    args = container["args"]
    assert f"--model_name={MODEL_NAME}" in args and f"--model_base_path=/models/{MODEL_NAME}" in args
    assert "--port=8500" in args and "--rest_api_port=8501" in args and "--enable_batching=true" in args
    assert {p["containerPort"] for p in container["ports"]} == {8500, 8501}
    config = _one(docs, "ConfigMap")["data"]
    assert "max_batch_size { value: 32 }" in config["batching.config"]
    assert 'path: "/monitoring/prometheus/metrics"' in config["monitoring.config"]
    assert (PROJECT_ROOT / "deploy" / "tfserving" / "models" / MODEL_NAME / "1" / "saved_model.pb").exists()


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_rollouts_drain_pods_and_a_headless_service_lists_the_ready_ones(rendered, name):
    from braintumor_serving.drain import parser

    _, docs = rendered[name]
    deployment = _one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0} and spec["minReadySeconds"] > 0
    container = _container(docs)
    hook = container["lifecycle"]["preStop"]["exec"]["command"]
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    triton_exit_timeout = 30  # tritonserver's --exit-timeout-secs default: its own graceful stop
    if name == "cpu":  # the drain module, reading this pod's metrics port, within the grace period
        assert hook[:3] == ["python", "-m", "braintumor_serving.drain"]
        args = parser().parse_args(hook[3:])
        assert args.metrics_url == f"http://127.0.0.1:{ServerConfig().metrics_port}/metrics"
        assert args.wait > 0 and args.wait + args.timeout + triton_exit_timeout < grace
    else:
        assert hook[0] == "sleep" and int(hook[1]) + triton_exit_timeout < grace
    headless = _named(docs, "Service", "braintumor-headless")["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is False
    assert headless["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["name"]: p["port"] for p in headless["ports"]} == {"http": ports["http"], "grpc": ports["grpc"]}


def test_ingress_nginx_balances_grpc_and_http_per_request(rendered):
    from braintumor_serving.balancer import default_body_bytes

    _, docs = rendered["cpu-ingress"]
    service = _named(docs, "Service", "braintumor")
    for ingress_name, port, protocol in (("braintumor-grpc", "grpc", "GRPC"), ("braintumor-http", "http", None)):
        ingress = _named(docs, "Ingress", ingress_name)
        notes = ingress["metadata"]["annotations"]
        assert notes.get("nginx.ingress.kubernetes.io/backend-protocol") == protocol
        assert (
            int(notes["nginx.ingress.kubernetes.io/proxy-body-size"].removesuffix("m")) * 2**20 >= default_body_bytes()
        )
        assert "non_idempotent" in notes["nginx.ingress.kubernetes.io/proxy-next-upstream"]
        assert ingress["spec"]["tls"][0]["secretName"]
        backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        assert (
            backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]} and backend["port"]["name"] == port
        )
