"""Checkpoints written in a background thread (the GPU default): atomic, of their step's state, waited for."""

import os

import pytest
import torch

from mlm_lightning.training.checkpointing import AsyncAtomicCheckpointIO, AtomicCheckpointIO
from tests.support.cli import fit_args, run_cli
from tests.support.runs import state


def test_a_background_save_holds_the_state_of_its_call_and_is_renamed_into_place(tmp_path, monkeypatch):
    io = AsyncAtomicCheckpointIO()
    weight = torch.ones(4)
    real = AtomicCheckpointIO.save_checkpoint
    gate = __import__("threading").Event()

    def slow(self, checkpoint, path, storage_options=None):
        gate.wait(10)  # the training thread goes on meanwhile
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", slow)
    io.save_checkpoint({"w": weight}, tmp_path / "last.ckpt")
    weight.add_(1)  # the optimizer steps on while the file is written
    assert not (tmp_path / "last.ckpt").exists()
    gate.set()
    io.wait()
    assert torch.equal(torch.load(tmp_path / "last.ckpt", weights_only=True)["w"], torch.ones(4))
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left
    io.teardown()


def test_a_failed_background_save_is_raised(tmp_path, monkeypatch):
    io = AsyncAtomicCheckpointIO()
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(OSError("full")))
    with pytest.raises(OSError, match="full"):  # at the next save or wait, whichever comes first
        io.save_checkpoint({"w": torch.ones(1)}, tmp_path / "a.ckpt")
        io.wait()


def test_a_fit_with_background_saves_resumes(corpus, tmp_path):
    run = fit_args(corpus, tmp_path, "--checkpoint.async_save", "true", "--trainer.val_check_interval", "3")
    assert run_cli(*run, "--trainer.max_steps", "6") == 0
    assert state(tmp_path)["global_step"] == 6 and state(tmp_path, "best-step=6.ckpt")["global_step"] == 6
    assert run_cli(*run, "--trainer.max_steps", "8", "--ckpt_path", "last") == 0
    assert state(tmp_path)["global_step"] == 8
