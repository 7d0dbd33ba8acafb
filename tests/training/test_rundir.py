"""A run directory is owned by one fit at a time (issue 31): the lock, its holder's name, a dead holder, DDP ranks."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from mlm_lightning.errors import MLMError
from mlm_lightning.training import rundir
from mlm_lightning.training.rundir import LOCK_NAME, own_run_dir, release_run_dirs
from tests.support import ROOT
from tests.support.cli import cli, error_line, fit_args, run_cli

HOLD = "import sys; from mlm_lightning.training.rundir import own_run_dir; own_run_dir(sys.argv[1]); print('held', flush=True); sys.stdin.read()"  # noqa: E501


@pytest.fixture
def holder(tmp_path):
    """Another process holding `tmp_path/run`'s lock (as a running fit does), until the test ends."""
    root = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    yield root, proc
    proc.kill()
    proc.wait()


@pytest.fixture(autouse=True)
def _release():
    yield
    release_run_dirs()


def test_a_second_fit_into_a_held_run_dir_is_refused_naming_the_holder(holder, corpus, capsys):
    root, proc = holder
    assert run_cli(*fit_args(corpus, root, "--trainer.max_steps", "2")) == 2
    line = error_line(capsys.readouterr().err)
    assert f"is in use by another fit (pid {proc.pid} on host {socket.gethostname()})" in line
    assert os.listdir(root) == [LOCK_NAME]  # refused before it wrote anything there (logs, config.yaml)


def test_a_lock_left_by_a_dead_fit_blocks_nothing(holder):
    root, proc = holder
    with pytest.raises(MLMError, match=f"pid {proc.pid}"):
        own_run_dir(str(root))
    proc.send_signal(signal.SIGKILL)  # dies holding it: the OS releases the lock, the file stays
    proc.wait()
    assert json.loads((root / LOCK_NAME).read_text())["pid"] == proc.pid
    own_run_dir(str(root))
    assert json.loads((root / LOCK_NAME).read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}


def test_the_other_ranks_of_a_run_share_rank_0s_lock(holder):
    root, _ = holder
    own_run_dir(str(root), global_rank=1)  # (rank 0 holds it for the whole run)
    with pytest.raises(MLMError, match="in use by another fit"):
        own_run_dir(str(root), global_rank=0)


def test_a_file_of_that_name_that_no_fit_wrote_is_left_alone(tmp_path):
    (tmp_path / LOCK_NAME).write_text("my notes")
    with pytest.raises(MLMError, match="is not a lock file that mlm-lightning wrote"):
        own_run_dir(str(tmp_path))
    assert (tmp_path / LOCK_NAME).read_text() == "my notes"


def test_without_flock_it_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    def unsupported(fd, blocking=True):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(rundir, "lock_descriptor", unsupported)
    own_run_dir(str(tmp_path / "run"))
    assert "cannot lock the run directory" in caplog.text and "going on without the lock" in caplog.text


def test_a_run_directory_on_an_object_store_is_not_locked_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    own_run_dir("s3://bucket/runs/a")
    assert "cannot be locked" in caplog.text and not os.listdir(tmp_path)  # (no local "s3:" directory)


@pytest.mark.slow
def test_two_simultaneous_fits_into_one_run_dir_leave_the_first_intact(corpus, tmp_path):
    root = tmp_path / "run"
    steps = {0: 6, 1: 9}  # (told apart by their last.ckpt)
    logs = [open(tmp_path / f"fit{i}.log", "w+") for i in steps]
    procs = [subprocess.Popen(cli(*fit_args(corpus, root, "--trainer.max_steps", str(n))), stdout=logs[i],
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
             for i, n in steps.items()]
    codes = [p.wait(timeout=600) for p in procs]
    outs = [open(f.name).read() for f in logs]
    assert sorted(codes) == [0, 2], outs
    won, lost = codes.index(0), codes.index(2)
    assert f"is in use by another fit (pid {procs[won].pid} on host" in error_line(outs[lost])
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps[won]
    assert (root / "export" / "model.safetensors").is_file() and f"{root / 'export'}" in outs[won]
    assert os.listdir(root / "lightning_logs") == ["version_0"]  # the refused fit wrote no logs
