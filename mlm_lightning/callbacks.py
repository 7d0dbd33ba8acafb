"""Callbacks and plugins that make runs safe and observable.

- `AtomicCheckpointIO`: every checkpoint is written aside and renamed (never a truncated .ckpt), and loaded
  with `weights_only=True` (no arbitrary unpickling).
- `MLMCheckpoint`: best by `val/loss` plus `last.ckpt` in a fixed directory (so `--ckpt_path last` finds it),
  `last.ckpt` at the end of every fit, periodically, and on SIGINT/SIGTERM (then a clean stop).
- `ThroughputLogger`: real tokens/s, padding share and (on GPU) MFU with Lightning's `Throughput`.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import time

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = str(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return super().load_checkpoint(path, map_location, weights_only=True if weights_only is None else weights_only)


class MLMCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` with this project's defaults, and the owner of "nothing lost on interruption".

    SIGINT (the first Ctrl-C) and SIGTERM during `fit` finish the current batch, write `last.ckpt` and stop;
    a second Ctrl-C aborts at once. The signal handler only records the signal. The checkpoint is written
    where Lightning's restart logic expects one: at the next `on_train_batch_end`, or at `on_validation_end`
    when the signal came during validation (which is left to finish). Only then is Lightning's own SIGTERM
    handler told, so it stops the loop (and relays to DDP ranks): a stop never comes without a checkpoint.
    """

    running = False  # a fit with these handlers is under way (the CLI's own handler stands aside)
    last_signum: int | None = None

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
        train_time_interval=None,
        save_on_interrupt: bool = True,
    ):
        """Args:
        dirpath: Where checkpoints go. Unset: `<trainer.default_root_dir>/checkpoints`.
        filename: Name pattern of the best checkpoint.
        monitor: Metric that picks the best checkpoint.
        mode: `min` or `max` of `monitor`.
        save_top_k: How many best checkpoints to keep.
        save_last: Keep `last.ckpt` (what `--ckpt_path last` resumes).
        every_n_train_steps: Also checkpoint every N optimizer steps (periodic checkpoints).
        every_n_epochs: Checkpoint every N epochs (default: after every validation).
        train_time_interval: Checkpoint every so often in wall time.
        save_on_interrupt: On SIGINT/SIGTERM, finish the batch, write `last.ckpt` and stop.
        """
        super().__init__(
            dirpath=dirpath, filename=filename, monitor=monitor, mode=mode, save_top_k=save_top_k,
            save_last=save_last, every_n_train_steps=every_n_train_steps, every_n_epochs=every_n_epochs,
            train_time_interval=train_time_interval, auto_insert_metric_name=True,
        )
        self.save_on_interrupt = save_on_interrupt
        self.signum: int | None = None
        self._deferred = False
        self._previous: dict[int, object] = {}

    def last_path(self) -> str:
        return os.path.join(self.dirpath, f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")

    def _save_last(self, trainer) -> None:
        if self._last_global_step_saved == trainer.global_step and os.path.exists(self.last_path()):
            return
        # set first: the saved callback state must name last.ckpt, or a resumed run would write last-v1.ckpt
        self.last_model_path = self.last_path()
        trainer.save_checkpoint(self.last_path(), weights_only=False)  # full state: resumable
        self._last_global_step_saved = trainer.global_step

    # -- signals ----------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if not self.save_on_interrupt:
            return
        MLMCheckpoint.running, MLMCheckpoint.last_signum = True, None
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum, frame):
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            if self.signum is None and signum == signal.SIGINT and trainer.is_global_zero:
                print("\nmlm-lightning: interrupted; saving a checkpoint after this batch (Ctrl-C again to abort)")
            self.signum = MLMCheckpoint.last_signum = self.signum or signum
            # during validation, let the (short) validation finish: see on_validation_end
            self._deferred = self._deferred or trainer.validating or trainer.sanity_checking

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    def _notify_lightning(self, signum: int) -> None:
        """Lightning's SIGTERM handler: it stops the loop at the next batch boundary (and relays to DDP ranks)."""
        handler = self._previous.get(signal.SIGTERM)
        if callable(handler):
            handler(signum, None)

    @staticmethod
    def _agree(trainer, flag: bool) -> bool:
        """True on every process if it is true on any: saving is collective, so all must decide alike."""
        return trainer.strategy.reduce_boolean_decision(flag, all=False) if trainer.world_size > 1 else flag

    def teardown(self, trainer, pl_module, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        MLMCheckpoint.running = False

    # -- when to save -----------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n, step = self._every_n_train_steps, trainer.global_step
        periodic = self.save_last and n and step % n == 0  # even before the monitored metric exists
        interrupted = self.save_on_interrupt and self._agree(trainer, self.signum is not None and not self._deferred)
        if periodic or interrupted:
            self._save_last(trainer)
        if interrupted:
            self._notify_lightning(self.signum or signal.SIGTERM)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.save_on_interrupt and self._agree(trainer, self._deferred):
            self._deferred = False
            if trainer.global_step > 0:
                self._save_last(trainer)
            self._notify_lightning(self.signum or signal.SIGTERM)  # (after a sanity check: after batch 1, saved)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        # a fit that ends by steps, epochs or time always leaves last.ckpt of its final step
        if self.save_last and trainer.global_step > 0:
            self._save_last(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # after an interrupt last.ckpt was written at the batch boundary; after any other exception (a NaN,
        # a crash mid-step) the last good checkpoint stays as it is
        saved = os.path.exists(self.last_path()) and self.last_model_path
        exception.last_checkpoint = self.last_path() if saved else None


class ThroughputLogger(Callback):
    """Logs `perf/tokens_per_s` (real, non-pad tokens), `perf/pad_share` and, on GPU, `perf/mfu`."""

    def __init__(self, window: int = 20):
        self.window = window

    def on_train_start(self, trainer, pl_module) -> None:
        config = pl_module.model.config
        precision = str(trainer.precision)
        dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
        available = get_available_flops(pl_module.device, dtype) if pl_module.device.type == "cuda" else None
        self.throughput = Throughput(available_flops=available, world_size=trainer.world_size, window_size=self.window)
        n_layers, width = config.num_hidden_layers, config.hidden_size
        # training FLOPs = 6 x (matmul params) per token + attention scores, plus the head at masked tokens
        self.flops_per_token = 6 * 12 * n_layers * width * width
        self.attn_flops_per_token_per_len = 6 * 2 * n_layers * width
        self.head_flops_per_masked = 6 * (width * width + width * config.vocab_size)
        self.dense_head = not pl_module.hparams.sparse_head
        self.start = time.perf_counter()
        self.totals = dict(batches=0, samples=0, lengths=0, padded=0, flops=0.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        t = self.totals
        n_tokens, real = batch["num_tokens"], batch["num_real_tokens"]
        batch_size, seq_len = batch["input_ids"].shape
        n_head = n_tokens if self.dense_head else batch["masked_positions"].numel()
        t["batches"] += 1
        t["samples"] += batch_size
        t["lengths"] += real
        t["padded"] += n_tokens
        t["flops"] += (self.flops_per_token + self.attn_flops_per_token_per_len * seq_len) * n_tokens
        t["flops"] += self.head_flops_per_masked * n_head
        if trainer.global_step % trainer.log_every_n_steps:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.throughput.update(
            time=time.perf_counter() - self.start, batches=t["batches"], samples=t["samples"],
            lengths=t["lengths"], flops=t["flops"],
        )
        metrics = self.throughput.compute()
        out = {"perf/pad_share": 1.0 - t["lengths"] / max(1, t["padded"])}
        if "device/items_per_sec" in metrics:
            out["perf/tokens_per_s"] = metrics["device/items_per_sec"] * trainer.world_size
        if "device/mfu" in metrics:
            out["perf/mfu"] = metrics["device/mfu"]
        pl_module.log_dict(out, batch_size=1)


class JSONLPredictionWriter(BasePredictionWriter):
    """`predict` writes one JSON object per input line, in input order, whatever the number of processes."""

    def __init__(self, output: str | None = None):
        """Args:
        output: The JSONL file to write (default: <trainer.default_root_dir>/predictions.jsonl).
        """
        super().__init__(write_interval="batch")
        self.output = output

    def on_predict_start(self, trainer, pl_module) -> None:
        self.output = self.output or os.path.join(trainer.default_root_dir, "predictions.jsonl")
        os.makedirs(os.path.dirname(os.path.abspath(self.output)), exist_ok=True)
        self._part = open(f"{self.output}.part{trainer.global_rank}", "w", encoding="utf-8")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        for record in prediction:
            self._part.write(json.dumps(record, ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        self._part.close()
        trainer.strategy.barrier("predictions-written")
        if trainer.is_global_zero:
            records = []
            for part in sorted(glob.glob(f"{glob.escape(self.output)}.part*")):
                with open(part, encoding="utf-8") as f:
                    records += [json.loads(line) for line in f]
                os.remove(part)
            records.sort(key=lambda r: r["index"])
            tmp = f"{self.output}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            os.replace(tmp, self.output)
            print(f"mlm-lightning: wrote {len(records)} predictions to {self.output}")
