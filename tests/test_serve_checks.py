"""The serving checks that run before any server starts (fast): repository, Python environment, ports."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

pytest.importorskip("pytriton")
from braintumor_serving.triton import ServeError, ServerConfig, TritonServer, check_python_environment


def test_invalid_repository_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServeError, match="holds no model"):
        TritonServer(ServerConfig(repository=tmp_path / "empty")).start()
    (tmp_path / "bad" / "m" / "1").mkdir(parents=True)
    with pytest.raises(ServeError, match="no configuration"):
        TritonServer(ServerConfig(repository=tmp_path / "bad")).start()


def test_numpy_2_in_the_servers_environment_is_refused(tmp_path):
    base = subprocess.run(
        [sys.executable, "-c", "import sys; print(sys.base_prefix)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    venv = tmp_path / "np2"
    subprocess.run(
        [f"{base}/bin/python3", "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True
    )
    found = subprocess.run(
        [str(venv / "bin" / "python3"), "-c", "import numpy; print(numpy.__version__)"], capture_output=True, text=True
    )
    if found.returncode != 0 or not found.stdout.startswith("2."):
        pytest.skip(f"the base Python has no numpy 2 to test with ({found.stdout.strip() or found.stderr[-200:]})")
    with pytest.raises(ServeError, match=r"numpy 2\..*numpy<2"):
        check_python_environment(venv / "bin")


def test_port_check_detects_a_listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        from braintumor_serving.triton import check_port_free

        with pytest.raises(ServeError, match="already in use"):
            check_port_free("127.0.0.1", sock.getsockname()[1], "HTTP")
