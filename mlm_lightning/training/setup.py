"""`RunSetup`: what Lightning leaves to the user for a fit to run on many processes and any corpus.

- FSDP: one FSDP unit per encoder layer (the module's `layer_classes`, any family), so each layer's all-gather
  overlaps the compute of the one before and only one layer's full weights are held at a time; the embeddings and
  the tied MLM head stay in the root unit. Without a policy Lightning wraps the whole model as one unit. A policy
  given by the user is kept. (Clipping through the FSDP root: `MLMModule.configure_gradient_clipping`.)
- DeepSpeed: its engine steps the optimizer, so `skip_nonfinite`'s skipped step cannot be enforced: refused.
- Lightning 2.6 decides a time-based `val_check_interval` on each process's own clock: with several processes
  some would validate (a collective) and others not, and all would hang. Refused; a step interval works.
- `check_val_every_n_epoch: null` with a step `val_check_interval` larger than an epoch validates every epoch
  (the interval is capped to the epoch): a config written for a big corpus also runs on a small one.
"""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from mlm_lightning.errors import check

log = logging.getLogger("mlm_lightning")


class EncoderLayerPolicy:
    """FSDP auto-wrap policy (FSDP's callable form): wrap each encoder layer of `pl_module.model`. The layer
    classes are looked up when FSDP wraps, after `configure_model` has built the network."""

    def __init__(self, pl_module):
        self.pl_module = pl_module
        self._classes: tuple[type, ...] | None = None

    def __call__(self, module, recurse: bool, nonwrapped_numel: int = 0, **kwargs) -> bool:
        if recurse:
            return True  # look inside every module
        if self._classes is None:
            self._classes = tuple(self.pl_module.layer_classes())
        return isinstance(module, self._classes)


class RunSetup(Callback):
    def setup(self, trainer, pl_module, stage: str) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, FSDPStrategy) and "auto_wrap_policy" not in strategy.kwargs:
            strategy.kwargs["auto_wrap_policy"] = EncoderLayerPolicy(pl_module)
        if stage != "fit":
            return
        check(
            not (isinstance(strategy, DeepSpeedStrategy) and getattr(pl_module.hparams, "skip_nonfinite", False)),
            "--model.skip_nonfinite is not supported with DeepSpeed (its engine steps the optimizer); leave it off"
            " (a NaN/inf loss then stops the run, exit 3) or use --trainer.strategy ddp or fsdp",
        )
        check(
            trainer.world_size == 1 or getattr(trainer, "_val_check_time_interval", None) is None,
            "a time-based --trainer.val_check_interval is decided by each process's own clock in Lightning 2.6,"
            " which hangs runs of several processes; give it in steps (e.g. --trainer.val_check_interval 2000"
            " --trainer.check_val_every_n_epoch null)",
        )

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            log.info("device options: %s", ", ".join(f"{k} {v}" for k, v in device_options(trainer, pl_module).items()))
        # with check_val_every_n_epoch null Lightning counts val_check_interval over the whole run, and would never
        # validate a corpus whose run is shorter than it: validate at least once per epoch
        epoch = trainer.fit_loop.max_batches
        if trainer.check_val_every_n_epoch is None and isinstance(trainer.val_check_batch, int) and epoch:
            if isinstance(epoch, int) and trainer.val_check_batch > epoch:
                trainer.val_check_batch = epoch


def device_options(trainer, pl_module) -> dict[str, str]:
    """The choices made for the device (each an option whose `auto` picks it on CUDA GPUs), as resolved for this run:
    the start line names them, so a run on a GPU says what it ran with."""
    def said(value, option) -> str:
        shown = option.replace("True", "true").replace("False", "false")
        return f"{'on' if value else 'off'} ({shown})"

    h = pl_module.hparams
    data = trainer.datamodule
    io = getattr(trainer.strategy, "_checkpoint_io", None)
    callback = trainer.checkpoint_callback
    model = getattr(pl_module, "model", None)
    return {
        "fused AdamW": said(getattr(pl_module, "fused", False), f"--model.fused_optimizer {h.get('fused_optimizer')}"),
        "pinned memory": said(data.pins_memory(), f"--data.pin_memory {data.hparams.get('pin_memory')}")
        if hasattr(data, "pins_memory") else "n/a",
        "async checkpoint saves": said(type(io).__name__.startswith("Async"),
                                       f"--checkpoint.async_save {getattr(callback, 'async_save', 'auto')}"),
        "attention": getattr(getattr(model, "config", None), "_attn_implementation", None) or "n/a",
        "compile": said(h.get("compile"), "--model.compile"),
    }
