"""--model.skip_nonfinite: a NaN/inf step is skipped on every process; a run that keeps skipping stops (exit 3)."""

import glob
import signal

import pytest
import torch

from mlm_lightning.model.module import MLMModule
from mlm_lightning.training import signals
from tests.support.cli import fit_args, run_cli
from tests.support.runs import metric, state


def args(corpus, root, *extra):
    return fit_args(corpus, root, "--trainer.max_steps", "14", "--model.skip_nonfinite", "true", *extra)


def test_a_transient_nan_step_is_skipped_and_the_run_goes_on(corpus, tmp_path, capsys):
    code = run_cli(*args(corpus, tmp_path, "--trainer.callbacks+=tests.support.callbacks.NanOnce",
                         "--trainer.callbacks.step", "6", "--trainer.val_check_interval", "7"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "skipping step 6" in out
    losses = metric(tmp_path, "train/loss")
    assert len(losses) == 14 and all(torch.isfinite(torch.tensor(v)) for k, v in losses.items() if k != 5)
    last = state(tmp_path)
    assert last["global_step"] == 14 and all(torch.isfinite(v).all() for v in last["state_dict"].values())
    # AdamW stepped 13 times, not 14: the skipped step left its state (and the weights) alone
    steps = {float(s["step"]) for s in last["optimizer_states"][0]["state"].values()}
    assert steps == {13.0}


def test_a_run_that_keeps_skipping_stops_with_exit_3(corpus, tmp_path, capsys):
    handler = signal.getsignal(signal.SIGINT)
    code = run_cli(*args(corpus, tmp_path, "--model.skip_nonfinite_limit", "3", "--trainer.limit_val_batches", "0",
                         "--trainer.callbacks+=tests.support.callbacks.NanAt", "--trainer.callbacks.step", "8"))
    err = capsys.readouterr().err
    assert code == 3, err
    assert "3 optimizer steps in a row had a non-finite loss" in err
    assert not glob.glob(f"{tmp_path}/checkpoints/*.ckpt") and not (tmp_path / "export").exists()
    assert not signals.running and signal.getsignal(signal.SIGINT) is handler  # handlers put back


@pytest.mark.parametrize("fused", [False, True])
def test_skipping_on_the_device_leaves_weights_and_optimizer_state_untouched(tokenizer, fused):
    """The GPU path: fused AdamW skips the step on the device (`found_inf`), no host sync; CPU fused AdamW too."""
    from tests.support.models import module

    m = module(tokenizer, skip_nonfinite=True)
    params = [p for p in m.model.parameters()]
    opt = torch.optim.AdamW(params, lr=0.1, fused=fused or None)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    m._window_bad = torch.ones(())

    class Trainer:  # what on_before_optimizer_step reads
        precision_plugin, progress_bar_callback, global_step, is_global_zero = None, None, 1, True

    m._trainer = Trainer()
    MLMModule.on_before_optimizer_step(m, opt)
    if not fused:
        assert all(p.grad is None for p in params)  # the host path drops the gradients
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert {float(s["step"]) for s in opt.state.values() if "step" in s} == {1.0}
    assert m._skips.tolist() == [1.0, 1.0, 1.0]
