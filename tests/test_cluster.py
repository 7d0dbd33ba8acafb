"""Collectives are entered by every process at the same step, whatever each process's clock says."""

import json
import subprocess

import pytest

from tests.support.cli import cli, fit_args
from tests.support.runs import state

pytestmark = pytest.mark.slow


def test_time_based_checkpoints_with_skewed_clocks_are_decided_together(corpus, tmp_path):
    # rank 1's clock runs 100,000 times faster: its 10-minute interval passes every few milliseconds, rank 0's never
    # (before: rank 1 alone entered the save decision's all-reduce and both processes hung)
    out = tmp_path / "saves"
    out.mkdir()
    done = subprocess.run(
        cli(*fit_args(corpus, tmp_path / "run", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                      "--trainer.max_steps", "12", "--trainer.log_every_n_steps", "4", "--trainer.limit_val_batches",
                      "0", "--checkpoint.train_time_interval", "0:10:00",
                      "--trainer.callbacks+=tests.support.callbacks.RecordSaves", "--trainer.callbacks.out", str(out),
                      "--trainer.callbacks.factor", "100000")),
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    saves = [json.loads((out / f"saves-{rank}.json").read_text()) for rank in (0, 1)]
    assert saves[0] == saves[1] and saves[0][-1] == 12, saves
    assert [s for s in saves[0] if s < 12] == [4, 8]  # the timed saves, at log steps, on both processes
    assert state(tmp_path / "run")["global_step"] == 12
