"""`mlm-lightning`: LightningCLI subcommands `fit|validate|test|predict`, plus `export`, `fill-mask` and `serve`.

Every option of `MLMModule` (`--model.*`), `MLMDataModule` (`--data.*`), the Lightning `Trainer`
(`--trainer.*`) and `MLMCheckpoint` (`--checkpoint.*`) comes from their typed signatures; docstrings are
the `--help`. Inputs are validated before the Trainer is built; a bad one is a single line and a non-zero exit.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
import warnings

from mlm_lightning.errors import MLMError, NonFiniteLossError, check

log = logging.getLogger("mlm_lightning")
DEBUG_ENV = "MLM_LIGHTNING_DEBUG"


def _quiet_logging() -> None:
    """Our one-line progress notes on stderr; Lightning's banner lines and known-harmless warnings off."""
    rank = os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mlm-lightning: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == "0" else logging.WARNING)
    log.propagate = False
    from mlm_lightning.tokenizer import quiet_transformers

    quiet_transformers()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed",
                 "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*exists and is not empty.*",
                    ".*`isinstance\\(treespec, LeafSpec\\)`.*", ".*srun.*", ".*The number of training batches.*",
                    ".*args parameter is intended to run from within Python.*", ".*`tensorboardX` has been removed.*"):
        warnings.filterwarnings("ignore", pattern)


