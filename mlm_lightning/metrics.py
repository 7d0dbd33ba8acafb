"""The names of the metrics a run logs, and the steps it logs them on.

Every module that logs a metric, or reads one back (the progress line, the checkpoint monitor, the plot), takes its
name from here. The loss, accuracy and perplexity are logged per stage (`train/loss`, `val/ppl`, `test/acc`).
"""

from __future__ import annotations

LOSS, ACC, PPL, LR = "loss", "acc", "ppl", "lr"


def stage_metric(stage: str, name: str) -> str:
    """A stage's metric: `stage_metric("val", PPL)` is `val/ppl`."""
    return f"{stage}/{name}"


TRAIN_LOSS = stage_metric("train", LOSS)
TRAIN_LR = stage_metric("train", LR)
VAL_LOSS = stage_metric("val", LOSS)
VAL_ACC = stage_metric("val", ACC)
VAL_PPL = stage_metric("val", PPL)
TOKENS_PER_S = "perf/tokens_per_s"  # real (non-pad) tokens a second, all processes together
PAD_SHARE = "perf/pad_share"
MFU = "perf/mfu"
SOURCE_SHARE = "perf/source_share"  # + `/NAME`: each source's share of the real tokens trained on (a mixture)


def is_log_step(trainer) -> bool:
    """Is this training batch one whose metrics are logged (`log_every_n_steps`)? Lightning's own test, from the
    step counters alone: the same on every process, so collectives decided here are entered by all."""
    every = trainer.log_every_n_steps or 50
    return (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every == 0
