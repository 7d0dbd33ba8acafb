"""Promises of the README that had no test of their own: each of these fails when the feature is removed."""

import pytest
import torch

from tests.support.cli import fit_args, run_cli
from tests.support.runs import metric, state


def test_masking_options_reach_the_collator_from_the_command_line(corpus, tmp_path):
    assert run_cli(*fit_args(corpus, tmp_path / "m", "--trainer.max_steps", "2", "--data.masking", "span",
                             "--data.mean_span_length", "2.5",
                             "--trainer.callbacks+=tests.support.callbacks.ExpectMasking",
                             "--trainer.callbacks.masking", "span", "--trainer.callbacks.mean_span_length",
                             "2.5")) == 0


def test_sigterm_in_the_sanity_check_stops_at_once_with_nothing_to_save(corpus, tmp_path, capsys):
    root = tmp_path / "s"
    code = run_cli(*fit_args(corpus, root, "--trainer.max_steps", "20", "--trainer.num_sanity_val_steps", "2",
                             "--trainer.callbacks+=tests.support.callbacks.SignalInSanityCheck"))
    err = capsys.readouterr().err
    assert code == 143, err
    assert "interrupted by SIGTERM; no training step to save" in err and "Traceback" not in err
    assert not (root / "checkpoints" / "last.ckpt").exists()


def test_warmup_as_a_share_of_the_steps(corpus, tmp_path):
    """`--model.warmup_steps 0.25` of 20 steps: the learning rate climbs linearly for 5 steps, peaks, then falls."""
    root = tmp_path / "w"
    assert run_cli(*fit_args(corpus, root, "--trainer.max_steps", "20", "--model.warmup_steps", "0.25",
                             "--model.learning_rate", "1e-3")) == 0
    lr = metric(root, "train/lr")
    assert max(lr, key=lr.get) == 5 and lr[5] == pytest.approx(1e-3)
    assert lr[2] == pytest.approx(1e-3 * 2 / 5) and lr[10] < lr[5]


def test_resuming_on_another_process_count_warns(corpus, tmp_path, capsys):
    root = tmp_path / "r"
    assert run_cli(*fit_args(corpus, root, "--trainer.max_steps", "3")) == 0
    ckpt = state(root)
    ckpt["mlm_lightning"]["rng"] = ckpt["mlm_lightning"]["rng"] * 2  # as if written by 2 processes
    torch.save(ckpt, root / "checkpoints" / "last.ckpt")
    with pytest.warns(UserWarning, match=r"resuming a run of 2 process\(es\) on 1: it continues"):
        assert run_cli(*fit_args(corpus, root, "--trainer.max_steps", "5", "--ckpt_path", "last")) == 0
    assert state(root)["global_step"] == 5

