"""What a person watching a fit sees: the progress bar, the model summary, the resume line, the end summary.

- The progress bar (Lightning's own, Rich or tqdm, whichever Lightning would pick) shows real (non-pad)
  tokens/s and the ETA of the whole run (Lightning's shows one epoch's), and drops `v_num`.
- The model summary drops the FLOPs column: Lightning counts FLOPs only through `example_input_array`,
  which a model fed dicts of tensors cannot have, so the column is always 0 (Lightning has no option to
  hide it).
- `RunReport` says where a resumed fit resumes, and counts steps, tokens and time for the end summary.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from lightning.pytorch.callbacks import Callback, ModelSummary, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

from mlm_lightning.metrics import TOKENS_PER_S, TRAIN_LOSS, is_log_step
from mlm_lightning.training.callbacks import ThroughputLogger

log = logging.getLogger("mlm_lightning")


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


class RunReport(Callback):
    """Resume line at the start; steps, real tokens and time for the summary at the end (`summary()`)."""

    def __init__(self, log_summary: bool = False):
        """Args:
        log_summary: Log the end summary when the fit ends (the command line logs it itself, with the export)."""
        self.log_summary = log_summary
        self.start_time = self.end_time = None
        self.start_step = self.end_step = 0
        self.tokens = 0  # real (non-pad) tokens, this process; summed over processes at the end
        self.total_tokens = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_time, self.start_step, self.tokens = time.perf_counter(), trainer.global_step, 0
        if trainer.ckpt_path and trainer.global_step > 0 and trainer.is_global_zero:
            batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            log.info("resuming from %s at step %d (epoch %d, batch %d)", trainer.ckpt_path, trainer.global_step,
                     trainer.current_epoch, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += int(batch["num_real_tokens"])

    def on_train_end(self, trainer, pl_module) -> None:
        self.end_time, self.end_step = time.perf_counter(), trainer.global_step
        total = torch.tensor(float(self.tokens), device=pl_module.device)
        self.total_tokens = int(trainer.strategy.reduce(total, reduce_op="sum").item())  # every process
        if self.log_summary and trainer.is_global_zero and self.end_step > self.start_step:
            log.info("fit done: %s", self.summary())
            ckpt = trainer.checkpoint_callback
            if ckpt is not None and getattr(ckpt, "dirpath", None):
                log.info("checkpoints: %s (best: %s)", ckpt.dirpath, ckpt.best_model_path or "none yet")

    def elapsed(self) -> float:
        return (self.end_time or time.perf_counter()) - (self.start_time or time.perf_counter())

    def summary(self) -> str:
        steps = self.end_step - self.start_step
        rate = self.total_tokens / max(self.elapsed(), 1e-9)
        return (f"{steps:,} steps (step {self.start_step} -> {self.end_step}), {human(self.total_tokens)} real tokens"
                f" seen, {rate:,.0f} real tokens/s on average over {duration(self.elapsed())} of training"
                " (validation included)")


def run_eta(trainer, report: RunReport | None) -> str | None:
    """Time left in the whole fit: by steps (max_steps / max_epochs) and by max_time, whichever ends first."""
    if report is None or report.start_time is None:
        return None
    done = trainer.global_step - report.start_step
    elapsed = time.perf_counter() - report.start_time
    left = []
    total = trainer.estimated_stepping_batches
    if done > 0 and math.isfinite(total):
        left.append(elapsed / done * max(0, total - trainer.global_step))
    timer = next((c for c in trainer.callbacks if type(c).__name__ == "Timer"), None)
    remaining = timer.time_remaining("train") if timer is not None else None
    if remaining is not None:
        left.append(remaining)
    return duration(min(left)) if left else None


class _RunMetrics:
    """Mixed into Lightning's progress bars: whole-run ETA, real tokens/s and the training loss instead of `v_num`.

    The loss and tokens/s are read at log steps only (`log_every_n_steps`), where the loggers read the device
    anyway: Lightning's own `prog_bar=True` would read the loss off the device at every batch (a host sync that
    drains a GPU's queue), and Rich asks for the metrics at every batch whatever its refresh rate."""

    _shown: dict | None = None

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if trainer.training:
            if self._shown is None or is_log_step(trainer):
                self._shown = self._read(trainer)
            items.update(self._shown)
            report = next((c for c in trainer.callbacks if isinstance(c, RunReport)), None)
            total = trainer.estimated_stepping_batches
            items["step"] = f"{trainer.global_step}/{int(total)}" if math.isfinite(total) else str(trainer.global_step)
            eta = run_eta(trainer, report)
            if eta:
                items["eta"] = eta  # of the whole run (the bar's own time left is the epoch's)
        return items

    @staticmethod
    def _read(trainer) -> dict:
        shown = {}
        loss = trainer.callback_metrics.get(TRAIN_LOSS)
        if loss is not None:
            shown[TRAIN_LOSS] = f"{float(loss):.3f}"
        throughput = next((c for c in trainer.callbacks if isinstance(c, ThroughputLogger)), None)
        tokens = getattr(throughput, "latest", {}).get(TOKENS_PER_S)
        if tokens is not None:
            shown["tok/s"] = human(tokens)
        return shown


class MLMRichProgressBar(_RunMetrics, RichProgressBar):
    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate, theme=RichProgressBarTheme(metrics_text_delimiter="\n"))

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning writes "Epoch 0/-2" when steps or time end the run (max_epochs -1)
        if self.trainer.max_epochs in (None, -1):
            return f"Epoch {current_epoch}".ljust(len(self.validation_description))
        return super()._get_train_description(current_epoch)


class MLMTQDMProgressBar(_RunMetrics, TQDMProgressBar):
    pass


def progress_bar(refresh_rate: int = 1):
    """The bar Lightning would pick (Rich when installed), with the run's ETA, tokens/s and loss (read at log
    steps)."""
    from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

    return MLMRichProgressBar(refresh_rate) if _RICH_AVAILABLE else MLMTQDMProgressBar(refresh_rate)


class CompactModelSummary(ModelSummary):
    """Lightning's layer table without the FLOPs column and line (always 0 here, see the module docstring)."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **kwargs) -> None:
        columns = [(name, values) for name, values in summary_data if name != "FLOPs" or total_flops]
        widths = [max([len(name)] + [len(str(v)) for v in values]) for name, values in columns]
        lines = [" | ".join(name.ljust(w) for (name, _), w in zip(columns, widths, strict=True))]
        lines.append("-" * len(lines[0]))
        for row in zip(*(values for _, values in columns), strict=True):
            lines.append(" | ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
        lines.append("-" * len(lines[0]))
        lines.append(f"{get_human_readable_count(trainable_parameters)} trainable params,"
                     f" {get_human_readable_count(total_parameters)} total, {model_size:,.1f} MB")
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info("\n" + "\n".join(lines))
