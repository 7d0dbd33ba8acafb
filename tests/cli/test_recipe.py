"""The offline demo's recipe has one home, `mlm_lightning/configs/default.yaml`, and a bare `fit` runs it."""

import ast
import os
from importlib import resources

import yaml

from mlm_lightning.cli.defaults import DEMO_CONFIG, demo_recipe
from tests.support import ROOT
from tests.support.cli import run_cli

SECTIONS = ("trainer", "model", "data", "seed_everything")


def printed(capsys, *args) -> dict:
    assert run_cli("fit", *args, "--print_config") == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_a_bare_fit_resolves_to_the_shipped_config(capsys):
    bare = printed(capsys)
    shipped = printed(capsys, "--config", str(DEMO_CONFIG))
    assert {k: bare[k] for k in SECTIONS} == {k: shipped[k] for k in SECTIONS}
    assert bare["trainer"]["max_steps"] == demo_recipe()["trainer.max_steps"] and bare["trainer"]["max_epochs"] is None


def test_the_recipe_ships_in_the_package_and_configs_is_the_same_directory():
    assert resources.files("mlm_lightning").joinpath("configs", "default.yaml").is_file()
    assert os.path.samefile(ROOT / "configs" / "default.yaml", DEMO_CONFIG)
    with open(ROOT / "pyproject.toml", encoding="utf-8") as f:
        assert '"configs/*.yaml"' in f.read()


def _spelled(path) -> list[str]:
    """Places in a Python file that spell a recipe value next to its option's name: a dict entry or keyword
    argument (`"data.vocab_size": 4096`, `vocab_size=4096`), or a `DEMO_*` constant."""
    recipe = {k: v for k, v in demo_recipe().items() if k.split(".")[0] in ("model", "data")}
    recipe["trainer.max_steps"] = demo_recipe()["trainer.max_steps"]
    values = {k.split(".")[1]: v for k, v in recipe.items()}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        pairs = []
        if isinstance(node, ast.Dict):
            pairs = [(k.value, v) for k, v in zip(node.keys, node.values, strict=True) if isinstance(k, ast.Constant)]
        elif isinstance(node, ast.Call):
            pairs = [(kw.arg, kw.value) for kw in node.keywords if kw.arg]
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and "DEMO" in t.id for t in node.targets):
            pairs = [("DEMO", node.value)]
        for key, value in pairs:
            if not isinstance(value, ast.Constant) or not isinstance(key, str):
                continue
            name = key.split(".")[-1]
            if key == "DEMO" or (name in values and value.value == values[name] and type(value.value) is
                                 type(values[name]) and value.value not in (0, 0.0, 1, 2, True, False, None)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {key} = {value.value!r}")
    return found


def test_no_python_file_spells_the_recipe_outside_its_config():
    # (scripts/sweep_default.py spells its own variations of the recipe on purpose: it chose it; the two benchmark
    # scripts measure a fixed model shape of their own)
    own = ("sweep_default.py", "benchmark_gpu.py", "bench_threads.py")
    files = [p for p in (ROOT / "mlm_lightning").rglob("*.py")]
    files += [p for p in (ROOT / "scripts").glob("*.py") if p.name not in own]
    assert [line for p in files for line in _spelled(p)] == []


def test_the_guard_finds_a_spelled_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr("tests.cli.test_recipe.ROOT", tmp_path)
    spelled = tmp_path / "x.py"
    spelled.write_text('R = {"data.vocab_size": 4096}\nDEMO_LENGTH = 64\nf(learning_rate=0.003)\n')
    assert len(_spelled(spelled)) == 3
