"""The ``braintumor`` command line: one entry point over the commands of every package.

Each package owns its commands: the client SDK ``predict``, ``app`` and ``pacs``; :mod:`braintumor_training.cli`
``audit``, ``train``, ``evaluate``, ``export`` and ``robustness``; :mod:`braintumor_serving.cli` ``serve`` and
``bench``. :data:`COMMANDS` names, for each command, its one-line help and the module that defines it (a
``define(name, parser)`` function). Only the module of the command asked for is imported, so that the client
never imports the training or serving packages unless one of their commands runs; when that package is not
installed, the command says which extra to install.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

from braintumor.config import DEFAULT_URL

#: What ``braintumor --help`` says about itself.
DESCRIPTION = "The ``braintumor`` command line."


@dataclass(frozen=True)
class Command:
    """One ``braintumor`` command.

    Args:
        name: the command's name.
        help: its line in ``braintumor --help``.
        module: the module whose ``define(name, parser)`` adds its arguments and the function that runs it.
        extra: the extra whose package holds ``module`` (named when it cannot be imported); ``None`` for the
            client's own commands (``app`` and ``pacs`` name their extras when they run).
    """

    name: str
    help: str
    module: str
    extra: str | None = None


_TRAINING = "braintumor_training.cli"
_SERVING = "braintumor_serving.cli"
#: Every command, in the order ``braintumor --help`` lists them.
COMMANDS: tuple[Command, ...] = (
    Command(
        "audit",
        "audit a folder-per-class dataset (integrity, duplicates, leakage; sequences with --external)",
        _TRAINING,
        "train",
    ),
    Command("train", "audit, split and train MobileNetV3Small into a run folder", _TRAINING, "train"),
    Command(
        "soup",
        "average the weights of runs fine-tuned from the same weights into one run (a model soup)",
        _TRAINING,
        "train",
    ),
    Command(
        "evaluate",
        "evaluate a run (or, with --version, a published version) on its test sets, by subgroup",
        _TRAINING,
        "train",
    ),
    Command("export", "publish an evaluated run as the next model version", _TRAINING, "train"),
    Command("robustness", "accuracy of a published version under scanner and acquisition shifts", _TRAINING, "train"),
    Command("serve", "run the model repository on the embedded Triton server (CPU)", _SERVING, "serve"),
    Command("predict", "classify images, folders or globs with a running server", "braintumor.predict_cli"),
    Command("app", "the clinicians' web page (calls the Triton server through the SDK)", __name__),
    Command(
        "bench",
        "side by side: in-process ONNX Runtime, Triton (perf_analyzer), preprocessing, FMA peak, memory",
        _SERVING,
        "serve",
    ),
    Command("pacs", "follow an Orthanc PACS: classify each stable MR series, write SR and overlay back", __name__),
)


def _cmd_app(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from braintumor.webapp import create_app
    except ImportError as err:
        sys.exit(f"braintumor: the web app needs the app extra ({err}); install it with: pip install -e '.[app]'")
    print(f"braintumor app on http://{args.host}:{args.port}/ (model server {args.url})", flush=True)
    uvicorn.run(create_app(args.url, args.model_version), host=args.host, port=args.port, log_level="warning")
    return 0


def _cmd_pacs(args: argparse.Namespace) -> int:
    try:
        import highdicom  # noqa: F401

        from braintumor.pacs.command import run
    except ImportError as err:
        sys.exit(f"braintumor: the PACS worker needs the pacs extra ({err}); install it with: pip install -e '.[pacs]'")
    return run(args)


def define(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the arguments of the client command ``app`` or ``pacs`` to its parser, and the function that runs it.

    Args:
        name: ``app`` or ``pacs``.
        parser: the command's parser (a subparser of ``braintumor``).
    """
    if name == "app":
        parser.add_argument("--url", default=DEFAULT_URL, help="Triton gRPC address")
        parser.add_argument("--model-version", default=None)
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8080)
        parser.set_defaults(func=_cmd_app)
    elif name == "pacs":
        from braintumor.pacs.command import add_arguments

        add_arguments(parser)
        parser.set_defaults(func=_cmd_pacs)
    else:
        raise ValueError(f"braintumor.cli defines app and pacs, not {name!r}")


def load(command: Command) -> ModuleType:
    """The module that defines ``command``; exits with the extra to install when its package is absent.

    Args:
        command: one of :data:`COMMANDS`.
    """
    try:
        return importlib.import_module(command.module)
    except ModuleNotFoundError as err:
        package = command.module.split(".")[0]
        if command.extra is None or err.name is None or err.name.split(".")[0] != package:
            raise
        sys.exit(
            f"braintumor: the {command.name} command needs the {command.extra} extra ({err}); install it with: "
            f"pip install -e '.[{command.extra}]'"
        )


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``braintumor`` command.

    Args:
        only: define the arguments of this command alone (``""``: of none, for the top-level help), importing
            only its module; ``None`` defines every command's (imports every package's command module).
    """
    parser = argparse.ArgumentParser(prog="braintumor", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help)
        if only is None or only == command.name:
            load(command).define(command.name, p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``braintumor`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    names = {command.name for command in COMMANDS}
    args = build_parser(only=argv[0] if argv and argv[0] in names else "").parse_args(argv)
    args.command_line = "braintumor " + shlex.join(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
