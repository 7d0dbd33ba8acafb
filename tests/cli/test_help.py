"""`--help` (short, grouped; `--help all`), the option check before the heavy imports, and "did you mean"."""

import json
import os
import subprocess
import sys

import pytest

from mlm_lightning.cli import options
from mlm_lightning.cli.main import LIGHTNING_COMMANDS, build_parser
from tests.support import ROOT
from tests.support.cli import error_line, run_cli


@pytest.fixture(scope="module")
def specs():
    return {c: options.spec_of(build_parser(c)) for c in LIGHTNING_COMMANDS}


@pytest.mark.parametrize("command", ["fit", "predict"])
def test_short_help_shows_the_projects_options_grouped_then_the_common_trainer_options(command, capsys):
    assert run_cli(command, "--help") == 0
    short = capsys.readouterr().out
    assert run_cli(command, "--help", "all") == 0
    full = capsys.readouterr().out
    assert len(short.splitlines()) < 0.6 * len(full.splitlines())
    order = [short.index(f"  --{o}") for o in ("model.learning_rate", "data.train_files", "checkpoint.dirpath",
                                                "trainer.max_steps")]
    assert order == sorted(order)  # the model's, the data's, the checkpoints', then the Trainer's
    shown = {line.split()[0] for line in short.splitlines() if line.startswith("  --trainer.")}
    assert shown == {f"--trainer.{o}" for o in options.TRAINER_OPTIONS}
    assert f"mlm-lightning {command} --help all" in short


@pytest.mark.parametrize("form", [["--help", "all"], ["--help=all"]])
def test_help_all_prints_every_option(form, capsys):
    assert run_cli("fit", *form) == 0
    full = capsys.readouterr().out
    parser = build_parser("fit")
    names = [a.option_strings[-1] for a in parser._actions if a.option_strings and a.help != "==SUPPRESS=="]
    assert len(names) > 100
    assert [n for n in names if n not in full] == []


def test_every_option_of_every_command_passes_the_early_check(specs):
    for command, spec in specs.items():
        for name in spec["options"]:
            options.check([name, "1"], spec, command)
            options.check([f"{name}=1"], spec, command)
        # keys under a typed option (a class's init_args), and unique abbreviations, as the parser takes them
        options.check(["--trainer.logger.init_args.save_dir", "x", "--trainer.callbacks.step", "8",
                       "--data.vocab_si", "9", "--", "--not.an.option"], spec, command)


def test_what_the_early_check_refuses_the_parser_refuses_too(specs):
    from jsonargparse import ArgumentError

    parser = build_parser("fit")
    for bad in ("--data.trian_files", "--data.train_file", "--trainer.max_stesp", "--model.s"):
        with pytest.raises(options.UnknownOption):
            options.check([bad, "1"], specs["fit"], "fit")
        with pytest.raises(ArgumentError):
            parser.parse_args([bad, "1"])


@pytest.mark.parametrize("args, line", [
    (["fit", "--data.trian_files", "a.txt"], "unknown option --data.trian_files: did you mean --data.train_files?"),
    (["fit", "--data.train_file", "a.txt"], "ambiguous option --data.train_file: did you mean --data.train_files?"),
    (["validate", "--trainer.max_stesp=3"], "unknown option --trainer.max_stesp: did you mean --trainer.max_steps?"),
    (["fill-mask", "--mdoel", "m", "a [MASK]"], "unknown option --mdoel: did you mean --model?"),
    (["plot", "run", "--ot", "x.png"], "unknown option --ot: did you mean --out?"),
    (["export", "a.ckpt", "--export-dir", "d"], "unknown option --export-dir: did you mean --export_dir?"),
])
def test_a_bad_option_is_one_line_naming_the_closest(args, line, capsys):
    assert run_cli(*args) == 2
    assert error_line(capsys.readouterr().err) == f"mlm-lightning: error: {line}"


def _cli(tmp_path, code: str) -> dict:
    env = {**os.environ, "MLM_LIGHTNING_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    return json.loads(out.stderr.strip().splitlines()[-1])


MAIN = """
import json, sys
from mlm_lightning.cli.main import main
code = None
try:
    main({args!r})
except SystemExit as e:
    code = e.code
seen = {{"code": code, "lightning": "lightning.pytorch" in sys.modules, "torch": "torch" in sys.modules}}
print(json.dumps(seen), file=sys.stderr)
"""


@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_help_and_a_bad_option_need_neither_torch_nor_lightning_once_cached(tmp_path):
    first = _cli(tmp_path, MAIN.format(args=["fit", "--help"]))  # builds the cache: the real parser
    assert first == {"code": None, "lightning": True, "torch": True}
    assert os.listdir(tmp_path / "cli")
    assert _cli(tmp_path, MAIN.format(args=["fit", "--help"])) == {"code": None, "lightning": False, "torch": False}
    bad = _cli(tmp_path, MAIN.format(args=["fit", "--data.trian_files", "x"]))
    assert bad == {"code": 2, "lightning": False, "torch": False}


def test_a_cache_file_that_is_not_ours_is_ignored(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLM_LIGHTNING_CACHE", str(tmp_path))
    path = options._path("fit", options._key())
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump({"options": ["--only"], "typed": {}, "help": 3}, f)
    assert options.load("fit") is None
    assert run_cli("fit", "--help") == 0 and "--model.learning_rate" in capsys.readouterr().out
    assert options.load("fit")["options"] != ["--only"]  # replaced by the real parser's
