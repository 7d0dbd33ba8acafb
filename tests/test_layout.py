"""The house's arrows point down: the core never imports the CLI or the server, the data path never the model."""

import json
import subprocess
import sys

import pytest

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
