"""One optimizer step computes the same gradient however its masked tokens are split: across accumulated
micro-batches, and across processes (each micro-batch's loss weighs by its masked-token count over the whole step).
And gradient clipping works with optimizers that unscale inside their step (fused AdamW) in every precision."""

import subprocess
import sys

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from mlm_lightning.model import MLMModule
from tests.support import ROOT
from tests.training.weighting import ROWS_A, ROWS_B, batch, one_step, tokenizer


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def assert_same(ours: dict, expected: dict, tol: float = 1e-5) -> None:
    worst = max((ours[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= tol, f"parameters differ by up to {worst:.2e}"


def token_mean_loss(tok) -> float:
    return one_step([[batch(ROWS_A + ROWS_B, tok.mask_token_id)]], tok)[1]


@pytest.mark.parametrize("clip", [None, 0.05])
def test_two_accumulated_micro_batches_step_like_one_batch_holding_both(tok, clip):
    a, b = batch(ROWS_A, tok.mask_token_id), batch(ROWS_B, tok.mask_token_id)
    assert a["masked_positions"].numel() != b["masked_positions"].numel()
    union, union_loss, _ = one_step([[batch(ROWS_A + ROWS_B, tok.mask_token_id)]], tok, gradient_clip_val=clip)
    accumulated, loss, _ = one_step([[a, b]], tok, accumulate=2, gradient_clip_val=clip)
    assert_same(accumulated, union)
    assert loss == pytest.approx(union_loss, rel=1e-5)  # train/loss: the token-weighted mean of the step


def test_the_split_matters_without_token_weighting(tok, monkeypatch):
    """The check above can tell: with each micro-batch's mean weighing the same (what Lightning's accumulation and
    DDP do with a mean loss), the same rows split into micro-batches of unequal masked counts step elsewhere."""
    a, b = batch(ROWS_A, tok.mask_token_id), batch(ROWS_B, tok.mask_token_id)
    union, _, _ = one_step([[batch(ROWS_A + ROWS_B, tok.mask_token_id)]], tok)
    monkeypatch.setattr(MLMModule, "_token_weighted", lambda self: False)
    equal_weights, _, _ = one_step([[a, b]], tok, accumulate=2)
    worst = max((equal_weights[k] - union[k]).abs().max().item() for k in union)
    assert worst > 1e-3


@pytest.mark.slow
def test_two_processes_step_like_one_process_holding_both_micro_batches(tmp_path):
    outs = {}
    for devices in (1, 2):
        out = tmp_path / f"d{devices}.pt"
        done = subprocess.run([sys.executable, "-m", "tests.training.weighting", str(out), str(devices)], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outs[devices] = torch.load(out, weights_only=True)
    assert_same(outs[2]["params"], outs[1]["params"])
    assert outs[2]["loss"] == pytest.approx(outs[1]["loss"], rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
def test_clipping_a_fused_optimizer_steps_as_the_unfused_one(tok, precision):
    """Lightning 2.6 refuses to clip an optimizer that unscales in its step (fused AdamW) under mixed precision;
    clipped here, the fused step equals the unfused one (under 16-mixed: unscaled once, before clipping)."""
    batches = [[batch(ROWS_A + ROWS_B, tok.mask_token_id)]]

    def kw():  # (Lightning turns precision="16-mixed" on a CPU into bf16: the fp16 plugin and its scaler, given)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)  # (the default 65536 overflows this tiny step)
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler)]} if precision == "16-mixed" else {
            "precision": precision}

    plain, _, _ = one_step(batches, tok, gradient_clip_val=0.05, **kw())
    fused, _, _ = one_step(batches, tok, gradient_clip_val=0.05, fused=True, **kw())
    assert_same(fused, plain, tol=1e-4)
    before, _, _ = one_step(batches, tok, max_epochs=0)  # (no step at all: the parameters as initialized)
    assert max((plain[k] - before[k]).abs().max().item() for k in before) > 1e-3  # the step was taken


def test_a_skipped_nonfinite_step_with_a_fused_optimizer_under_fp16_leaves_the_weights(tok):
    """16-mixed + fused AdamW + skip_nonfinite: the step with a NaN loss is skipped through the GradScaler (its
    gradients made NaN on the device), not by dropping the gradients, which the scaler's inf check needs."""
    from tests.support.callbacks import NanAt

    batches = [[batch(ROWS_A + ROWS_B, tok.mask_token_id)]]
    before, _, _ = one_step(batches, tok, max_epochs=0)
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=256.0))
    after, _, _ = one_step(batches, tok, fused=True, module_kw={"skip_nonfinite": True}, plugins=[plugin],
                           gradient_clip_val=1.0, callbacks=[NanAt(1)])
    poisoned = [k for k in after if not torch.isfinite(after[k]).all()]  # (NanAt's head layer)
    assert len(poisoned) == 1
    assert all(torch.equal(after[k], before[k]) for k in before if k not in poisoned)  # the step was skipped
