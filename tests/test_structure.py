"""The project's structure: the client SDK is a leaf, packages import only downwards, committed files are what
the code renders, and every command is found by the one ``braintumor`` entry point."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from braintumor.cli import COMMANDS, Command, build_parser, load
from braintumor.config import DEFAULT_MODEL_REPOSITORY, IMAGE_SIZE, MODEL_NAME, PROJECT_ROOT
from braintumor.model_repository import CONFIG_FILE, CPU_CONFIG_NAME, SERVED_VERSIONS, read_preprocessing

#: The packages, lowest first: a package may import only from itself and the ones before it.
LAYERS = {"braintumor": "client", "braintumor_serving": "serving", "braintumor_training": "training"}
HEAVY = ("tensorflow", "keras", "braintumor_training", "braintumor_serving")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _package_graph() -> dict[str, set[str]]:
    """Which of the project's packages each package imports (leaving out itself)."""
    graph: dict[str, set[str]] = {}
    for package, folder in LAYERS.items():
        imported = set()
        for path in (PROJECT_ROOT / folder / package).rglob("*.py"):
            imported |= {name.split(".")[0] for name in _imports(path)} & set(LAYERS)
        graph[package] = imported - {package}
    return graph


def test_packages_import_only_lower_packages_so_there_is_no_loop():
    graph = _package_graph()
    order = list(LAYERS)
    upward = [(a, b) for a, targets in graph.items() for b in targets if order.index(b) > order.index(a)]
    assert not upward, f"imports from a lower package to a higher one: {upward}"
    assert graph["braintumor"] == set(), "the client SDK must import neither braintumor_training nor braintumor_serving"
    assert graph["braintumor_training"] >= {"braintumor"}  # the parse finds real imports


def test_the_import_parse_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from braintumor_training.audit import x\n    import braintumor_serving.triton\n")
    assert _imports(module) == {"braintumor_training.audit", "braintumor_serving.triton"}


@pytest.mark.parametrize(
    "code",
    [
        "import braintumor",
        "import braintumor.classifier",
        "import braintumor.aio",
        "from braintumor.cli import main\ntry:\n    main(['predict', '--help'])\nexcept SystemExit:\n    pass",
        "from braintumor.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    ],
    ids=["braintumor", "classifier", "aio", "predict-help", "help"],
)
def test_the_client_loads_no_tensorflow_training_or_serving_module(code):
    probe = f"{code}\nimport sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_public_api_is_exported():
    import braintumor

    for name in ("TumorClassifier", "AsyncTumorClassifier", "Prediction", "BrainTumorError", "DEFAULT_URL"):
        assert name in braintumor.__all__ and hasattr(braintumor, name)
    assert all(hasattr(braintumor, name) for name in braintumor.__all__)


def test_each_package_defines_its_commands_in_the_order_of_the_help():
    owners = {command.name: command.module.split(".")[0] for command in COMMANDS}
    assert owners == {
        **dict.fromkeys(("audit", "train", "soup", "evaluate", "export", "robustness"), "braintumor_training"),
        **dict.fromkeys(("serve", "bench"), "braintumor_serving"),
        **dict.fromkeys(("predict", "app", "pacs"), "braintumor"),
    }
    for command in COMMANDS:
        parser = argparse.ArgumentParser(prog=f"braintumor {command.name}")
        load(command).define(command.name, parser)
        assert callable(parser.get_default("func")), command.name
    build_parser()  # all of them at once, as before


def test_a_command_whose_package_is_absent_names_its_extra():
    with pytest.raises(SystemExit, match=r"the lab command needs the train extra .*pip install -e '\.\[train\]'"):
        load(Command("lab", "h", "braintumor_absent_package.cli", "train"))
    with pytest.raises(ModuleNotFoundError):  # a client module is never missing: a real error, not an extra
        load(Command("lab", "h", "braintumor.absent_module"))


def test_committed_configurations_are_what_the_renderer_writes():
    from braintumor_serving.model_config import render_cpu_config, render_gpu_config

    model_dir = DEFAULT_MODEL_REPOSITORY / MODEL_NAME
    preprocessing = read_preprocessing(model_dir, IMAGE_SIZE)
    heatmap_size = IMAGE_SIZE // 32  # the last convolution's grid: MobileNetV3Small's total stride is 32
    common = {"served_versions": SERVED_VERSIONS, "preprocessing": preprocessing}
    gpu = render_gpu_config(MODEL_NAME, IMAGE_SIZE, heatmap_size, **common)
    cpu = render_cpu_config(MODEL_NAME, IMAGE_SIZE, heatmap_size, **common)
    assert (model_dir / CONFIG_FILE).read_text() == gpu
    assert (model_dir / "configs" / f"{CPU_CONFIG_NAME}.pbtxt").read_text() == cpu
    assert f'"preprocessing/{max(preprocessing)}"' in cpu  # every published version's preprocessing is there
