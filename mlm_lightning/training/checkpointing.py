"""Checkpoint IO and policy.

- `AtomicCheckpointIO`: every checkpoint is written to a unique temporary name beside it and renamed (never a
  truncated .ckpt, and processes or nodes sharing a directory never write the same temporary file), and loaded
  with `weights_only=True` (no arbitrary unpickling).
- `MLMCheckpoint`: the best checkpoint by `val/loss`, chosen after each validation with that validation's
  metrics; `last.ckpt` in a fixed directory (so `--ckpt_path last` finds it) at the end of every fit, every N
  optimizer steps or so often in wall time, and when `GracefulStop` asks for it.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from mlm_lightning.errors import writing


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = str(path)
        if "://" in path:  # a remote store: Lightning's own fsspec write
            return super().save_checkpoint(checkpoint, path, storage_options)
        directory, name = os.path.split(os.path.abspath(path))
        prefix = f".{name}."
        # Written straight into our temporary file beside `path` (Lightning's fsspec transaction would first write
        # the whole checkpoint into the system temp dir, then copy it), synced, then renamed over `path`: the
        # previous file stays whole until then. A full disk or a read-only directory is reported on `path`.
        with writing(path, temporary=(os.path.join(directory, prefix),)):
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)  # ours alone
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600: a checkpoint gets the usual permissions
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return super().load_checkpoint(path, map_location, weights_only=True if weights_only is None else weights_only)


class MLMCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` with this project's defaults and a `last.ckpt` that never lags behind."""

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "best-{step}",
        monitor: str = "val/loss",
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool = True,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        train_time_interval: timedelta | None = None,
        save_on_interrupt: bool = True,
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
        self._last_saved: tuple[int, bool] | None = None  # (step, mid_validation) of our last save
        self._last_time = time.monotonic()
        self._mid_validation = False

    def last_path(self) -> str:
        return os.path.join(self.dirpath, f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")

    def write_last(self, trainer, mid_validation: bool = False) -> None:
        """Write the resumable `last.ckpt` now. `mid_validation`: a validation is under way and will be cut
        short: the checkpoint records it as not yet run, so a resumed fit runs it again."""
        # decided from in-memory state alone, the same on every process (a per-process look at the disk would
        # differ between nodes without a shared directory, and one process skipping a collective save hangs all)
        if self._last_saved == (trainer.global_step, mid_validation):
            return
        if not mid_validation and self.save_last and self._last_global_step_saved == trainer.global_step:
            return  # Lightning's own save at this step (a validation end) wrote last.ckpt already
        check_finite = getattr(trainer.lightning_module, "check_finite", None)
        if check_finite is not None:
            check_finite()  # never write weights after a NaN as the "last good" checkpoint
        # set first: the saved callback state must name last.ckpt, or a resumed run would write last-v1.ckpt
        self.last_model_path = self.last_path()
        self._mid_validation = mid_validation
        try:
            trainer.save_checkpoint(self.last_path(), weights_only=False)  # full state: resumable
        finally:
            self._mid_validation = False
        self._last_saved = (trainer.global_step, mid_validation)
        # Lightning's on_train_end writes last.ckpt once more unless it saved one itself: a second write of the
        # whole checkpoint (twice the room on disk), and one that records the epoch as finished
        self._last_checkpoint_saved = self.last_path()
        self._last_time = time.monotonic()

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
        timed = self.last_every is not None and time.monotonic() - self._last_time >= self.last_every
        if timed and trainer.world_size > 1:  # clocks differ: saving is collective, so all decide alike
            timed = trainer.strategy.reduce_boolean_decision(timed, all=False)
        # the fit's last batch: saved here, where a resumed run (with more steps or epochs) continues exactly;
        # a save at on_train_end would record the epoch as finished
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        final = (trainer.max_steps > 0 and step >= trainer.max_steps) or (
            last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        )
        if periodic or timed or final:
            self.write_last(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        # a fit that ends another way (max_time, early stop) still leaves last.ckpt of its final step
        step = trainer.global_step
        saved = (self._last_saved and self._last_saved[0] == step) or self._last_global_step_saved == step
        if self.save_last and step > 0 and not saved:
            self.write_last(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # after an interrupt last.ckpt was written at a consistent point; after any other exception (a NaN,
        # a crash mid-step) the last good checkpoint stays as it is
        saved = self.dirpath is not None and os.path.exists(self.last_path()) and self.last_model_path
        exception.last_checkpoint = self.last_path() if saved else None
