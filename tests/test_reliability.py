"""Interrupts lose nothing, resume is exact, NaNs stop cleanly, checkpoints are written atomically."""

import csv
import glob
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from mlm_lightning.data import module as data_module
from mlm_lightning.errors import MLMError
from mlm_lightning.model.checkpoint import load_checkpoint
from mlm_lightning.training.checkpointing import AtomicCheckpointIO
from tests.support.cli import cli, fit_args, run_cli
from tests.support.runs import assert_resumed_at, metric

STEPS = "40"


def args(corpus, root, *extra):
    return fit_args(corpus, root, "--trainer.max_steps", STEPS, "--trainer.val_check_interval", "10", *extra)


def losses(root) -> dict[int, float]:
    return metric(root, "train/loss")


def weights(root):
    return torch.load(f"{root}/checkpoints/last.ckpt", weights_only=True)["state_dict"]


def assert_same_run(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    la, lb = losses(a), losses(b)
    assert len(la) == int(STEPS) and la.keys() == lb.keys()
    assert max(abs(la[k] - lb[k]) for k in la) < 1e-6


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    assert run_cli(*args(corpus, root)) == 0
    return root


# the corpus gives 17 full batches per epoch: step 13 is mid-epoch 0, step 25 mid-epoch 1
@pytest.mark.parametrize("signum, step", [(signal.SIGTERM, 13), (signal.SIGINT, 25)])
def test_interrupt_then_resume_is_exact(corpus, tmp_path, capsys, uninterrupted, signum, step):
    root = tmp_path / "run"
    code = run_cli(*args(corpus, root, "--trainer.callbacks+=tests.support.callbacks.SignalAt",
                         "--trainer.callbacks.step", str(step), "--trainer.callbacks.signum", str(int(signum))))
    err = capsys.readouterr().err
    assert code == 128 + signum, err
    assert f"interrupted by {signal.Signals(signum).name}" in err and "last.ckpt" in err
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step
    assert max(losses(root)) == step - 1  # stopped right after that step
    assert run_cli(*args(corpus, root, "--ckpt_path", "last")) == 0
    assert_resumed_at(root, step)  # it continued from the checkpoint (a seeded retrain ends the same)
    assert_same_run(uninterrupted, root)


@pytest.mark.slow
def test_a_resume_after_the_cache_is_lost_tokenizes_with_the_checkpoints_tokenizer(corpus, tmp_path, capsys,
                                                                                  uninterrupted, monkeypatch):
    """No tokenizer is trained: the checkpoint carries its own, and the corpus is tokenized with it."""
    root, cache = tmp_path / "run", ["--data.cache_dir", str(tmp_path / "cache")]
    code = run_cli(*args(corpus, root, *cache, "--trainer.callbacks+=tests.support.callbacks.SignalAt",
                         "--trainer.callbacks.step", "13", "--trainer.callbacks.signum", str(int(signal.SIGTERM))))
    assert code == 143, capsys.readouterr().err
    shutil.rmtree(tmp_path / "cache")

    def trained(*a, **k):
        raise AssertionError("a tokenizer was trained")

    monkeypatch.setattr(data_module, "train_tokenizer", trained)
    capsys.readouterr()
    assert run_cli(*args(corpus, root, *cache, "--ckpt_path", "last")) == 0
    assert "with the tokenizer it carries" in capsys.readouterr().err
    assert glob.glob(f"{tmp_path}/cache/data/*/meta.json") and not glob.glob(f"{tmp_path}/cache/tokenizers/*")
    assert_resumed_at(root, 13)
    assert_same_run(uninterrupted, root)


def test_signal_during_validation_cuts_it_short_then_resumes_exactly(corpus, tmp_path, capsys, uninterrupted):
    root = tmp_path / "val"
    code = run_cli(*args(corpus, root, "--trainer.callbacks+=tests.support.callbacks.SignalDuringValidation",
                         "--trainer.callbacks.step", "20"))
    assert code == 143, capsys.readouterr().err
    # validation runs at batch 10 of each 17-batch epoch: the first at or after step 20 is at step 27
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 27
    assert run_cli(*args(corpus, root, "--ckpt_path", "last")) == 0
    assert_resumed_at(root, 27)
    assert_same_run(uninterrupted, root)


def test_ckpt_path_last_without_checkpoint_starts_fresh(corpus, tmp_path, uninterrupted):
    root = tmp_path / "fresh"
    assert run_cli(*args(corpus, root, "--ckpt_path", "last")) == 0
    assert_same_run(uninterrupted, root)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(corpus, tmp_path, capsys):
    root = tmp_path / "nan"
    code = run_cli(*args(corpus, root, "--checkpoint.every_n_train_steps", "5",
                         "--trainer.callbacks+=tests.support.callbacks.NanAt", "--trainer.callbacks.step", "8"))
    err = capsys.readouterr().err
    assert code == 3, err
    assert "the loss became nan at step 8" in err and "last good checkpoint kept: " in err
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_nan_step_can_be_skipped_but_poisoned_weights_are_never_saved(corpus, tmp_path, capsys):
    # NanAt poisons a weight for good: every step from 8 on is skipped; the validation at step 10 would keep
    # NaN weights as the best checkpoint: the run stops there instead (exit 3), nothing saved from them
    root = tmp_path / "skip"
    code = run_cli(*args(corpus, root, "--model.skip_nonfinite", "true", "--checkpoint.every_n_train_steps", "5",
                         "--trainer.callbacks+=tests.support.callbacks.NanAt", "--trainer.callbacks.step", "8"))
    out, err = capsys.readouterr()
    assert code == 3, err
    assert "skipping step 8" in out and "the weights hold NaN/inf at step 10" in err
    assert not os.path.exists(root / "export")
    for ckpt in glob.glob(f"{root}/checkpoints/*.ckpt"):
        state = torch.load(ckpt, weights_only=True)
        assert state["global_step"] == 5 and all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "a.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["a.ckpt"]


class Evil:
    def __init__(self, mark: str):
        self.mark = mark

    def __reduce__(self):
        return (open, (self.mark, "w"))  # unpickling it creates the file


def test_checkpoints_are_loaded_without_unpickling_code(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "mlm_lightning": Evil(str(mark))}, path)
    # torch >= 2.6 loads weights-only by default; this makes a call that leaves it unset unpickle anything, as
    # older torch (which the package allows) does: only an explicit weights_only=True refuses the file then
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(MLMError, match="cannot be read as plain data"):
        load_checkpoint(str(path))
    with pytest.raises(Exception, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not mark.exists()


@pytest.mark.slow
@pytest.mark.parametrize("after", [5, 10])  # 10: around the validation at step 10
def test_sigterm_to_a_real_process_then_resume(corpus, tmp_path, uninterrupted, after):
    root = tmp_path / "proc"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cli(*args(corpus, root)), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(losses(root)) < after and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert os.path.exists(root / "checkpoints" / "last.ckpt")
    done = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < done < int(STEPS)
    resumed = subprocess.run(cli(*args(corpus, root, "--ckpt_path", "last")), env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_resumed_at(root, done)
    assert_same_run(uninterrupted, root)


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(corpus, tmp_path):
    root = tmp_path / "ddp"
    result = subprocess.run(
        cli(*args(corpus, root, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "12",
                  "--trainer.val_check_interval", "4")),
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 12
    assert os.path.isdir(root / "export")
    rows = [r for f in glob.glob(f"{root}/lightning_logs/*/metrics.csv") for r in csv.DictReader(open(f))]
    assert [r["val/ppl"] for r in rows if r.get("val/ppl")]  # validation ran (split across both processes)


def test_interrupt_during_tokenization_leaves_no_half_cache(write, tmp_path, capsys, monkeypatch):
    from mlm_lightning.data import shards

    real = shards.tokenize_phase

    def interrupted(*a, **k):
        real(*a, **k)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the cache is being written
        time.sleep(5)

    monkeypatch.setattr(shards, "tokenize_phase", interrupted)
    cache = tmp_path / "cache"
    corpus = write("c.txt", [f"line {i} of text ." for i in range(200)])
    code = run_cli(*args(corpus, tmp_path / "run", "--data.cache_dir", str(cache)))
    assert code == 130
    assert "interrupted by SIGINT; no training step to save, nothing left half-written" in capsys.readouterr().err
    # no cache directory, only the work area with complete shards, which the next run reuses (and the lock file)
    assert sorted(os.path.splitext(name)[1] for name in os.listdir(cache / "data")) == [".lock", ".partial"]
    monkeypatch.undo()
    assert run_cli(*args(corpus, tmp_path / "run", "--data.cache_dir", str(cache), "--trainer.max_steps", "2",
                        "--trainer.val_check_interval", "2")) == 0


def test_resume_with_another_tokenizer_is_refused(corpus, tmp_path, capsys):
    root = tmp_path / "tok"
    assert run_cli(*args(corpus, root, "--trainer.max_steps", "3")) == 0
    capsys.readouterr()
    code = run_cli(*args(corpus, root, "--data.vocab_size", "250", "--ckpt_path", "last"))
    err = capsys.readouterr().err
    assert code == 2 and "trained with another tokenizer" in err and "Traceback" not in err


def test_the_process_group_is_destroyed_when_a_ddp_command_ends(corpus, tmp_path):
    """Left to interpreter finalization, a gloo group sometimes aborts a finished process (exit -6)."""
    import torch.distributed as dist

    saved = dict(os.environ)
    try:
        code = run_cli(*args(corpus, tmp_path / "run", "--trainer.devices", "1", "--trainer.strategy", "ddp",
                             "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"))
    finally:  # Lightning's DDP sets LOCAL_RANK & co. here: a later `fit --trainer.devices 2` would await a rank 1
        os.environ.clear()
        os.environ.update(saved)
    assert code == 0
    assert not dist.is_initialized()
