"""Checkpoint IO and policy.

- `AtomicCheckpointIO`: every checkpoint is written to a unique temporary name beside it and renamed (never a
  truncated .ckpt, and processes or nodes sharing a directory never write the same temporary file), and loaded
  with `weights_only=True` (no arbitrary unpickling).
- `AsyncAtomicCheckpointIO`: the same, written by a background thread (Lightning's `AsyncCheckpointIO`: the
  tensors are copied on the training thread, so the file holds the state of its step), used on GPUs where a
  1.3 GB bert-base checkpoint would otherwise stall training for seconds.
- `MLMCheckpoint`: the best checkpoint by `val/loss`, chosen after each validation with that validation's
  metrics; `last.ckpt` in a fixed directory (so `--ckpt_path last` finds it) at the end of every fit, every N
  optimizer steps or so often in wall time, and when `GracefulStop` asks for it: written once per save point
  (a save due at a step that ends with a validation waits for it, so the one write also records its result).
  Nothing is saved whose weights are not finite.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Literal

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from mlm_lightning.files import atomic_file
from mlm_lightning.metrics import VAL_LOSS, is_log_step


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = str(path)
        if "://" in path:  # a remote store: Lightning's own fsspec write
            return super().save_checkpoint(checkpoint, path, storage_options)
        # Written straight into our temporary file beside `path` (Lightning's fsspec transaction would first write
        # the whole checkpoint into the system temp dir, then copy it), synced, given the umask's permissions and
        # renamed over `path`: the previous file stays whole until then. A full disk or a read-only directory is
        # reported on `path`.
        with atomic_file(path, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return super().load_checkpoint(path, map_location, weights_only=True if weights_only is None else weights_only)


class AsyncAtomicCheckpointIO(AsyncCheckpointIO):
    """`AtomicCheckpointIO` in Lightning's background thread, plus `wait()` (Lightning waits only at teardown)."""

    def __init__(self, checkpoint_io: AtomicCheckpointIO | None = None):
        super().__init__(checkpoint_io or AtomicCheckpointIO())

    def wait(self) -> None:
        """Block until every save submitted so far is on disk (one worker thread: the saves run in order)."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()
        if self._error:
            raise self._error


def wait_for_saves(trainer) -> None:
    """Block until the checkpoints already asked for are written (a no-op without a background writer)."""
    io = getattr(trainer.strategy, "_checkpoint_io", None)
    if isinstance(io, AsyncAtomicCheckpointIO):
        io.wait()


class MLMCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` with this project's defaults and a `last.ckpt` that never lags behind."""

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "best-{step}",
        monitor: str = VAL_LOSS,
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool = True,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        train_time_interval: timedelta | None = None,
        save_on_interrupt: bool = True,
        async_save: bool | Literal["auto"] = "auto",
    ):
        """Args:
        dirpath: Where checkpoints go. Unset: `<trainer.default_root_dir>/checkpoints`.
        filename: Name pattern of the best checkpoint.
        monitor: Metric that picks the best checkpoint (after each validation, with that validation's value).
        mode: `min` or `max` of `monitor`.
        save_top_k: How many best checkpoints to keep.
        save_last: Keep `last.ckpt` (what `--ckpt_path last` resumes).
        every_n_train_steps: Also refresh `last.ckpt` every N optimizer steps (periodic checkpoints; the best
            checkpoint is still chosen only at validations).
        every_n_epochs: Choose the best checkpoint every N validation epochs (default: after every validation).
        train_time_interval: Also refresh `last.ckpt` so often in wall time.
        save_on_interrupt: On SIGINT/SIGTERM, write `last.ckpt` within seconds and stop (see `stopping.py`).
        async_save: Write checkpoints in a background thread (training goes on while a file is written; the
            state saved is that of its step). FSDP's sharded and DeepSpeed's checkpoints are
            written by the strategy itself, always in the foreground. auto: on CUDA GPUs; true: on any device.
        """
        # Lightning's own step/time triggers would also rank top-k checkpoints at training steps, scored with
        # the *previous* validation's metric: here they only refresh last.ckpt, and top-k follows validations
        super().__init__(
            dirpath=dirpath, filename=filename, monitor=monitor, mode=mode, save_top_k=save_top_k,
            save_last=save_last, every_n_epochs=every_n_epochs, auto_insert_metric_name=True,
        )
        self.last_every_n_steps = every_n_train_steps or 0
        self.last_every = train_time_interval.total_seconds() if train_time_interval else None
        self.save_on_interrupt = save_on_interrupt
        self.async_save = async_save
        self._last_saved: tuple | None = None  # (step, mid_validation, best_model_path) of our last save
        self._last_time = time.monotonic()
        self._mid_validation = False
        self._due: int | None = None  # a save due at this step waits for the validation that follows it

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # atomic writes (in a background thread as `async_save` says) for any Trainer; a checkpoint IO of the
        # strategy's own (FSDP's sharded, DeepSpeed's) or of the user's is kept
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            trainer.strategy.checkpoint_io = checkpoint_io(trainer, self)

    def last_path(self) -> str:
        return os.path.join(self.dirpath, f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")

    def write_last(self, trainer, mid_validation: bool = False) -> None:
        """Write the resumable `last.ckpt` now. `mid_validation`: a validation is under way and will be cut
        short: the checkpoint records it as not yet run, so a resumed fit runs it again."""
        # decided from in-memory state alone, the same on every process (a per-process look at the disk would
        # differ between nodes without a shared directory, and one process skipping a collective save hangs all)
        step = trainer.global_step
        if self._last_saved == (step, mid_validation, self.best_model_path):
            return  # written at this step already, with this best checkpoint
        if not mid_validation and self._last_saved is not None and self._last_saved[:2] == (step, True):
            return  # the checkpoint of a validation cut short stands: a resumed fit runs that validation again
        self._check_finite(trainer)
        # set first: the saved callback state must name last.ckpt, or a resumed run would write last-v1.ckpt
        self.last_model_path = self.last_path()
        self._mid_validation = mid_validation
        try:
            trainer.save_checkpoint(self.last_path(), weights_only=False)  # full state: resumable
        finally:
            self._mid_validation = False
        self._last_saved = (step, mid_validation, self.best_model_path)  # (Lightning's own saves come here too)
        self._last_time = time.monotonic()

    @staticmethod
    def _check_finite(trainer) -> None:
        """Never write weights after a NaN (as the "last good" or the best checkpoint): stop instead (exit 3)."""
        check_finite = getattr(trainer.lightning_module, "check_finite", None)
        if check_finite is not None:
            check_finite(weights=True)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        self._check_finite(trainer)  # the top-k (best) checkpoints
        super()._save_checkpoint(trainer, filepath)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        # Lightning refreshes last.ckpt after each new best checkpoint and at the end of a fit: through
        # write_last, so last.ckpt is written once per step whoever asks
        if self.save_last and trainer.global_step > 0:
            self.write_last(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if not self._mid_validation:
            return
        # The validation in progress must be run again on resume. Lightning's restart logic treats a checkpoint
        # whose validation progress shows a batch started but not processed as "restarted mid-evaluation" and
        # runs that validation (from its first batch, its metrics fresh); without this it would skip it.
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
        for counts in (progress["total"], progress["current"]):
            counts["processed"] = counts["completed"]
            counts["started"] = counts["ready"] = counts["completed"] + 1

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # the checkpoint is data: Lightning later deletes or exports the paths it names (old top-k files, the
        # previous last.ckpt), so keep only .ckpt files directly in this run's checkpoint directory
        home = os.path.realpath(self.dirpath) if self.dirpath else None

        def ours(path) -> bool:
            path = str(path or "")
            return bool(home) and path.endswith(".ckpt") and os.path.dirname(os.path.realpath(path)) == home

        self.best_k_models = {p: v for p, v in self.best_k_models.items() if ours(p)}
        for name in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if not ours(getattr(self, name)):
                setattr(self, name, "")
        if not self.best_model_path:
            self.best_model_score = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if not self.save_last or step == 0 or trainer.fit_loop.epoch_loop._should_accumulate():
            return  # never at step 0, never inside a gradient-accumulation window
        periodic = self.last_every_n_steps and step % self.last_every_n_steps == 0
        timed = False
        if self.last_every is not None and is_log_step(trainer):
            # only at log steps, which every process reaches together: each process reads its own clock, and
            # the decision is a collective that every process must enter at the same step
            timed = time.monotonic() - self._last_time >= self.last_every
            if trainer.world_size > 1:
                timed = trainer.strategy.reduce_boolean_decision(timed, all=False)
        # the fit's last batch: saved here, where a resumed run (with more steps or epochs) continues exactly;
        # a save at on_train_end would record the epoch as finished
        # (max_epochs -1 or None: no epoch limit, the steps or the time end the run)
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        final = (trainer.max_steps > 0 and step >= trainer.max_steps) or (
            last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        )
        if periodic or timed or final:
            if _validation_follows(trainer):
                self._due = step  # written once, at that validation's end, with its result
            else:
                self.write_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)  # ranks the validation (and then refreshes last.ckpt)
        if self._due is not None and self._due == trainer.global_step and not trainer.sanity_checking:
            self._due = None
            self.write_last(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        # a fit that ends another way (max_time, early stop) still leaves last.ckpt of its final step
        if self.save_last and trainer.global_step > 0:
            self.write_last(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # after an interrupt last.ckpt was written at a consistent point; after any other exception (a NaN,
        # a crash mid-step) the last good checkpoint stays as it is
        try:
            wait_for_saves(trainer)  # a background write in flight: name the file only once it is there
        except Exception:  # noqa: BLE001 - the write failed: the file it would have replaced is what is left
            pass
        saved = self.dirpath is not None and os.path.exists(self.last_path()) and self.last_model_path
        exception.last_checkpoint = self.last_path() if saved else None


def _validation_follows(trainer) -> bool:
    """Does a validation run right after this training batch? Lightning's own test, asked before it does: it only
    turns from no to yes later in the batch (a clock, a stop request), never from yes to no."""
    loop = trainer.fit_loop.epoch_loop
    val = loop.val_loop
    if loop._skip_next_val or (val._combined_loader is not None and val.skip):
        return False
    return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


def checkpoint_io(trainer, callback: ModelCheckpoint | None):
    """The checkpoint IO for this run: atomic writes, in a background thread on GPUs (or as `async_save` says)."""
    wanted = getattr(callback, "async_save", "auto")
    if wanted in (None, "auto"):
        wanted = isinstance(trainer.accelerator, CUDAAccelerator)
    return AsyncAtomicCheckpointIO() if wanted else AtomicCheckpointIO()