class Interrupted(BaseException):
    """SIGINT/SIGTERM before training started (e.g. during tokenization): caches are never half-written."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _early_signal_handler(signum, frame):
    from mlm_lightning.callbacks import MLMCheckpoint

    if not MLMCheckpoint.running:  # during training, MLMCheckpoint and Lightning handle signals
        raise Interrupted(signum)


def build_cli_class():
    import torch
    from lightning.pytorch.cli import LightningCLI

    from mlm_lightning.callbacks import AtomicCheckpointIO, JSONLPredictionWriter, MLMCheckpoint, ThroughputLogger
    from mlm_lightning.data import MLMDataModule
    from mlm_lightning.export import check_checkpoint_path, save_hf
    from mlm_lightning.model import MLMModule

    class MLMCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(MLMCheckpoint, "checkpoint")
            parser.add_lightning_class_args(JSONLPredictionWriter, "prediction_writer")
            parser.add_argument("--export_dir", type=str | None, default=None,
                                help="fit: where the best model is exported in Hugging Face format"
                                " (default: <trainer.default_root_dir>/export)")

        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads the checkpoint's hyperparameters here, before any other hook: check it first
            subcommand = self.config.get("subcommand")
            ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt and ckpt not in ("last", "best", "hpc"):
                check_checkpoint_path(ckpt)
            super()._parse_ckpt_path()

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand]
            trainer, data, model = cfg.trainer, cfg.data, cfg.model
            if cfg.checkpoint.dirpath is None:
                cfg.checkpoint.dirpath = os.path.join(trainer.default_root_dir or ".", "checkpoints")
            if data.tokenizer is None and model.model_name_or_path:
                data.tokenizer = model.model_name_or_path
            _check_accelerator(torch, trainer.accelerator, trainer.devices)
            if model.model_name_or_path:
                from transformers import AutoConfig

                from mlm_lightning.tokenizer import load_pretrained

                positions = load_pretrained(AutoConfig, model.model_name_or_path, "model_name_or_path")
                positions = positions.max_position_embeddings
            else:
                positions = model.max_position_embeddings
            check(
                data.max_length <= positions,
                f"max_length {data.max_length} is beyond the model's {positions} position embeddings;"
                f" use --data.max_length {positions} or less",
            )

        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            trainer.callbacks.append(ThroughputLogger())
            if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
                trainer.strategy.checkpoint_io = AtomicCheckpointIO()
            return trainer

        def before_fit(self) -> None:
            trainer = self.trainer
            log.info(
                "training on %s x%s, precision %s; checkpoints in %s", trainer.accelerator.__class__.__name__
                .removesuffix("Accelerator").lower(), trainer.num_devices, trainer.precision,
                trainer.checkpoint_callback.dirpath,
            )

        def after_fit(self) -> None:
            trainer = self.trainer
            ckpt_cb = trainer.checkpoint_callback
            if not trainer.is_global_zero or trainer.global_step == 0:
                return
            history = getattr(self.model, "val_ppl_history", [])
            if history:
                log.info("val/ppl: %.1f (step %d) -> %.1f (step %d)", history[0][1], history[0][0],
                         history[-1][1], history[-1][0])
            best = ckpt_cb.best_model_path or ckpt_cb.last_model_path
            export_dir = self.config[self.subcommand].export_dir or os.path.join(trainer.default_root_dir, "export")
            if best and os.path.exists(best):
                from mlm_lightning.export import load_checkpoint

                model, tokenizer = load_checkpoint(best)
                path = save_hf(model, tokenizer, export_dir)
                which = "best" if ckpt_cb.best_model_path else "last (no validation ran)"
                log.info("%s checkpoint: %s", which, best)
                log.info("exported that model (Hugging Face format) to %s", path)
                print(path)

    return MLMCLI, MLMModule, MLMDataModule


def _check_accelerator(torch, accelerator, devices) -> None:
    name = str(accelerator).lower()
    if name in ("gpu", "cuda"):
        check(
            torch.cuda.is_available(),
            f"--trainer.accelerator {name} was asked for but this machine has no usable CUDA GPU"
            f" (torch {torch.__version__}); use --trainer.accelerator cpu (or auto)",
        )
        if isinstance(devices, int) and devices > 0:
            count = torch.cuda.device_count()
            check(devices <= count, f"--trainer.devices {devices} but only {count} GPU(s) are visible")
    if name == "mps":
        check(torch.backends.mps.is_available(), "--trainer.accelerator mps asked for but MPS is not available")


def run_lightning_cli(argv: list[str]) -> None:
    cli_class, module_class, datamodule_class = build_cli_class()
    cli_class(
        module_class,
        datamodule_class,
        args=argv,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},
        trainer_defaults={
            "default_root_dir": "runs",
            "max_epochs": 60,  # sized for the offline default corpus (~106k tokens): set yours
            "log_every_n_steps": 1,  # short runs log too; the loss is synced every step anyway (NaN check)
            "gradient_clip_val": 1.0,
            "use_distributed_sampler": False,  # our BatchPlan shards batches across processes itself
        },
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    _quiet_logging()
    previous = {s: signal.signal(s, _early_signal_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if argv[:1] == ["export"]:
            from mlm_lightning.predict import export_main

            return export_main(argv[1:])
        if argv[:1] == ["fill-mask"]:
            from mlm_lightning.predict import fill_mask_main

            return fill_mask_main(argv[1:])
        if argv[:1] == ["serve"]:
            from jsonargparse import ArgumentParser

            from mlm_lightning.serve import serve

            parser = ArgumentParser(prog="mlm-lightning serve", description="Serve fill-mask over HTTP and a web page.")
            parser.add_function_arguments(serve)
            return serve(**parser.parse_args(argv[1:]).as_dict())
        run_lightning_cli(argv)
    except BaseException as e:  # noqa: BLE001 - every failure becomes one line and an exit code
        if type(e) is SystemExit:  # --help, serve's 130/143: exit as is, without _describe's slow Lightning import
            raise
        code, message = _describe(e)
        if code is None or debug:
            raise
        if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0":  # once, not once per DDP process
            print(f"mlm-lightning: {message}", file=sys.stderr)
        sys.exit(code)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _describe(e: BaseException) -> tuple[int | None, str]:
    """Map an exception to (exit code, one-line message); (None, _) re-raises it."""
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(e, SystemExit) and not isinstance(e, SIGTERMException):
        return None, ""
    if isinstance(e, (SIGTERMException, Interrupted, KeyboardInterrupt)):
        from mlm_lightning.callbacks import MLMCheckpoint

        signum = getattr(e, "signum", None) or MLMCheckpoint.last_signum or signal.SIGINT
        name = signal.Signals(signum).name
        saved = getattr(e, "last_checkpoint", None)
        if saved:
            return 128 + signum, f"interrupted by {name}; saved {saved}; resume: the same command plus --ckpt_path last"
        return 128 + signum, f"interrupted by {name}; no training step to save, nothing left half-written"
    if isinstance(e, NonFiniteLossError):
        saved = getattr(e, "last_checkpoint", None)
        kept = f"last good checkpoint kept: {saved}" if saved else "no checkpoint had been written yet"
        return e.exit_code, f"error: {e} ({kept})"
    if isinstance(e, MLMError):
        return e.exit_code, f"error: {e}"
    if isinstance(e, ArgumentError):
        text = " ".join(str(e).split())
        return 2, f"error: {text[:400]}; see mlm-lightning fit --help"
    if isinstance(e, ValueError) and e.__traceback__ is not None:
        where = traceback.extract_tb(e.__traceback__)[-1].filename
        if f"{os.sep}lightning{os.sep}" in where:  # Lightning's own check of a trainer option
            return 2, f"error: {' '.join(str(e).split())}"
    if isinstance(e, MisconfigurationException):
        return 2, f"error: {str(e).splitlines()[0]}"
    return None, ""


if __name__ == "__main__":
    main()
