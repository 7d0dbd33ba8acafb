"""The house's arrows point down: the core never imports the CLI or the server, the data path never the model."""

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


@pytest.mark.parametrize("package", ["data", "model", "training"])
def test_the_core_never_imports_the_cli_or_the_server(package):
    modules = imported_by(package)
    assert any(m.startswith(f"mlm_lightning.{package}.") for m in modules)  # the probe really imported them
    upward = {m for m in modules if m.startswith(("mlm_lightning.cli", "mlm_lightning.serve"))}
    assert not upward
    assert not {m for m in modules if m.split(".")[0] in ("fastapi", "uvicorn", "starlette")}


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
