"""Test-only Lightning callbacks, given to the CLI by class path
(`--trainer.callbacks+=tests.support.callbacks.SignalAt --trainer.callbacks.step 5`): signals at chosen moments
(preemption, Ctrl-C), NaN losses, slow phases, and recorders of what a fit did (LRs, saves, host syncs)."""

from __future__ import annotations

import json
import os
import signal
import time
import traceback

import torch
from lightning.pytorch.callbacks import Callback

from mlm_lightning.data import shards
from mlm_lightning.model import arch


class SignalAt(Callback):
    """Send this process a signal after optimizer step `step` (simulates a preemption or Ctrl-C)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class SignalAtBatch(Callback):
    """Send a signal after the `batch`-th training batch (counted from 1 over the whole fit)."""

    def __init__(self, batch: int, signum: int = int(signal.SIGTERM), times: int = 1):
        self.batch, self.signum, self.times = batch, signum, times

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx + 1 == self.batch:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


class SignalDuringValidation(Callback):
    """Send this process a signal in the middle of the first validation after step `step`."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.global_step >= self.step and not trainer.sanity_checking:
            os.environ["MLM_TEST_SIGNAL_SENT"] = repr(time.time())  # for tests that time the reaction
            os.kill(os.getpid(), self.signum)
            self.step = 10**9


class SignalInSanityCheck(Callback):
    """Send this process a signal during the sanity check (before any training step)."""

    def __init__(self, signum: int = int(signal.SIGTERM)):
        self.signum = signum

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking:
            os.kill(os.getpid(), self.signum)


class SlowValidation(Callback):
    """Make every validation batch after `after_step` take `seconds`: a long validation."""

    def __init__(self, seconds: float = 5.0, after_step: int = 0):
        self.seconds, self.after_step = seconds, after_step

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and trainer.global_step >= self.after_step:
            time.sleep(self.seconds)


class SlowTokenization(Callback):
    """Make tokenizing the corpus take `seconds` longer (patched when the callback is made: before data setup)."""

    def __init__(self, seconds: float = 10.0):
        real = shards.tokenize_phase

        def slow(*args, **kwargs):
            time.sleep(seconds)
            return real(*args, **kwargs)

        shards.tokenize_phase = slow


class NanAt(Callback):
    """Poison the MLM head before step `step` so that step's loss is NaN (on process `rank` only, if given)."""

    def __init__(self, step: int, rank: int | None = None):
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step and self.rank in (None, trainer.global_rank):
            with torch.no_grad():
                arch.head_module(pl_module.model).weight.fill_(float("nan"))


class NanOnce(Callback):
    """Make the loss of step `step` NaN (a NaN weight in the MLM head for that step only, restored after it)."""

    def __init__(self, step: int):
        self.step, self.saved = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            weight = arch.head_module(pl_module.model).weight
            self.saved = weight.detach().clone()
            with torch.no_grad():
                weight.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.saved is not None:
            with torch.no_grad():
                arch.head_module(pl_module.model).weight.copy_(self.saved)
            self.saved = None


class ExpectMasking(Callback):
    """Fail the fit unless the data module's collator masks with `masking` and `mean_span_length`: the options
    given on the command line reached it."""

    def __init__(self, masking: str, mean_span_length: float):
        self.masking, self.mean_span_length = masking, mean_span_length

    def on_train_start(self, trainer, pl_module):
        strategy = trainer.datamodule.collator.strategy
        if (strategy.name, strategy.mean_span_length) != (self.masking, self.mean_span_length):
            raise RuntimeError(f"the collator masks with {strategy.name}/{strategy.mean_span_length}")


class CountHostSyncs(Callback):
    """Record every `Tensor.item`/`.tolist`/`.cpu()` and `torch.tensor(<number>, device=...)` call made during
    training (steps and hooks), with the step counter Lightning logs by (`_batches_that_stepped`), in `calls`.

    Left out: torch's own optimizer internals (a CPU-only optimizer reads its step counts) and data loading (on a GPU
    it runs in loader workers)."""

    calls: list[tuple[int, str, str]] = []

    def on_train_start(self, trainer, pl_module):
        loop = trainer.fit_loop.epoch_loop
        optim, data = f"{os.sep}torch{os.sep}optim{os.sep}", f"{os.sep}torch{os.sep}utils{os.sep}data{os.sep}"
        self._saved = []

        def wrap(owner, attr, name, counts=lambda a, k: True):
            real = getattr(owner, attr)

            def counted(*a, **k):
                if counts(a, k):
                    stack = traceback.extract_stack()[:-1]
                    if optim not in stack[-1].filename and not any(data in f.filename for f in stack):
                        where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in stack[::-1][:6])
                        CountHostSyncs.calls.append((loop._batches_that_stepped, name, where))
                return real(*a, **k)

            self._saved.append((owner, attr, real))
            setattr(owner, attr, counted)

        wrap(torch.Tensor, "item", "item")
        wrap(torch.Tensor, "tolist", "tolist")
        wrap(torch.Tensor, "cpu", "cpu")
        wrap(torch, "tensor", "tensor(number, device)",
             lambda a, k: k.get("device") is not None and bool(a) and isinstance(a[0], (int, float, bool)))

    def on_train_end(self, trainer, pl_module):
        for owner, attr, real in reversed(self._saved):
            setattr(owner, attr, real)


class RecordSaves(Callback):
    """Skew this process's clock (`time.monotonic` runs `factor` times faster on global rank `rank`) and write the
    steps at which this process saved a checkpoint to `<out>/saves-<rank>.json` at the end."""

    def __init__(self, out: str, rank: int = 1, factor: float = 1000.0):
        self.out, self.rank, self.factor, self.steps = out, rank, factor, []

    def setup(self, trainer, pl_module, stage):
        if trainer.global_rank == self.rank:
            real = time.monotonic
            time.monotonic = lambda: real() * self.factor

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.steps.append(trainer.global_step)

    def teardown(self, trainer, pl_module, stage):
        with open(os.path.join(self.out, f"saves-{trainer.global_rank}.json"), "w") as f:
            json.dump(self.steps, f)


class RecordLR(Callback):
    """Append {step, lr, progress, elapsed} at each training batch start to the JSONL file `path`: the LR the
    coming step uses, the run progress its schedule computed it from, and the Timer's elapsed training time."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from lightning.pytorch.callbacks import Timer

        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        row = {"step": trainer.global_step, "lr": trainer.optimizers[0].param_groups[0]["lr"],
               "progress": trainer.lr_scheduler_configs[0].scheduler.progress,
               "elapsed": timer.time_elapsed("train") if timer else None}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
