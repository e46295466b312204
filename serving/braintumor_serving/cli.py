"""The serving package's commands: ``braintumor serve`` and ``braintumor bench``.

The ``braintumor`` entry point (:mod:`braintumor.cli`) finds this module when a serving command is asked for,
and calls :func:`define` to add that command's arguments. This module imports only the standard library and
:mod:`braintumor` at import time, so that ``--help`` works without the ``serve`` extra; each command imports the
server and the benchmark when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from braintumor.config import DEFAULT_DATA_DIR, DEFAULT_MODEL_REPOSITORY

__all__ = ["COMMANDS", "define"]


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from braintumor_serving.triton import ServerConfig, restart_policy, serve
    except ImportError as err:
        sys.exit(f"braintumor: serving needs the serve extra ({err}); install it with: pip install -e '.[serve]'")
    try:
        policy = restart_policy(args.restart, args.restart_limit)
    except ValueError as err:
        print(f"braintumor serve: {err}", file=sys.stderr)
        return 2
    config = ServerConfig(
        repository=Path(args.repository),
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        model_config_name=args.model_config_name or None,
        log_file=Path(args.log_file) if args.log_file else None,
        extra_args=[a for a in args.triton_args if a != "--"],
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        tls_client_ca=Path(args.tls_client_ca) if args.tls_client_ca else None,
        drain_timeout=args.drain_timeout,
    )
    if args.admin_key_env:
        key = os.environ.get(args.admin_key_env, "")
        if not key:
            print(f"braintumor serve: ${args.admin_key_env} is empty or unset", file=sys.stderr)
            return 2
        config.admin_key = key
    if args.canary is not None or args.canary_share is not None:
        return _serve_canary(args, config, policy)
    if args.shadow is None:
        return serve(config, ready_timeout=args.ready_timeout, restart=policy)
    import tempfile

    from braintumor_serving.shadow import ShadowError, shadow_repository

    with tempfile.TemporaryDirectory(prefix="braintumor-shadow-") as folder:
        config.repository = Path(folder) / "model_repository"
        try:
            spec = shadow_repository(
                Path(args.repository), args.shadow, config.repository, config_name=args.model_config_name
            )
        except (ShadowError, OSError) as err:
            print(f"braintumor serve: {err}", file=sys.stderr)
            return 2
        print(
            f"Shadow: version {spec.primary} answers; {spec.candidate_model} (version {spec.candidate_version}) "
            "gets a copy of its requests; agreement on the metrics port (braintumor_shadow_*)",
            flush=True,
        )
        return serve(config, ready_timeout=args.ready_timeout, restart=policy)


def _serve_canary(args: argparse.Namespace, config: Any, policy: Any) -> int:
    """``serve --canary N --canary-share F``: the canary's runtime repository, then the server (one line and exit
    status 2 for what cannot be served)."""
    import tempfile

    from braintumor_serving.shadow import ShadowError, canary_repository, parse_share
    from braintumor_serving.triton import serve

    try:
        if args.shadow is not None:
            raise ShadowError("--canary and --shadow cannot be combined: shadow a version first, then canary it")
        if args.canary is None or args.canary_share is None:
            raise ShadowError("--canary N and --canary-share F go together (e.g. --canary 4 --canary-share 0.05)")
        share = parse_share(args.canary_share)
    except ShadowError as err:
        print(f"braintumor serve: {err}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="braintumor-canary-") as folder:
        config.repository = Path(folder) / "model_repository"
        try:
            spec = canary_repository(
                Path(args.repository), args.canary, config.repository, share, config_name=args.model_config_name
            )
        except (ShadowError, OSError) as err:
            print(f"braintumor serve: {err}", file=sys.stderr)
            return 2
        print(
            f"Canary: requests that name no version reach routing version {spec.router}, which has "
            f"{spec.candidate_model} (version {spec.candidate_version}) answer {spec.share:.1%} of them and "
            f"version {spec.primary} the rest; pinned versions answer for themselves; the output answered_by "
            "names the version that answered; counts on the metrics port (braintumor_canary_requests_total)",
            flush=True,
        )
        return serve(config, ready_timeout=args.ready_timeout, restart=policy)


def _bench_versions(args: argparse.Namespace, model_dir: Path, published: list[int], pixels: Any) -> int:
    import json

    from braintumor_serving.bench import bench_versions, format_versions

    missing = [v for v in args.versions if v not in published]
    if missing:
        print(f"braintumor bench: versions {missing} are not published in {model_dir}", file=sys.stderr)
        return 2
    models = {str(v): model_dir / str(v) / "model.onnx" for v in args.versions}
    print(f"Measuring versions {', '.join(models)} in-process, {args.seconds:.0f} s per point ...")
    results = bench_versions(models, pixels, args.seconds)
    table = format_versions(results)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "versions.json").write_text(json.dumps(results, indent=1))
    (out / "versions.txt").write_text(table + "\n")
    print(f"Wrote {out}/versions.json and versions.txt")
    return 0


def _bench_pixels(data_dir: Path, n: int = 64):
    import numpy as np

    from braintumor.config import IMAGE_SIZE, IMAGE_SUFFIXES
    from braintumor.preprocessing import preprocess_batch

    files = sorted(p for p in (data_dir / "Testing").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if files:
        print(f"Benchmark images: {min(n, len(files))} Testing images from {data_dir}")
        return preprocess_batch(files[:: max(1, len(files) // n)][:n])
    print(f"Benchmark images: random pixels ({data_dir} not found; content does not change the speed)")
    return np.random.default_rng(0).integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def _cmd_bench(args: argparse.Namespace) -> int:
    from braintumor.config import MODEL_NAME as NAME
    from braintumor.model_repository import versions

    repository = Path(args.repository)
    published = versions(repository / NAME)
    if not published:
        print(f"braintumor bench: no published version of {NAME} in {repository}", file=sys.stderr)
        return 2
    pixels = _bench_pixels(Path(args.data))
    if args.versions:
        return _bench_versions(args, repository / NAME, published, pixels)

    from braintumor_serving import side_by_side
    from braintumor_serving.bench import bench_client
    from braintumor_serving.perf_analyzer import PerfAnalyzerError, find
    from braintumor_serving.triton import ServeError, ServerConfig, TritonServer, free_ports, ready_models

    try:
        find()
    except PerfAnalyzerError as err:
        print(f"braintumor bench: {err}", file=sys.stderr)
        return 2
    http, grpc, metrics = free_ports(3)
    config = ServerConfig(repository=repository, http_port=http, grpc_port=grpc, metrics_port=metrics)
    try:
        with TritonServer(config) as server:
            server.wait_until_ready(180)
            served = [str(v) for v in ready_models(server.local_http_url, config.admin_key).get(NAME, [])]
            print(f"Embedded Triton ready on {config.grpc_url} (versions {', '.join(served)}); measuring ...")
            results = side_by_side.run(
                server, repository / NAME, served, pixels, seconds=args.seconds, rounds=args.rounds
            )
            if args.client:
                files = sorted(p for p in (Path(args.data) / "Testing").rglob("*.jpg"))
                if files:
                    results["client"] = bench_client(config.grpc_url, files)
    except (ServeError, PerfAnalyzerError) as err:
        print(f"braintumor bench: {err}", file=sys.stderr)
        return 2
    print(side_by_side.format_table(results))
    side_by_side.write(results, Path(args.out))
    print(f"Wrote {args.out}/bench.json, bench.txt and bench.png")
    return 0


def _rounds(text: str) -> int:
    """A number of rounds, 1 or more (an ``argparse`` type)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of rounds, 1 or more (got {text!r})")
    return int(text)


