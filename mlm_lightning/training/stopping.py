"""Graceful stop: SIGINT/SIGTERM save a resumable `last.ckpt` within seconds, in every phase of a fit.

The signal handler only records the signal; the save happens at the next point where the state is
consistent, and only then is Lightning's own SIGTERM handler told (it stops the loops and relays to DDP ranks):
- training: at the next batch end that closes a gradient-accumulation window (a save in the middle of one
  would lose the window's gradients, and the resumed run would differ);
- validation: at the next validation batch end; the checkpoint records the validation as not yet done, so the
  resumed run simply runs it again (nothing of a half validation is kept);
- sanity check: nothing has been trained yet; the run stops at once.
Cluster schedulers send SIGKILL ~30 s after SIGTERM, so no phase waits for the end of a validation.
A second Ctrl-C stops at once (exit 130, through `Interrupted`, not Lightning's KeyboardInterrupt path).
"""

from __future__ import annotations

import logging
import signal

from lightning.pytorch.callbacks import Callback

from mlm_lightning.errors import Interrupted
from mlm_lightning.training import signals

log = logging.getLogger("mlm_lightning")


class GracefulStop(Callback):
    """Sets the shared state in `training/signals.py` (a fit under way, the signal that stopped it)."""

    def __init__(self, stop_quietly: bool = False):
        """Args:
        stop_quietly: Once `last.ckpt` is saved, end the fit by returning from `Trainer.fit` (Python callers: a
            notebook's interrupt) instead of through Lightning's SIGTERM exception (the command line's exit code).
        """
        self.stop_quietly = stop_quietly
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._notified = False
        self._agreed = False

    # -- handlers: installed after Lightning's own (registered just before the sanity check) -------------
    def _install(self, trainer) -> None:
        enabled = getattr(trainer.checkpoint_callback, "save_on_interrupt", True)
        if self._previous or trainer.state.fn != "fit" or not enabled:
            return
        signals.running, signals.last_signum = True, None
        self.signum, self._notified, self._agreed = None, False, False  # (a fit after a stopped one starts afresh)
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum, frame):
            if (self.signum is not None and signum == signal.SIGINT) or trainer.sanity_checking:
                raise Interrupted(signum)  # a second Ctrl-C, or nothing trained yet: stop now
            if self.signum is None and signum == signal.SIGINT and trainer.is_global_zero:
                print("\nmlm-lightning: interrupted; saving a checkpoint (Ctrl-C again to abort)", flush=True)
            self.signum = signals.last_signum = self.signum or signum

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        signals.running = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Lightning calls no teardown hook after an exception: put the handlers back here, or a later fit in this
        # process (a notebook, the tests) would find them installed and the CLI's own handler standing aside
        self.teardown(trainer, pl_module, "fit")

    # -- the stop ----------------------------------------------------------------------------------------
    def _requested(self, trainer, batch_idx: int | None = None) -> bool:
        """True on every process if a signal reached any: saving is collective, so all decide alike.

        With several processes that agreement is a collective and a host sync: asked every
        `log_every_n_steps` batches only (1 on CPU; 50 on a GPU by default, a few seconds at most)."""
        flag = self.signum is not None
        if trainer.world_size == 1 or self._agreed:
            return flag or self._agreed
        if batch_idx is not None and (batch_idx + 1) % max(1, trainer.log_every_n_steps):
            return False  # (no batch_idx: once per validation, always asked)
        self._agreed = trainer.strategy.reduce_boolean_decision(flag, all=False)  # (once true, true everywhere)
        return self._agreed

    def _save(self, trainer, mid_validation: bool = False) -> None:
        checkpoint = trainer.checkpoint_callback
        if trainer.global_step > 0 and hasattr(checkpoint, "write_last"):
            checkpoint.write_last(trainer, mid_validation=mid_validation)

    def _notify_lightning(self, trainer) -> None:
        """Lightning's own SIGTERM handler: it stops the loops at the next boundary (and relays to DDP ranks).
        Quietly: the fit loop stops after this batch, with no validation first, and `fit` returns."""
        if self._notified:
            return
        self._notified = True
        if self.stop_quietly:
            trainer.should_stop = True
            if not trainer.validating:  # (Lightning validates before an early stop: not after a save mid-training)
                trainer.fit_loop.epoch_loop._skip_next_val = True
            saved = getattr(trainer.checkpoint_callback, "last_model_path", "") or "nothing (no step trained)"
            if trainer.is_global_zero:
                log.info("interrupted by %s: saved %s; resume with trainer.fit(model, datamodule=data,"
                         " ckpt_path=%r)", signal.Signals(self.signum or signal.SIGTERM).name, saved, saved)
            return
        handler = self._previous.get(signal.SIGTERM)
        if callable(handler):
            handler(self.signum or signal.SIGTERM, None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._notified or not self._requested(trainer, batch_idx):
            return
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # mid-window: save once the window's optimizer step has been taken
        self._save(trainer)
        self._notify_lightning(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or self.stop_quietly:
            return  # (quietly: Lightning cuts a validation short only on its SIGTERM; saved at its end instead)
        plan = getattr(trainer.val_dataloaders, "batch_sampler", None)
        if trainer.world_size > 1 and not getattr(plan, "lockstep", False):
            return  # processes with different numbers of validation batches: agree at the validation end only
        if not (self._notified or self._requested(trainer, batch_idx)):
            return
        loop = trainer.fit_loop.epoch_loop
        if loop._should_accumulate() or loop.val_loop.batch_progress.is_last_batch:
            return  # inside an accumulation window: stop after it; last batch: stop at on_validation_end
        self._save(trainer, mid_validation=True)  # the validation is cut short after this batch
        self._notify_lightning(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._notified or not self._requested(trainer):
            return
        if not trainer.fit_loop.epoch_loop._should_accumulate():
            self._save(trainer)  # (MLMCheckpoint ran first: it ranked this validation and wrote last.ckpt)
            self._notify_lightning(trainer)
