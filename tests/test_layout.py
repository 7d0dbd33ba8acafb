"""The house's arrows point down: the core never imports the CLI or the server, the data path never the model.

The layers, top to bottom (`LAYERS`); a module imports its own layer and the layers below it, never one above:

    mlm_lightning/__init__.py   the package's two names (`MLMModule`, `MLMDataModule`), re-exported
    cli/                        the commands: every entry point of the command line
    serve/, evaluate/           the server and the evaluation suite: run by the CLI by name, built on the model
    model/ + export.py          the LightningModule, families, checkpoints, fill-mask, score; the export
      + card.py, onnx_export.py   (a Hugging Face directory, its model card, its ONNX graph)
    training/                   what a fit adds to Lightning: callbacks, checkpoint policy, schedules, stopping
    data/                       corpus -> tokenizer -> cache -> masking -> batches
    errors, files, arguments, hub, metrics   the shared base

Why this order and not another: `MLMModule` brings a fit's callbacks and schedules itself (`configure_callbacks`,
`run_schedule`), so that a plain `lightning.Trainer` gets them: the module sits above `training/`. The callbacks
in turn ask the module they are handed for what they need of the network (`pl_module.train_flops`,
`pl_module.layer_classes`), so `training/` knows no model internals. `export.py` (with the card and ONNX graph it
writes) is the writing half of the files whose reading half is `model/checkpoint.py`: it reads a `.ckpt` and
builds the ONNX graph with `model/arch.py`, and `MLMModule.export` writes through it, so it belongs to the model's
layer while keeping its short public path `mlm_lightning.export`. Within a layer the module-level
graph has no cycle (`test_the_import_graph_has_no_cycle`). A new subpackage or top-level module gets its layer
here, or the test names it.
"""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlm_lightning

PACKAGE = Path(mlm_lightning.__file__).parent

PROBE = """
import json, pkgutil, importlib, sys
import mlm_lightning.{package} as package
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("mlm_lightning") or m.split(".")[0] in
                        ("fastapi", "uvicorn", "starlette", "jsonargparse"))))
"""


def imported_by(package: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(package=package)], capture_output=True, text=True,
                         check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
@pytest.mark.parametrize("package", ["data", "model", "training"])
def test_the_core_never_imports_the_cli_or_the_server(package):
    modules = imported_by(package)
    assert any(m.startswith(f"mlm_lightning.{package}.") for m in modules)  # the probe really imported them
    upward = {m for m in modules if m.startswith(("mlm_lightning.cli", "mlm_lightning.serve"))}
    assert not upward
    assert not {m for m in modules if m.split(".")[0] in ("fastapi", "uvicorn", "starlette")}


@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_the_data_path_never_imports_the_model():
    modules = imported_by("data")
    assert "mlm_lightning.data.module" in modules
    assert not {m for m in modules if m.startswith(("mlm_lightning.model", "mlm_lightning.training"))}


def test_the_help_imports_no_command():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "mlm_lightning.cli", "--help"],
                         capture_output=True, text=True, check=True)
    assert "fill-mask" in out.stdout and "serve" in out.stdout  # every command's line, from its docstring
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "lightning", "transformers", "fastapi", "mlm_lightning.serve.app"}


def test_the_package_exports_keep_working():
    from mlm_lightning import MLMDataModule, MLMModule
    from mlm_lightning.data import MLMDataModule as DataModule
    from mlm_lightning.model import MLMModule as Module

    assert MLMModule is Module and MLMDataModule is DataModule


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports, at module level or inside a function
    (a function-level import runs too, only later). `from pkg import name` is an edge to the module `pkg.name`
    where there is one, else to `pkg`; relative imports are resolved against the importing module's package."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    if target in modules:
                        graph[name].add(target)
                    elif source in modules:
                        graph[name].add(source)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (a depth-first search for an edge back to the path)."""
    done, path = set(), []

    def visit(node):
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        done.add(path.pop())
        return None

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "mlm_lightning.files" in graph["mlm_lightning.training.checkpointing"]
    assert "mlm_lightning.data.corpus" in graph["mlm_lightning.data.cache"]  # `from pkg import module` resolved
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_and_a_relative_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


WARNINGS_PROBE = """
import ast, importlib, pathlib, pkgutil, sys, warnings
import mlm_lightning
# the libraries the package imports at module level set their own filters: import them first
for path in pathlib.Path(mlm_lightning.__file__).parent.rglob("*.py"):
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for name in names:
            if name.split(".")[0] != "mlm_lightning":
                try:
                    importlib.import_module(name)
                except ImportError:
                    pass
before = list(warnings.filters)
names = [info.name for info in pkgutil.walk_packages(mlm_lightning.__path__, "mlm_lightning.")
         if not info.name.endswith(".__main__")]  # (running a command is not importing it)
for name in names:
    importlib.import_module(name)
added = [f for f in warnings.filters if f not in before]
print(len(names), added)
"""


@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_importing_the_package_leaves_the_warning_filters_alone():
    out = subprocess.run([sys.executable, "-c", WARNINGS_PROBE], capture_output=True, text=True, check=True)
    count, added = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(count) > 30  # every module was imported
    assert added == "[]", f"importing the package added warning filters: {added}"


def test_metric_names_are_spelled_only_in_their_home():
    name = re.compile(r"(train|val|test|perf)/\w+/?")
    spelled = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "metrics.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and name.fullmatch(node.value):
                spelled.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}")
    assert not spelled, "metric names outside mlm_lightning/metrics.py:\n" + "\n".join(spelled)


LAYERS = [  # top to bottom: (layer, the subpackages and top-level modules of `mlm_lightning` in it)
    ("package", [""]),  # mlm_lightning/__init__.py
    ("cli", ["cli"]),
    ("serve, evaluate", ["serve", "evaluate"]),
    ("model", ["model", "export", "card", "onnx_export"]),
    ("training", ["training"]),
    ("data", ["data"]),
    ("base", ["errors", "files", "arguments", "hub", "metrics"]),
]


def layer_of(module: str, layers=LAYERS) -> int | None:
    """The index in `layers` of a dotted module name (0 is the top), from its first name under the package."""
    first = module.split(".")[1] if "." in module else ""
    return next((i for i, (_, names) in enumerate(layers) if first in names), None)


def upward_edges(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """Every import edge of `graph` that points to a higher layer, as "a -> b (layer -> layer)"."""
    out = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            low, high = layer_of(source, layers), layer_of(target, layers)
            if low is not None and high is not None and high < low:
                out.append(f"{source} -> {target} ({layers[low][0]} -> {layers[high][0]})")
    return out


def test_every_import_points_to_the_same_or_a_lower_layer():
    graph = import_graph()
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, "modules in no layer (give each a place in LAYERS): " + ", ".join(unplaced)
    upward = upward_edges(graph)
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_the_layer_check_names_an_upward_edge(tmp_path):
    pkg = tmp_path / "pkg"
    for sub in ("high", "low"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "base.py").write_text("")
    (pkg / "high" / "a.py").write_text("from pkg.low import b\nimport pkg.base\n")
    (pkg / "low" / "b.py").write_text("def f():\n    from pkg.high.a import g\n")
    layers = [("top", [""]), ("high", ["high"]), ("low", ["low"]), ("base", ["base"])]
    assert upward_edges(import_graph(pkg), layers) == ["pkg.low.b -> pkg.high.a (low -> high)"]
