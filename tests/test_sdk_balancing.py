"""Client-side balancing in the SDK: a target naming several servers (``host:port,host:port``) or a DNS name
(``dns:///name:port``) spreads requests round-robin over the servers that are up, sync and async alike; bad
targets fail at connect time with one clear line. The slow test runs two real replicas (127.0.0.1 and
127.0.0.2), measures each one's share from Triton's own statistics, and kills one under load: a ledger of
every request, zero lost or wrong."""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest
from helpers import free_ports

from braintumor._core import BALANCED_SERVICE_CONFIG, parse_target
from braintumor.aio import AsyncTumorClassifier
from braintumor.classifier import TumorClassifier
from braintumor.config import IMAGE_SIZE, LABELS
from braintumor.errors import InvalidTargetError, ModelMismatchError, ServerUnavailableError

TWINS = {"sync": TumorClassifier, "async": AsyncTumorClassifier}
METADATA = {
    "name": "braintumor",
    "versions": ["1", "2"],
    "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, IMAGE_SIZE, IMAGE_SIZE, 3]}],
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(LABELS)]}],
}
CONFIG = {"config": {"max_batch_size": 32}}


def test_one_address_is_used_as_it_is():
    target = parse_target("127.0.0.1:8001")
    assert target.channel == "127.0.0.1:8001" and not target.balanced
    client = TumorClassifier("127.0.0.1:8001", check=False)
    assert client.target == target
    client.close()


@pytest.mark.parametrize(
    ("url", "channel", "servers"),
    [
        ("127.0.0.1:8001,127.0.0.2:8001", "ipv4:127.0.0.1:8001,127.0.0.2:8001", ("127.0.0.1:8001", "127.0.0.2:8001")),
        (" localhost:8001 , 127.0.0.2:9 ", "ipv4:127.0.0.1:8001,127.0.0.2:9", ("127.0.0.1:8001", "127.0.0.2:9")),
        ("127.0.0.1:8001,127.0.0.1:8001", "ipv4:127.0.0.1:8001", ("127.0.0.1:8001",)),
        ("[::1]:8001,[::1]:8002", "ipv6:[::1]:8001,[::1]:8002", ("[::1]:8001", "[::1]:8002")),
        ("dns:///localhost:8001", "dns:///localhost:8001", ()),
    ],
)
def test_several_servers_make_one_balanced_target(url, channel, servers):
    target = parse_target(url)
    assert (target.channel, target.servers) == (channel, servers)
    if target.dns:
        assert target.balanced and "127.0.0.1:8001" in target.addresses()
    assert '"round_robin"' in BALANCED_SERVICE_CONFIG


@pytest.mark.parametrize("kind", TWINS)
@pytest.mark.parametrize(
    ("url", "error", "message"),
    [
        ("", InvalidTargetError, "empty"),
        (",", InvalidTargetError, "is empty"),
        ("127.0.0.1:8001,", InvalidTargetError, "empty entry"),
        ("127.0.0.1,127.0.0.2:8001", InvalidTargetError, "not host:port"),
        ("127.0.0.1:8001,127.0.0.2:99999", InvalidTargetError, "not host:port"),
        ("127.0.0.1:8001,[::1]:8001", InvalidTargetError, "mixes IPv4 and IPv6"),
        ("dns://authority/name:8001", InvalidTargetError, "dns:///name:port"),
        ("nosuchhost.invalid:8001,127.0.0.1:8001", ServerUnavailableError, "cannot resolve 'nosuchhost.invalid'"),
    ],
)
def test_bad_targets_fail_at_once_with_one_line(kind, url, error, message):
    with pytest.raises(error, match=message) as raised:
        TWINS[kind](url, check=False)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("kind", TWINS)
def test_an_unresolvable_name_or_an_absent_server_fails_on_connect(kind):
    async def scenario(cls, url):
        client = cls(url, timeout=1.0, retries=0, check=False)
        try:
            await _done(client.connect())
        finally:
            await _done(client.close())

    with pytest.raises(ServerUnavailableError, match=r"cannot resolve 'nosuchhost\.invalid'"):
        asyncio.run(scenario(TWINS[kind], "dns:///nosuchhost.invalid:8001"))
    a, b = free_ports(2)
    with pytest.raises(ServerUnavailableError, match=f"127.0.0.1:{a} \\(of "):
        asyncio.run(scenario(TWINS[kind], f"127.0.0.1:{a},127.0.0.1:{b}"))


