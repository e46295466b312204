"""Helpers shared by the tests that start real servers."""

from __future__ import annotations

import re
import shutil
import socket
import urllib.request
from pathlib import Path

from braintumor.config import DEFAULT_MODEL_REPOSITORY, MODEL_NAME


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def copy_repository(destination: Path, extra_versions: int = 0) -> Path:
    """Copy the committed model repository; ``extra_versions`` more versions repeat the latest one."""
    shutil.copytree(DEFAULT_MODEL_REPOSITORY, destination)
    model_dir = destination / MODEL_NAME
    latest = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    for k in range(1, extra_versions + 1):
        shutil.copytree(model_dir / str(latest), model_dir / str(latest + k))
    return destination


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples (matching ``labels``) read from ``url``."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total