def _seconds(text: str) -> float:
    """A duration in seconds, 0 or more (an ``argparse`` type)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds, 0 or more (got {text!r})")
    return value


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", default=str(DEFAULT_MODEL_REPOSITORY))
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument(
        "--model-config-name", default="cpu", help="configs/<name>.pbtxt to serve ('' for config.pbtxt)"
    )
    parser.add_argument("--log-file", default=None, help="keep Triton's own log in this file")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate: serve gRPC over TLS")
    parser.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
    parser.add_argument("--tls-client-ca", default=None, help="PEM CA of client certificates: mutual TLS")
    parser.add_argument(
        "--admin-key-env",
        default=None,
        metavar="NAME",
        help="environment variable holding the admin key for the restricted APIs (default: a random key)",
    )
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for readiness")
    parser.add_argument(
        "--drain-timeout",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="on SIGTERM or Ctrl+C: readiness answers 503 and serve waits at most this long for the requests in "
        "flight to finish before it stops Triton (default 5; 0: stop at once)",
    )
    parser.add_argument(
        "--shadow",
        type=int,
        default=None,
        metavar="N",
        help="shadow rollout: serve version N as the model <name>_candidate, which gets a copy of the current "
        "version's requests; callers never see its answers (see README: Shadow rollout)",
    )
    parser.add_argument(
        "--canary",
        type=int,
        default=None,
        metavar="N",
        help="canary (with --canary-share; not with --shadow): serve version N as the model <name>_candidate, "
        "and have it answer a share of the requests that name no version (the current version answers the "
        "rest, and every request that pins a published version); the extra output answered_by names the "
        "version that answered; a failed candidate request is answered by the current version "
        "(see README: Shadow rollout, canary and promotion)",
    )
    parser.add_argument(
        "--canary-share",
        default=None,
        metavar="F",
        help="with --canary: the share of unversioned requests the candidate answers, 0 < F < 1 (e.g. 0.05)",
    )
    parser.add_argument(
        "--restart",
        default="no",
        metavar="POLICY",
        help="when tritonserver dies: 'no' (exit with status 1, the default; e.g. under Kubernetes) or "
        "'on-failure[:N]' (restart it with backoff, at most N times in a row, default 5)",
    )
    parser.add_argument(
        "--restart-limit",
        default=None,
        metavar="N",
        help="with --restart on-failure: at most N restarts in a row (0 or more)",
    )
    parser.add_argument(
        "triton_args", nargs=argparse.REMAINDER, help="after --: further tritonserver arguments (e.g. restricted APIs)"
    )
    parser.set_defaults(func=_cmd_serve)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", default=str(DEFAULT_MODEL_REPOSITORY))
    parser.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="images to send (Testing split)")
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="seconds per in-process point and per perf_analyzer window (3 each)"
    )
    parser.add_argument(
        "--rounds",
        type=_rounds,
        default=2,
        help="times each point is measured, one round after the other; the fastest round is kept",
    )
    parser.add_argument("--out", default="docs/benchmarks", help="folder for bench.json, bench.txt, bench.png")
    parser.add_argument(
        "--versions",
        type=int,
        nargs="+",
        default=None,
        help="instead: compare these published versions side by side, in-process (e.g. --versions 1 2)",
    )
    parser.add_argument(
        "--client",
        action="store_true",
        help="also measure the SDK's end-to-end throughput over the Testing images",
    )
    parser.set_defaults(func=_cmd_bench)


#: Each command's arguments (and the function that runs it), by name.
COMMANDS: dict[str, Callable[[argparse.ArgumentParser], None]] = {"serve": _serve_arguments, "bench": _bench_arguments}


def define(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the arguments of the serving command ``name`` to its parser, and the function that runs it.

    Args:
        name: one of :data:`COMMANDS`.
        parser: the command's parser (a subparser of ``braintumor``).
    """
    COMMANDS[name](parser)