async def _done(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value


def _client() -> TumorClassifier:
    return TumorClassifier("127.0.0.1:1,127.0.0.2:1", check=False)


def test_servers_serving_different_models_are_refused():
    other = {**METADATA, "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 224, 224, 3]}]}
    client = _client()
    with pytest.raises(ModelMismatchError, match=re.escape("image_size is 160 at 127.0.0.1:1, 224 at 127.0.0.2:1")):
        client._connected_servers({"127.0.0.1:1": (METADATA, CONFIG), "127.0.0.2:1": (other, CONFIG)})
    broken = {**METADATA, "outputs": []}
    with pytest.raises(ModelMismatchError, match=r"^127.0.0.2:1 \(of .*no output named"):
        client._connected_servers({"127.0.0.1:1": (METADATA, CONFIG), "127.0.0.2:1": (broken, CONFIG)})
    with pytest.raises(ServerUnavailableError, match="no server"):
        client._connected_servers({})
    client.close()


def test_requests_go_to_the_latest_version_every_server_serves():
    client = _client()
    newer = {**METADATA, "versions": ["2", "3"]}
    served = client._connected_servers({"127.0.0.1:1": (newer, CONFIG), "127.0.0.2:1": (METADATA, CONFIG)})
    assert served.version == "2" and client.model is served
    with pytest.raises(ModelMismatchError, match="no version of braintumor in common"):
        client._connected_servers(
            {"127.0.0.1:1": ({**METADATA, "versions": ["3"]}, CONFIG), "127.0.0.2:1": (METADATA, CONFIG)}
        )
    client.close()


# -- two real replicas ----------------------------------------------------------------------------------
class Ledger:
    """Every request of the load: sent, and how it ended (answered right, wrong, errored), with its time."""

    def __init__(self, expected: np.ndarray) -> None:
        self.expected = expected
        self.sent = 0
        self.ended: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self, client: TumorClassifier, pixels: np.ndarray, seed: int) -> None:
        for k in itertools.count(seed):
            if self.stop.is_set():
                return
            k %= len(pixels)
            with self.lock:
                self.sent += 1
            try:
                prediction = client.predict_pixels(pixels[k : k + 1])[0]
                got = np.array([prediction.probabilities[label] for label in LABELS])
                outcome, error = ("answered" if np.abs(got - self.expected[k]).max() <= 1e-5 else "wrong"), ""
            except Exception as err:
                outcome, error = "errored", f"{type(err).__name__}: {str(err)[:120]}"
            with self.lock:
                self.ended.append((time.monotonic(), outcome, error))

    def counts(self) -> dict[str, int]:
        with self.lock:
            counts = Counter(outcome for _, outcome, _ in self.ended)
            return {"sent": self.sent, **counts, "lost": self.sent - len(self.ended)}

    def longest_gap(self, start: float, end: float) -> float:
        with self.lock:
            times = sorted(t for t, outcome, _ in self.ended if outcome == "answered" and start <= t <= end)
        return max(b - a for a, b in itertools.pairwise([start, *times, end]))


@pytest.mark.slow
def test_two_replicas_share_the_load_and_a_killed_one_is_skipped(tmp_path, capsys):
    pytest.importorskip("pytriton")
    from balancing import infer_direct, new_admin_key, start_replicas
    from helpers import copy_repository

    from braintumor.cli import main as cli
    from braintumor.config import MODEL_NAME
    from braintumor.model_repository import versions
    from braintumor.preprocessing import preprocess_batch
    from synthetic import random_slice

    repository = copy_repository(tmp_path / "model_repository")
    latest = versions(repository / MODEL_NAME)[-1]
    replicas = start_replicas(repository, tmp_path, new_admin_key())
    try:
        url = ",".join(f"{r.host}:{r.grpc_port}" for r in replicas)
        rng = np.random.default_rng(18)
        pixels = preprocess_batch([random_slice(rng, 224, k % 4) for k in range(6)])
        expected = infer_direct(replicas[0], pixels, latest)

        # async: 64 requests, 16 at a time, all right, on both replicas
        async def async_check() -> list[Any]:
            async with AsyncTumorClassifier(url) as client:
                limit = asyncio.Semaphore(16)

                async def one(k: int) -> Any:
                    async with limit:
                        return (await client.predict_pixels(pixels[k % 6 : k % 6 + 1]))[0]

                return await asyncio.gather(*(one(k) for k in range(64)))

        before = [r.inference_count() for r in replicas]
        answers = asyncio.run(async_check())
        async_shares = [r.inference_count() - b for r, b in zip(replicas, before, strict=True)]
        for k, prediction in enumerate(answers):
            got = np.array([prediction.probabilities[label] for label in LABELS])
            assert np.abs(got - expected[k % 6]).max() <= 1e-5

        # the command line, with the same list
        random_slice(rng, 224, 1).save(tmp_path / "scan.png")
        assert cli(["predict", "--url", url, "--json", str(tmp_path / "scan.png")]) == 0
        assert '"label"' in capsys.readouterr().out

        # sync: one client, 16 threads; shares from each replica's statistics
        client = TumorClassifier(url)
        assert client.model.version == str(latest)
        ledger = Ledger(expected)
        threads = [threading.Thread(target=ledger.run, args=(client, pixels, t), daemon=True) for t in range(16)]
        before = [r.inference_count() for r in replicas]
        for thread in threads:
            thread.start()
        time.sleep(5)
        shares = [r.inference_count() - b for r, b in zip(replicas, before, strict=True)]

        killed = time.monotonic()
        replicas[0].kill()
        time.sleep(4)
        ledger.stop.set()
        for thread in threads:
            thread.join(30)
        ended = time.monotonic()
        client.close()
    finally:
        for r in replicas:
            r.kill()
    counts = ledger.counts()
    gap = ledger.longest_gap(killed, ended)
    errors = sorted({error for _, outcome, error in ledger.ended if outcome == "errored"})[:3]
    fractions = [round(s / sum(shares), 3) for s in shares]
    with capsys.disabled():
        print(
            f"\nSDK balancing: async shares {async_shares}; sync shares {shares} ({fractions}); ledger {counts}; "
            f"longest gap after the kill {gap:.2f} s; errors {errors}"
        )
    assert min(async_shares) > 0
    assert all(0.4 <= f <= 0.6 for f in fractions), f"shares {shares}"
    assert counts["lost"] == 0 and counts.get("wrong", 0) == 0 and counts.get("errored", 0) == 0, counts
    assert gap < 2.0, "the survivor did not take the load within 2 s"
