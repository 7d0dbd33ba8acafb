"""Every shipped config starts and runs on a CPU on a small corpus (hardware and precision overridden, a local
model directory for the pretrained ones): a config written for a big corpus and a GPU fails nowhere else."""

import glob
import os
import subprocess

import pytest

from tests.support import ROOT
from tests.support.cli import cli, run_cli
from tests.support.models import bert_dir
from tests.support.runs import metric, state
from tests.support.text import sentences

CONFIGS = sorted(os.path.basename(p) for p in glob.glob(str(ROOT / "configs" / "*.yaml")))
ON_TOP = {"ddp-2gpu.yaml": ["bert-base-gpu.yaml"]}  # added to another config, as its comment says


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> str:
    """~60k tokens: a few batches of bert-base-gpu.yaml's 128 x 128 tokens."""
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("\n".join(sentences(9000)) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return bert_dir(tmp_path_factory.mktemp("model"))


def config_args(name, corpus, model_dir, root, steps=3) -> list[str]:
    args = ["fit"]
    for c in [*ON_TOP.get(name, []), name]:
        args += ["--config", str(ROOT / "configs" / c)]
    args += ["--data.train_files", corpus, "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root),
             "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--data.num_workers", "0"]
    text = "".join(open(ROOT / "configs" / c).read() for c in [*ON_TOP.get(name, []), name])
    if "model_name_or_path" in text:
        args += ["--model.model_name_or_path", model_dir]
    if "precision" in text and "accelerator: cpu" not in text:
        args += ["--trainer.precision", "32-true"]
    if "compile: true" in text:
        args += ["--model.compile", "false"]  # (inductor's CPU compile of the model alone takes minutes here)
    return args


# bert-base-gpu.yaml in the default suite (it once refused small corpora); the others with the slow tests
@pytest.mark.parametrize("name", [c if c == "bert-base-gpu.yaml" else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CONFIGS if "ddp" not in c])
def test_each_config_runs_three_steps_on_a_cpu(name, big_corpus, model_dir, tmp_path, capsys):
    code = run_cli(*config_args(name, big_corpus, model_dir, tmp_path))
    assert code == 0, capsys.readouterr().err[-3000:]
    assert state(tmp_path)["global_step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", [c for c in CONFIGS if "ddp" in c])
def test_each_multi_process_config_runs_three_steps_on_a_cpu(name, big_corpus, model_dir, tmp_path):
    done = subprocess.run(cli(*config_args(name, big_corpus, model_dir, tmp_path)), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr and state(tmp_path)["global_step"] == 3


def test_a_step_interval_longer_than_the_run_validates_every_epoch(corpus, tmp_path, capsys):
    # the tiny corpus gives 17 batches an epoch: bert-base-gpu.yaml's 2000-step interval validates at its end
    from tests.support.cli import fit_args

    code = run_cli(*fit_args(corpus, tmp_path, "--trainer.max_steps", "18", "--trainer.val_check_interval", "2000",
                             "--trainer.check_val_every_n_epoch", "null"))
    assert code == 0, capsys.readouterr().err[-3000:]
    assert sorted(metric(tmp_path, "val/loss")) == [16]
