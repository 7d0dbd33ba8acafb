"""The GPU path is cheap per step: no host sync inside a training step between log steps, one write per save."""

import collections
import os

from mlm_lightning.training.checkpointing import AtomicCheckpointIO
from tests.support.callbacks import CountHostSyncs
from tests.support.cli import fit_args, run_cli


def test_no_host_sync_inside_training_steps_between_log_steps(corpus, tmp_path):
    CountHostSyncs.calls.clear()
    code = run_cli(*fit_args(corpus, tmp_path, "--trainer.max_steps", "30", "--trainer.log_every_n_steps", "10",
                             "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "true",
                             "--trainer.callbacks+=tests.support.callbacks.CountHostSyncs"))
    assert code == 0
    calls = CountHostSyncs.calls
    between = [c for c in calls if (c[0] + 1) % 10]
    assert not between, "\n".join(f"step {s + 1}: {name} at {where}" for s, name, where in between)
    per_interval = collections.Counter((s + 1) // 10 for s, _, _ in calls)
    assert set(per_interval) <= {1, 2, 3} and max(per_interval.values()) <= 12, per_interval


def test_last_ckpt_is_written_once_per_save_point(corpus, tmp_path, monkeypatch):
    writes = []
    real = AtomicCheckpointIO.save_checkpoint

    def counted(self, checkpoint, path, storage_options=None):
        writes.append((os.path.basename(str(path)), checkpoint["global_step"]))
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", counted)
    # a periodic save due at every validation step (10, 20), and the fit's end at 20
    assert run_cli(*fit_args(corpus, tmp_path, "--trainer.max_steps", "20", "--trainer.val_check_interval", "10",
                             "--trainer.check_val_every_n_epoch", "null", "--checkpoint.every_n_train_steps",
                             "10")) == 0
    last = [step for name, step in writes if name == "last.ckpt"]
    assert last == [10, 20], writes
    assert all(name.startswith("best-") for name, _ in writes if name != "last.ckpt")
