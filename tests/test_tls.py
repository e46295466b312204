"""gRPC over TLS and mutual TLS on the real embedded server, with certificates made at test time."""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import copy_repository, free_ports

from synthetic import random_slice

pytest.importorskip("tritonclient.grpc")

from braintumor.classifier import TumorClassifier
from braintumor.errors import ServerUnavailableError
from braintumor_serving.triton import ADMIN_KEY_HEADER, ServeError, ServerConfig, TritonServer

pytestmark = pytest.mark.slow


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=braintumor test CA",
        cwd=d,
    )
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    # one certificate that two servers (127.0.0.1 and 127.0.0.2) could share
    (d / "shared.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:127.0.0.2\nextendedKeyUsage=serverAuth\n"
    )
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other-ca.key", "-out", "other-ca.pem",
             "-days", "1", "-subj", "/CN=another CA", cwd=d)  # fmt: skip
    for name in ("server", "client", "shared"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    return d


def _server(
    tmp_path: Path,
    pki: Path,
    mutual: bool,
    host: str = "127.0.0.1",
    cert: str = "server",
    keep: tuple[int, ...] | None = None,
) -> TritonServer:
    http, grpc, metrics = free_ports(3, host)
    config = ServerConfig(
        repository=copy_repository(tmp_path / "model_repository", keep=keep),
        host=host,
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        tls_cert=pki / f"{cert}.pem",
        tls_key=pki / f"{cert}.key",
        tls_client_ca=pki / "ca.pem" if mutual else None,
    )
    return TritonServer(config)


def _inferences(server: TritonServer) -> int:
    """Inferences the server answered (Triton's statistics, a restricted API: the admin key)."""
    request = urllib.request.Request(
        f"http://{server.local_http_url}/v2/models/braintumor/stats",
        headers={ADMIN_KEY_HEADER: server.config.admin_key},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        stats = json.loads(response.read())
    return sum(int(m["inference_stats"]["success"]["count"]) for m in stats["model_stats"])


def _https_ready(server: TritonServer, pki: Path, client_cert: bool) -> int:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if client_cert:
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    url = f"https://{server.config.http_url}/v2/health/ready"
    with urllib.request.urlopen(url, context=context, timeout=5) as response:
        return response.status


def _https_issue_17(server: TritonServer, pki: Path) -> tuple[int, dict]:
    """POST issue 17's request (a tensor declared beyond memory) over HTTPS."""
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 100000, 100000, 3], "data": [0]}]}
    request = urllib.request.Request(
        f"https://{server.config.http_url}/v2/models/braintumor/infer", data=json.dumps(body).encode()
    )
    try:
        with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(pki / "ca.pem"))) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_grpc_and_http_over_tls(certificates, tmp_path):
    image = random_slice(np.random.default_rng(0))
    with _server(tmp_path, certificates, mutual=False) as server:
        server.wait_until_ready(120)
        url = server.config.grpc_url
        assert _https_ready(server, certificates, client_cert=False) == 200
        status, answer = _https_issue_17(server, certificates)  # the front checks HTTPS requests too
        assert status == 400 and "shape" in answer["error"]
        assert server.process.poll() is None and _https_ready(server, certificates, client_cert=False) == 200
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://{server.config.http_url}/v2/health/ready", timeout=5)
        with TumorClassifier(url, ssl=True, root_certificates=str(certificates / "ca.pem")) as secure:
            assert secure.predict(image).label
        with pytest.raises(ServerUnavailableError):  # plaintext to a TLS port
            TumorClassifier(url, timeout=2, retries=0)


def test_mutual_tls_needs_a_client_certificate(certificates, tmp_path):
    image = random_slice(np.random.default_rng(1))
    with _server(tmp_path, certificates, mutual=True) as server:
        server.wait_until_ready(120)
        url, ca = server.config.grpc_url, str(certificates / "ca.pem")
        with TumorClassifier(
            url,
            ssl=True,
            root_certificates=ca,
            private_key=str(certificates / "client.key"),
            certificate_chain=str(certificates / "client.pem"),
        ) as client:
            assert client.predict(image).label
        with pytest.raises(ServerUnavailableError):
            TumorClassifier(url, ssl=True, root_certificates=ca, timeout=2, retries=0)
        assert _https_ready(server, certificates, client_cert=True) == 200
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _https_ready(server, certificates, client_cert=False)


def test_incomplete_tls_options_are_refused(certificates, tmp_path):
    with pytest.raises(ServeError, match="both a certificate"):
        TritonServer(ServerConfig(tls_cert=certificates / "server.pem")).start()
    with pytest.raises(ServeError, match="not found"):
        TritonServer(ServerConfig(tls_cert=tmp_path / "x.pem", tls_key=tmp_path / "x.key")).start()


def test_a_list_of_tls_servers_is_balanced_and_each_checked_on_connect(certificates, tmp_path, capsys):
    """Two TLS servers, one client: gRPC checks one name for a whole channel (a list's own authority is the list),
    so the SDK checks the first host of the list, or ``tls_server_name``, in every server's certificate, and
    ``connect`` checks each server against it: a certificate without it is one clear error there."""
    ca, rng = str(certificates / "ca.pem"), np.random.default_rng(2)
    images = [random_slice(rng) for _ in range(4)]
    first = _server(tmp_path / "a", certificates, mutual=False, keep=(-1,))  # its certificate: 127.0.0.1, localhost
    second = _server(tmp_path / "b", certificates, mutual=False, host="127.0.0.2", cert="shared", keep=(-1,))
    with first, second:
        first.wait_until_ready(120)
        second.wait_until_ready(120)
        a, b = first.config.grpc_url, second.config.grpc_url
        before = [_inferences(s) for s in (first, second)]
        with TumorClassifier(f"{a},{b}", ssl=True, root_certificates=ca) as client:
            assert client.tls_name == "127.0.0.1"  # in both certificates
            labels = [client.predict(images[k % 4]).label for k in range(16)]
        shares = [_inferences(s) - n for s, n in zip((first, second), before, strict=True)]
        with TumorClassifier(f"{b},{a}", ssl=True, root_certificates=ca, tls_server_name="localhost") as client:
            assert [client.predict(image).label for image in images] == labels[:4]
        with pytest.raises(ServerUnavailableError) as wrong_name:  # 127.0.0.2 is not in the first's certificate
            TumorClassifier(f"{b},{a}", ssl=True, root_certificates=ca, timeout=3, retries=0)
        with pytest.raises(ServerUnavailableError) as wrong_ca:
            TumorClassifier(f"{a},{b}", ssl=True, root_certificates=str(certificates / "other-ca.pem"), timeout=3)
        with pytest.raises(ServerUnavailableError) as plaintext:
            TumorClassifier(f"{a},{b}", timeout=3, retries=0)
    with capsys.disabled():
        print(f"\nTLS to a list of two servers: shares {shares}; a certificate without the name: {wrong_name.value}")
    assert min(shares) > 0 and sum(shares) == 16, shares
    for raised in (wrong_name, wrong_ca, plaintext):
        assert "\n" not in str(raised.value) and "reading the metadata" in str(raised.value)
    assert f"{a} (of " in str(wrong_name.value) and "does not carry the name" in str(wrong_name.value)
