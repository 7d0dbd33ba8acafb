"""Many processes, many nodes (simulated on this machine with gloo): correct by construction.

- two nodes with node-local caches train with one vocabulary;
- a NaN on one process stops every process (exit 3) within seconds, no collective timeout;
- interrupt + resume under DDP is exact, with a dropout stream of its own on each process;
- too little data for the number of processes is refused before training.
"""

import glob
import hashlib
import signal
import subprocess
import time

import pytest
import torch

from tests.support.cli import cli, fit_args, two_nodes
from tests.support.runs import assert_resumed_at, metric
from tests.support.text import sentences

pytestmark = pytest.mark.slow


def weights(root):
    return torch.load(f"{root}/checkpoints/last.ckpt", weights_only=True)


def test_two_nodes_with_node_local_caches_train_one_vocabulary(corpus, tmp_path):
    outs = two_nodes(tmp_path, lambda node: fit_args(corpus, tmp_path / f"run{node}", "--trainer.max_steps", "4",
                                                     "--trainer.val_check_interval", "2"))
    vocabs = []
    for node in (0, 1):
        files = glob.glob(f"{tmp_path}/cache{node}/tokenizers/*/tokenizer.json")
        assert len(files) == 1, files  # each node has the vocabulary locally (it was given, not trained twice)
        vocabs.append(hashlib.sha256(open(files[0], "rb").read()).hexdigest())
    assert vocabs[0] == vocabs[1]
    assert "2 processes (2 nodes x 1 device)" in outs[0]  # not "cpu x1"


def test_nan_on_one_of_two_processes_stops_both_with_exit_3(corpus, tmp_path):
    result = subprocess.run(
        cli(*fit_args(corpus, tmp_path / "nan", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                      "--trainer.max_steps", "20", "--trainer.val_check_interval", "4",
                      "--trainer.callbacks+=tests.support.callbacks.NanAt", "--trainer.callbacks.step", "5",
                      "--trainer.callbacks.rank", "1")),
        capture_output=True, text=True, timeout=600,  # far below a collective's timeout (30 min): no hang
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert "the loss became nan at step 5" in result.stderr


def test_ddp_interrupt_then_resume_is_exact_with_a_dropout_stream_per_process(corpus, tmp_path):
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.val_check_interval", "4",
           "--trainer.max_steps", "16"]
    straight = tmp_path / "straight"
    done = subprocess.run(cli(*fit_args(corpus, straight, *ddp)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "int"
    proc = subprocess.Popen(cli(*fit_args(corpus, root, *ddp)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(metric(root, "train/loss")) < 6 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    ckpt = weights(root)
    assert 0 < ckpt["global_step"] < 16
    rng = ckpt["mlm_lightning"]["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # each process its own stream
    resumed = subprocess.run(cli(*fit_args(corpus, root, *ddp, "--ckpt_path", "last")), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_at(root, ckpt["global_step"])
    a, b = weights(straight)["state_dict"], weights(root)["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_too_little_data_for_the_processes_is_refused_before_training(write, tmp_path):
    small = write("small.txt", sentences(60))  # 1 training batch: not one for each of 2 processes
    result = subprocess.run(
        cli(*fit_args(small, tmp_path / "small", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                      "--data.batch_size", "16", "--data.val_fraction", "0.2", "--trainer.max_steps", "4")),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("mlm-lightning: error")]
    assert lines and "processes" in lines[0] and "batch" in lines[0]


def test_tokenizing_longer_than_the_process_group_timeout(corpus, tmp_path):
    """Rank 0 tokenizes for longer than the collective timeout (20 s here, 30 min by default): the waiting process
    checks in every few seconds instead of sitting in one gather until it times out."""
    result = subprocess.run(
        cli(*fit_args(corpus, tmp_path / "slow", "--trainer.devices", "2",
                      "--trainer.strategy", "lightning.pytorch.strategies.DDPStrategy",
                      "--trainer.strategy.timeout", "0:00:20", "--trainer.max_steps", "2",
                      "--trainer.val_check_interval", "2", "--data.cache_dir", str(tmp_path / "cache"),
                      "--trainer.callbacks+=tests.support.callbacks.SlowTokenization",
                      "--trainer.callbacks.seconds", "30")),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(tmp_path / "slow" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
