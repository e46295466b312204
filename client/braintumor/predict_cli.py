"""``braintumor predict PATH...``: classify files, folders and globs against a running server."""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from braintumor.classifier import TumorClassifier
from braintumor.config import DEFAULT_URL, IMAGE_SUFFIXES, LABELS, MODEL_NAME
from braintumor.errors import BrainTumorError
from braintumor.explain import overlay
from braintumor.preprocessing import load_image

#: Suffixes picked up when a folder is given (DICOM files too).
FOLDER_SUFFIXES = IMAGE_SUFFIXES | {".dcm", ".dicom"}


def expand_paths(arguments: Iterable[str]) -> list[tuple[str, Path | None]]:
    """Expand files, folders (recursively) and globs, in order; a pattern matching nothing yields ``None``."""
    found: list[tuple[str, Path | None]] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES)
            found += [(str(p), p) for p in files] or [(argument, None)]
        elif path.exists():
            found.append((argument, path))
        elif glob.has_magic(argument):
            matches = sorted(Path(m) for m in glob.glob(argument, recursive=True) if Path(m).is_file())
            found += [(str(m), m) for m in matches] or [(argument, None)]
        else:
            found.append((argument, None))
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``predict`` subcommand's options."""
    parser.add_argument("paths", nargs="+", help="image or DICOM files, folders, or glob patterns")
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help=f"Triton gRPC address (default {DEFAULT_URL}); several, host:port,host:port, or dns:///name:port "
        "spread requests round-robin over the servers that are up",
    )
    parser.add_argument("--model", default=MODEL_NAME)
    parser.add_argument("--model-version", default=None, help="pin a version (default: the latest served)")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline of each call, in seconds")
    parser.add_argument("--frame", type=int, default=None, help="frame of multi-frame files")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    parser.add_argument(
        "--explain",
        metavar="DIR",
        default=None,
        help="write a Grad-CAM overlay of each image into DIR (<name>.gradcam.png)",
    )
    parser.add_argument("--workers", type=int, default=8, help="requests in flight")
    parser.add_argument("--ssl", action="store_true", help="use TLS")
    parser.add_argument("--root-certificates", default=None, help="PEM file of the server's CA")
    parser.add_argument("--client-key", default=None, help="PEM client key (mutual TLS)")
    parser.add_argument("--client-cert", default=None, help="PEM client certificate (mutual TLS)")
    parser.add_argument(
        "--tls-server-name",
        default=None,
        metavar="NAME",
        help="the name every server's certificate must carry (default: the host of --url; for a list, its first)",
    )


def define(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the ``predict`` command's arguments to its parser, and :func:`run` (for :mod:`braintumor.cli`).

    Args:
        name: ``predict``.
        parser: the command's parser.
    """
    add_arguments(parser)
    parser.set_defaults(func=run)


#: Files classified per ``predict_batch`` call: bounds the decoded images held at once (for ``--explain``).
CHUNK = 64


def _decode(item: tuple[str, Path | None], frame: int | None) -> Image.Image | dict[str, Any]:
    """The file decoded once (the overlay of ``--explain`` draws on the same image), or its error row."""
    path, file = item
    if file is None:
        return {"path": path, "error": "no such file, or no image matched"}
    try:
        return load_image(file, frame)
    except BrainTumorError as err:
        return {"path": path, "error": str(err), "status": err.status}


def _classify_chunk(
    classifier: TumorClassifier,
    items: list[tuple[str, Path | None]],
    args: argparse.Namespace,
    explain_dir: Path | None,
    pool: ThreadPoolExecutor,
) -> list[dict[str, Any]]:
    rows: list[Any] = list(pool.map(lambda item: _decode(item, args.frame), items))
    images = [(n, image) for n, image in enumerate(rows) if isinstance(image, Image.Image)]
    predictions = classifier.predict_batch(
        [image for _, image in images], workers=args.workers, explain=explain_dir is not None, return_errors=True
    )
    for (n, image), prediction in zip(images, predictions, strict=True):
        path, file = items[n]
        if isinstance(prediction, BrainTumorError):
            rows[n] = {"path": path, "error": str(prediction), "status": prediction.status}
            continue
        rows[n] = {"path": path, **prediction.to_dict()}
        if explain_dir is not None and file is not None:
            target = explain_dir / f"{file.stem}.gradcam.png"
            preprocessing = classifier.model.preprocessing_of(prediction.model_version)
            overlay(image, prediction, preprocessing=preprocessing).save(target)
            rows[n]["explanation"] = str(target)
    return rows


def run(args: argparse.Namespace) -> int:
    """Classify every path; prints a table or JSON lines. Exit status 1 when any file failed.

    Args:
        args: the parsed arguments (:func:`add_arguments`).
    """
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    err_console = Console(stderr=True)
    items = expand_paths(args.paths)
    try:
        classifier = TumorClassifier(
            args.url,
            args.model,
            args.model_version,
            timeout=args.timeout,
            ssl=args.ssl,
            root_certificates=args.root_certificates,
            private_key=args.client_key,
            certificate_chain=args.client_cert,
            tls_server_name=args.tls_server_name,
        )
    except BrainTumorError as err:
        print(f"braintumor predict: {err}", file=sys.stderr)
        return 2
    with classifier, ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        explain_dir = Path(args.explain) if args.explain else None
        if explain_dir is not None:
            explain_dir.mkdir(parents=True, exist_ok=True)
        show = len(items) > 1 and err_console.is_terminal
        results = []
        with Progress(console=err_console, disable=not show, transient=True) as progress:
            task = progress.add_task("classifying", total=len(items))
            for start in range(0, len(items), CHUNK):
                chunk = items[start : start + CHUNK]
                results += _classify_chunk(classifier, chunk, args, explain_dir, pool)
                progress.advance(task, len(chunk))

    if args.json:
        for result in results:
            print(json.dumps(result), flush=True)
    else:
        table = Table(title=None)
        table.add_column("path", overflow="fold")
        table.add_column("label", overflow="fold")
        for column in ("tumor prob.", *LABELS, "version"):
            table.add_column(column, justify="right", no_wrap=True)
        for r in results:
            if "error" in r:
                table.add_row(r["path"], f"[red]error: {r['error']}[/red]", *[""] * (len(LABELS) + 2))
            else:
                probs = [f"{r['probabilities'][label]:.3f}" for label in LABELS]
                table.add_row(r["path"], r["label"], f"{r['tumor_probability']:.3f}", *probs, r["model_version"])
        Console(width=max(140, Console().width)).print(table)
    failed = sum("error" in r for r in results)
    if failed:
        print(f"braintumor predict: {failed} of {len(results)} files failed", file=sys.stderr)
    return 1 if failed else 0
