"""Learning-rate schedules: `linear`, `cosine`, `wsd` (warmup-stable-decay) and `constant`, each after a linear warmup.

A schedule is a function of the run's progress, 0 at the start and 1 at its end. A run bounded by steps or epochs
measures progress in optimizer steps (exactly the formulas of transformers' `get_*_schedule_with_warmup`); a run
bounded by `max_time` measures it in elapsed training time, read from Lightning's `Timer` callback, whose elapsed
time is saved in every checkpoint and restored on resume: a resumed run continues the same schedule. With both
bounds, whichever is nearer its end sets the progress (the run stops at the first that is reached, and a WSD
decay must have run by then).

Hand-written rather than transformers' schedules: theirs take a step number, and a time-bounded run has none to
give them. The scheduler saves only numbers in checkpoints (`torch.load(weights_only=True)` reads them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lightning.pytorch.callbacks import Timer
from torch.optim.lr_scheduler import LambdaLR

from mlm_lightning.errors import check

SCHEDULES = ("linear", "cosine", "wsd", "constant")


def lr_factor(schedule: str, progress: float, warmup: float, decay_share: float = 0.1,
              min_lr_ratio: float = 0.0) -> float:
    """The share of the peak learning rate once the run has gone `progress` (0..1) of its way, after a warmup
    over its first `warmup` share (0..1). The LR decays to `min_lr_ratio` of the peak at the end."""
    if progress < warmup:
        return progress / warmup
    progress, low = min(progress, 1.0), min_lr_ratio
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":  # constant, then a "1-sqrt" decay over the last decay_share (Hägele et al. 2024)
        start = 1.0 - decay_share
        if progress < start:
            return 1.0
        return low + (1 - low) * (1 - math.sqrt((progress - start) / decay_share))
    done = (progress - warmup) / (1 - warmup) if warmup < 1 else 1.0
    if schedule == "cosine":
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * done))
    return low + (1 - low) * (1 - done)  # linear


def check_schedule(schedule: str, decay_share: float, min_lr_ratio: float) -> None:
    check(schedule in SCHEDULES, f"--model.schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    check(0 < decay_share <= 1, f"--model.decay_share must be in (0, 1], got {decay_share}")
    check(0 <= min_lr_ratio <= 1, f"--model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")


class RunSchedule(LambdaLR):
    """`LambdaLR` whose factor follows `lr_factor` over the run's progress (steps, elapsed time, or both).

    `total_steps`: the step budget (inf: none). `max_time`/`elapsed`: the time budget in seconds and a function
    that returns the training time elapsed so far (None: no time budget). `warmup`: steps (an int), or a share of
    the run (a float below 1). `progress` is the last progress computed (for logs and tests)."""

    def __init__(self, optimizer, schedule: str, total_steps: float, warmup: int | float, decay_share: float = 0.1,
                 min_lr_ratio: float = 0.0, max_time: float | None = None,
                 elapsed: Callable[[], float] | None = None):
        check_schedule(schedule, decay_share, min_lr_ratio)
        steps = math.isfinite(total_steps)
        check(steps or max_time, "the run has no end (no --trainer.max_steps, max_epochs or max_time), so its"
                                 " learning-rate schedule has none: set one of them")
        self.schedule, self.decay_share, self.min_lr_ratio = schedule, decay_share, min_lr_ratio
        self.total_steps = max(1, int(total_steps)) if steps else math.inf
        self.max_time, self.elapsed = max_time, elapsed
        share = isinstance(warmup, float) and warmup < 1
        if share and steps:  # a share of a step budget is a number of steps, as before
            warmup, share = int(warmup * self.total_steps), False
        self.warmup_share = float(warmup) if share else None
        self.warmup_steps = None if share else min(int(warmup), self.total_steps if steps else int(warmup))
        self.progress, self._computed = 0.0, None
        super().__init__(optimizer, self._factor)

    def run_progress(self, step: int) -> float:
        progress = step / self.total_steps if math.isfinite(self.total_steps) else 0.0
        if self.max_time:
            progress = max(progress, self.elapsed() / self.max_time)
        return progress

    def _factor(self, step: int) -> float:
        # one clock reading per step for all parameter groups (LambdaLR asks once per group): one LR, one collective
        if self._computed is None or self._computed[0] != step:
            self._computed = (step, self._compute(step))
        return self._computed[1]

    def _compute(self, step: int) -> float:
        self.progress = progress = self.run_progress(step)
        if self.warmup_share is not None:
            warmup = self.warmup_share
        else:
            if step < self.warmup_steps:  # a warmup in steps ramps by steps whatever measures the rest
                return step / self.warmup_steps
            warmup = self.warmup_steps / self.total_steps if math.isfinite(self.total_steps) else 0.0
            progress = max(progress, warmup)
        return lr_factor(self.schedule, progress, warmup, self.decay_share, self.min_lr_ratio)

    # the settings come from this run's options (a resumed run may be given a longer budget); the checkpoint
    # keeps only the scheduler's own numbers (the step count, the peak LRs): the clock is no data to save
    _SETTINGS = ("schedule", "decay_share", "min_lr_ratio", "total_steps", "max_time", "elapsed", "warmup_share",
                 "warmup_steps", "lr_lambdas", "_computed")

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k not in self._SETTINGS}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({**{k: v for k, v in state_dict.items() if k not in self._SETTINGS},
                                 "lr_lambdas": [None] * len(self.lr_lambdas)})


def run_schedule(optimizer, trainer, schedule: str, warmup: int | float, decay_share: float,
                 min_lr_ratio: float) -> RunSchedule:
    """The schedule of `trainer`'s run: its step budget and, with `max_time`, its `Timer`'s elapsed training time."""
    timer = next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, Timer) and c._duration), None)

    synced = {"step": None, "seconds": 0.0, "rate": 0.0}  # rank 0's clock at the last sync, and its pace

    def elapsed() -> float:
        seconds = timer.time_elapsed("train")
        if trainer.world_size == 1:
            return seconds
        # every process steps with rank 0's clock (clocks differ, and so would the LRs and the weights). A broadcast
        # is a host sync: rank 0's clock is sent only every log_every_n_steps steps (chosen by the step count, the
        # same on every process), and in between each process extrapolates it from the broadcast values alone, so
        # all compute the same learning rate
        step, every = trainer.global_step, max(1, trainer.log_every_n_steps or 50)
        if synced["step"] is None or (step % every == 0 and step != synced["step"]):
            seconds = float(trainer.strategy.broadcast(seconds))
            if synced["step"] is not None and step > synced["step"]:
                synced["rate"] = (seconds - synced["seconds"]) / (step - synced["step"])
            synced.update(step=step, seconds=seconds)
            return seconds
        return synced["seconds"] + max(0, step - synced["step"]) * synced["rate"]

    return RunSchedule(optimizer, schedule, trainer.estimated_stepping_batches, warmup, decay_share, min_lr_ratio,
                       max_time=timer._duration if timer else None, elapsed=elapsed if timer else None)
