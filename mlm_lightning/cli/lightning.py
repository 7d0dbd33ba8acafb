"""LightningCLI subcommands `fit|validate|test|predict` on `MLMModule` + `MLMDataModule`.

Every option of `MLMModule` (`--model.*`), `MLMDataModule` (`--data.*`), the Lightning `Trainer`
(`--trainer.*`) and `MLMCheckpoint` (`--checkpoint.*`) comes from their typed signatures; docstrings are
the `--help`. Inputs are validated before the Trainer is built; a bad one is a single line and a non-zero exit.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Literal

import torch
import torch.distributed as dist
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from mlm_lightning.cli import options
from mlm_lightning.cli.defaults import CORPUS_EPOCHS, adjusted_defaults, on_gpu, was_given
from mlm_lightning.cli.rank import process_rank
from mlm_lightning.data import MLMDataModule
from mlm_lightning.data.remote import redacted
from mlm_lightning.errors import MLMError, NothingToDo, check
from mlm_lightning.export import FORMATS, check_export_dir
from mlm_lightning.export import export as export_checkpoint
from mlm_lightning.files import atomic_path
from mlm_lightning.metrics import VAL_ACC, VAL_PPL
from mlm_lightning.model import MLMModule
from mlm_lightning.model.arch import usable_positions
from mlm_lightning.model.checkpoint import (
    carried_tokenizer,
    check_checkpoint_path,
    check_model_dir,
    check_model_dir_fits,
    verified_checkpoint,
)
from mlm_lightning.model.pairing import default_length, paired_options
from mlm_lightning.onnx_export import check_onnx_available
from mlm_lightning.training.callbacks import JSONLPredictionWriter, ThroughputLogger
from mlm_lightning.training.checkpointing import MLMCheckpoint
from mlm_lightning.training.plot import metrics_files, plot_runs, with_csv_log
from mlm_lightning.training.progress import CompactModelSummary, RunReport, duration, progress_bar
from mlm_lightning.training.rundir import own_run_dir, release_run_dirs
from mlm_lightning.training.setup import RunSetup
from mlm_lightning.training.stopping import GracefulStop

log = logging.getLogger("mlm_lightning")


class RedactedConfig(SaveConfigCallback):
    """Lightning's `config.yaml` beside the logs, with the secret-looking `--data.storage_options` values (keys,
    secrets, tokens) masked, as in the checkpoints' hyperparameters, and so the trackers' (`--trainer.logger`: an
    `api_key`, a token, a password in a URL): the run itself keeps the real ones.

    Written aside and renamed (`files.atomic_path`: whole or not at all, with the umask's permissions), where
    Lightning's own `setup` writes it in place."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        real = self.config
        options = real.get("data.storage_options") if hasattr(real, "get") else None
        trackers = real.get("trainer.logger") if hasattr(real, "get") else None
        if options or trackers:
            self.config = real.clone()
            if options:
                self.config["data.storage_options"] = redacted(options)
            if trackers:
                self.config["trainer.logger"] = _redacted_options(trackers)
        try:
            if self.already_saved or not self.save_to_log_dir:
                return super().setup(trainer, pl_module, stage)
            log_dir = trainer.log_dir  # (this broadcasts the directory)
            if "://" in str(log_dir):
                return super().setup(trainer, pl_module, stage)  # a remote log dir: Lightning's fsspec write
            if trainer.is_global_zero:
                with atomic_path(os.path.join(log_dir, self.config_filename), suffix=".yaml") as tmp:
                    self.parser.save(self.config, tmp, skip_none=False, overwrite=True, multifile=self.multifile)
                self.save_config(trainer, pl_module, stage)
                self.already_saved = True
            self.already_saved = trainer.strategy.broadcast(self.already_saved)
        finally:
            self.config = real


_URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^/@\s]+@")


def _redacted_options(value, key: str = ""):
    """`redacted`'s rule through a logger's options (jsonargparse Namespaces, dicts, lists): a text under a
    secret-looking key, and a password in a URL, masked; None, numbers and flags kept as typed (the saved config
    still parses)."""
    if isinstance(value, Namespace):
        out = value.clone()
        for k, v in vars(value).items():
            out[k] = _redacted_options(v, k)
        return out
    if isinstance(value, dict):
        return {k: _redacted_options(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redacted_options(v, key) for v in value)
    if isinstance(value, str):  # (`redacted` decides which keys are secret)
        return redacted({key: _URL_PASSWORD.sub(r"\1***@", value)})[key]
    return value


class MLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(MLMCheckpoint, "checkpoint")
        parser.add_lightning_class_args(JSONLPredictionWriter, "prediction_writer")
        parser.add_argument("--export_dir", type=str | None, default=None,
                            help="fit: where the best model is exported in Hugging Face format"
                            " (default: <trainer.default_root_dir>/export)")
        parser.add_argument("--export.license", type=str | None, default=None,
                            help="fit: the license in the exported model card's metadata (a hub id, e.g. apache-2.0)")
        parser.add_argument("--export.format", type=Literal[FORMATS], default="hf",
                            help="fit: hf (a Hugging Face directory), or onnx: the same plus model.onnx")

    def parse_arguments(self, parser, args) -> None:
        self.argv = list(args)  # (the model card shows the command line, masked)
        options.refuse_optimizer_options(args)
        _check_config_files(args)
        # Defaults that depend on other options (see defaults.py) are applied right after parsing.
        # `--print_config` prints inside jsonargparse's parse, before any LightningCLI hook, so it is
        # held back and asked for again with the adjusted values appended as explicit options.
        printing = [a for a in args if a == "--print_config" or a.startswith("--print_config=")]
        plain = [a for a in args if a not in printing]
        command = args[0] if args and args[0] in self._subcommand_parsers else None
        if command:  # (the same check as the CLI's early one, which runs when the options are cached)
            spec = options.spec_of(self._subcommand_parsers[command])
            options.check(args[1:], spec, command)
            if process_rank() == 0 and options.load(command) is None:
                options.store(command, spec)
        try:
            super().parse_arguments(parser, plain)
        except ArgumentError as e:  # (the same options in a --config file)
            name = next((n for n in options.FOREIGN_OPTIONS if f"option '{n}" in str(e)), None)
            if name is None:
                raise
            raise MLMError(f"{name} (in a --config file) is not an option of mlm-lightning:"
                           f" {options.FOREIGN_OPTIONS[name]} (see mlm-lightning fit --help)") from None
        sub = self.config.get("subcommand")
        if not sub:
            return
        self.given = None  # what the user set (command line or --config): _parse_ckpt_path names what it replaces
        try:
            self.given = parser.parse_args(plain, defaults=False)[sub]
            changes = adjusted_defaults(self.config[sub], self.given, default_length, sub)
        except ArgumentError:  # cannot tell what the user set: change nothing rather than override them
            log.warning("could not tell which options were set; no defaults adjusted (see --print_config)")
            changes = {}
        for key, (value, _) in changes.items():
            self.config[sub][key] = value
        if changes and process_rank() == 0:
            log.info("defaults for this run: %s; set them to change", ", ".join(
                f"--{k} {'null' if v is None else v} ({why})" for k, (v, why) in changes.items()))
        if printing:
            super().parse_arguments(parser, args + [f"--{k}={v if isinstance(v, str) else json.dumps(v)}"
                                                    for k, (v, _) in changes.items()])  # (a str is taken as typed)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters here, before any other hook (before tokenizing): the
        # file is checked first, `last` resolved as Lightning will, and the options it replaces named or refused
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else None
        ckpt = cfg.get("ckpt_path") if cfg else None
        if ckpt == "last":
            ckpt = last_checkpoint(cfg.checkpoint.dirpath or os.path.join(cfg.trainer.default_root_dir or ".",
                                                                          "checkpoints"))
        elif ckpt and ckpt not in ("best", "hpc"):
            check_checkpoint_path(ckpt)
        if not ckpt or ckpt in ("best", "hpc"):
            return
        if os.path.isdir(ckpt):
            strategy = str(cfg.trainer.strategy).lower()
            check(
                "fsdp" in strategy or "deepspeed" in strategy,
                f"{ckpt!r} is a sharded checkpoint directory: resume it with the strategy that wrote it"
                " (--trainer.strategy fsdp or deepspeed), or turn it into a model with mlm-lightning export",
            )
            return
        contents = verified_checkpoint(ckpt, resumable=sub == "fit")
        if sub == "fit":
            _check_something_to_train(contents, ckpt, cfg.trainer)
        hparams = contents.get("hyper_parameters")
        if isinstance(hparams, dict) and hparams:
            self._resume_hparams(sub, ckpt, hparams)
        cfg = self.config[sub]
        if cfg.data.tokenizer is None and not cfg.model.model_name_or_path:
            # the vocabulary is the checkpoint's own, not whatever a cache holds under the corpus's key (which may be
            # gone, or trained anew): nothing is trained, and the corpus is tokenized with this one
            self._check_tokenizer_options(cfg, ckpt, contents.get("datamodule_hyper_parameters"))
            self.carried_tokenizer = carried_tokenizer(contents, ckpt)
            if process_rank() == 0:
                log.info("%s %s with the tokenizer it carries", "resuming" if sub == "fit" else "running", ckpt)

    def _check_tokenizer_options(self, cfg, ckpt: str, saved) -> None:
        """The options that shape a trained vocabulary cannot change with the checkpoint's own tokenizer: one the
        user set to another value than the checkpoint's is refused (rather than silently not applied)."""
        if not isinstance(saved, dict):
            return
        given = getattr(self, "given", None)
        for key in ("vocab_size", "tokenizer_kind", "lowercase", "tokenizer_sample_mb"):
            if was_given(given, f"data.{key}") and key in saved and not _same(cfg.data[key], saved[key]):
                raise MLMError(f"--data.{key} {cfg.data[key]} cannot change on resume: checkpoint {ckpt!r} was trained"
                               f" with another tokenizer ({key} {saved[key]}), which it carries; drop the option, or"
                               " start a new run without --ckpt_path")

    def _resume_hparams(self, sub: str, ckpt: str, hparams: dict) -> None:
        """The checkpoint's model options replace the configured ones (as LightningCLI does), except how-to-run
        options the user set; a given model size that differs is refused, any other given option it replaces is
        named with both values."""
        model = self.config[sub].model
        hparams = {k: v for k, v in hparams.items() if k in model}  # only options this version has (it is data)
        replaced = []
        for key, saved in list(hparams.items()):
            given = getattr(self, "given", None)
            if given is None or f"model.{key}" not in given or _same(model[key], saved):
                continue
            check(key not in FIXED_ON_RESUME,
                  f"--model.{key} {model[key]} cannot change on resume: checkpoint {ckpt!r} was trained with"
                  f" {saved}; drop the option, or start a new run without --ckpt_path")
            if key in KEPT_ON_RESUME:
                del hparams[key]  # how to run, not what was trained: the user's value
            else:
                replaced.append(f"--model.{key} {saved} (you gave {model[key]})")
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except ArgumentError as e:
            raise MLMError(f"checkpoint {ckpt!r} holds model options this version cannot take"
                           f" ({' '.join(str(e).split())[:200]})") from None
        if replaced and process_rank() == 0:
            log.info("resuming %s: the checkpoint's own %s; the resumed optimizer and schedule carry them (start a"
                     " new run to change them)", ckpt, ", ".join(replaced))

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        carried = getattr(self, "carried_tokenizer", None)
        if carried is not None and isinstance(self.datamodule, MLMDataModule):
            self.datamodule.tokenizer = carried  # (MLMDataModule.load_tokenizer: a tokenizer it has is used)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        trainer, data, model = cfg.trainer, cfg.data, cfg.model
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = os.path.join(trainer.default_root_dir or ".", "checkpoints")
        if model.model_name_or_path:  # before anything is tokenized or loaded
            own = data.tokenizer in (None, model.model_name_or_path)
            check_model_dir(model.model_name_or_path, "--model.model_name_or_path", tokenizer=own)
        # a pretrained model's own tokenizer, a new model's tokenizer kind (a kind or tokenizer the user chose is
        # theirs; an unknown architecture is MLMModule's to refuse)
        paired = paired_options(dict(model.items()), dict(data.items()), lambda key: was_given(self.given, key))
        for key in ("data.tokenizer", "data.tokenizer_kind"):
            if key in paired and (key != "data.tokenizer" or data.tokenizer is None):
                data[key.split(".")[1]] = paired[key][0]
        if model.model_name_or_path and not cfg.get("ckpt_path"):
            check_model_dir_fits(model.model_name_or_path, data.tokenizer)
        _check_accelerator(trainer.accelerator, trainer.devices)
        if self.subcommand == "fit":  # (Lightning would train forever, and the LR schedule would have no end)
            check(
                trainer.max_epochs != -1 or trainer.max_steps not in (None, -1) or trainer.max_time is not None,
                "the run has no end: --trainer.max_epochs -1 and no --trainer.max_steps or --trainer.max_time;"
                " set one of them (e.g. --trainer.max_time 00:12:00:00 for 12 hours)",
            )
            check(trainer.max_steps != 0 and trainer.max_epochs != 0,
                  f"--trainer.max_{'steps' if trainer.max_steps == 0 else 'epochs'} 0 trains nothing; give a positive"
                  " number (to measure a model without training: mlm-lightning validate)")
        positions = usable_positions(model.model_name_or_path) if model.model_name_or_path else \
            model.max_position_embeddings
        check(
            data.max_length <= positions,
            f"max_length {data.max_length} is beyond the model's {positions} position embeddings;"
            f" use --data.max_length {positions} or less",
        )

    def instantiate_trainer(self, **kwargs):
        # our progress bar and model summary stand in for Lightning's defaults, unless the user chose
        # their own or turned them off (Lightning refuses a bar callback with enable_progress_bar false)
        cfg = self._get(self.config_init, "trainer", default={})
        chosen = cfg.get("callbacks") or []
        extra = []
        if cfg.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in chosen):
            extra.append(progress_bar(refresh_rate=10 if on_gpu(cfg.get("accelerator")) else 1))
        if cfg.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in chosen):
            extra.append(CompactModelSummary())
        self.trainer_defaults["callbacks"] = extra
        # Lightning's default is TensorBoard when it is installed; the CSV log (metrics.csv, the plot's source) stays,
        # beside any tracker the user chose
        kwargs.setdefault("logger", with_csv_log(cfg.get("logger"), cfg.get("default_root_dir") or "."))
        trainer = super().instantiate_trainer(**kwargs)
        # after the checkpoint callback (Lightning puts it last at init): GracefulStop asks it to save
        trainer.callbacks += [RunSetup(), ThroughputLogger(), RunReport(), GracefulStop()]
        return trainer  # (MLMCheckpoint.setup gives the strategy the atomic checkpoint IO)

    def before_fit(self) -> None:
        self.fit_started = time.perf_counter()
        trainer = self.trainer
        # first: nothing is written into the run directory before it is ours (config.yaml, logs, checkpoints,
        # the export; the corpus is tokenized later, in trainer.fit); a fit already running there is named
        own_run_dir(trainer.default_root_dir, trainer.global_rank)
        check_export_dir(self._export_dir(), self._run_dirs())  # refused now, not after hours of training
        if self.config[self.subcommand].export.format == "onnx":
            check_onnx_available()
        last = trainer.checkpoint_callback.last_path()
        check(
            self.config[self.subcommand].get("ckpt_path") is not None or not os.path.exists(last),
            f"{last} is another run's checkpoint and a new fit would overwrite it: resume it with"
            " --ckpt_path last, or pick another --trainer.default_root_dir",
        )
        log.info(
            "training on %s: %d process%s (%d node%s x %d device%s), precision %s; checkpoints in %s",
            trainer.accelerator.__class__.__name__.removesuffix("Accelerator").lower(), trainer.world_size,
            "es" if trainer.world_size > 1 else "", trainer.num_nodes, "s" if trainer.num_nodes > 1 else "",
            trainer.num_devices, "s" if trainer.num_devices > 1 else "", trainer.precision,
            trainer.checkpoint_callback.dirpath,
        )

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero or trainer.global_step == 0:
            return
        report = next((c for c in trainer.callbacks if isinstance(c, RunReport)), None)
        if report is not None and report.start_time is not None:
            log.info("fit done in %s: %s", duration(time.perf_counter() - self.fit_started), report.summary())
        history = getattr(self.model, "val_ppl_history", [])
        if history:
            best = min(history, key=lambda h: h[1])
            log.info("val/ppl: %.1f (step %d) -> %.1f (step %d), best %.1f (step %d)", history[0][1],
                     history[0][0], history[-1][1], history[-1][0], best[1], best[0])
        self._export_best()
        root = trainer.default_root_dir
        dirs = [lg.log_dir for lg in trainer.loggers if getattr(lg, "log_dir", None)]
        if dirs:
            log.info("logs: %s", ", ".join(dirs))
        self._plot(root)

    def _export_dir(self) -> str:
        return self.config[self.subcommand].export_dir or os.path.join(self.trainer.default_root_dir, "export")

    def _run_dirs(self) -> tuple[str, ...]:
        """What an export must never contain: the run's checkpoints and logs."""
        dirs = [self.trainer.checkpoint_callback.dirpath]
        for logger in self.trainer.loggers:
            dirs += [getattr(logger, "root_dir", None), getattr(logger, "log_dir", None)]
        return tuple(str(d) for d in dirs if d)

    def _export_best(self) -> None:
        trainer = self.trainer
        ckpt_cb = trainer.checkpoint_callback
        best = ckpt_cb.best_model_path or ckpt_cb.last_model_path
        log.info("checkpoints: %s", ckpt_cb.dirpath)
        if best and os.path.exists(best):
            options = self.config[self.subcommand].export
            path = export_checkpoint(best, self._export_dir(), options.license, options.format, self.argv,
                                     self._card_facts(), self._run_dirs())
            which = "best" if ckpt_cb.best_model_path else "last (no validation ran)"
            log.info("%s checkpoint: %s", which, best)
            log.info("exported that model (Hugging Face format) to %s", path)
            print(path)

    def _card_facts(self) -> dict:
        """What the run knows beyond its checkpoint: the last validation's metrics and the tokens seen."""
        facts = {}
        for key in (VAL_PPL, VAL_ACC):
            value = self.trainer.callback_metrics.get(key)
            if value is not None:
                facts[key] = float(value)
        report = next((c for c in self.trainer.callbacks if isinstance(c, RunReport)), None)
        if report is not None and report.total_tokens:
            facts["tokens"] = int(report.total_tokens)
        return facts

    def _plot(self, root: str) -> None:
        if not metrics_files(root):
            log.info("plot: none (no CSV log in %s/lightning_logs; draw one with mlm-lightning plot)", root)
            return
        try:
            log.info("plot: %s", plot_runs([root], os.path.join(root, "plot.png")))
        except MLMError as e:  # e.g. a user's own plot.png in the way: the fit itself succeeded
            log.warning("plot not written: %s", e)


# model options that shape the weights: a checkpoint's weights fit only its own
FIXED_ON_RESUME = ("model_name_or_path", "architecture", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "intermediate_size", "max_position_embeddings")
# how to run, not what is trained: a resumed run takes the user's value
KEPT_ON_RESUME = ("compile", "skip_nonfinite", "skip_nonfinite_limit", "sparse_head", "attn_implementation",
                  "fused_optimizer")


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def last_checkpoint(dirpath: str) -> str | None:
    """What Lightning's `ckpt_path="last"` loads: the newest `last*.ckpt` in the checkpoint directory."""
    try:
        names = [n for n in os.listdir(dirpath) if n.startswith("last") and n.endswith(".ckpt")]
    except (FileNotFoundError, NotADirectoryError):
        return None
    paths = [os.path.join(dirpath, n) for n in names]
    return max(paths, key=os.path.getmtime) if paths else None


def _check_something_to_train(saved: dict, ckpt: str, trainer) -> None:
    """A finished run resumed is said to be finished (Lightning would make an empty version_N and export again)."""
    step = saved.get("global_step")
    try:
        epochs = int(saved["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        epochs = None
    for option, limit, done, unit in (("max_steps", trainer.max_steps, step, "step"),
                                      ("max_epochs", trainer.max_epochs, epochs, "epochs done")):
        if limit not in (None, -1) and isinstance(done, int) and done >= limit:
            raise NothingToDo(f"the run already reached --trainer.{option} {limit} ({ckpt}: {unit} {done}): nothing"
                              f" to train; raise --trainer.{option} to train on")


def _check_config_files(args) -> None:
    """A `--config FILE` that is not YAML, or not a mapping of options, is refused naming the file, the place and
    the shape expected (jsonargparse's own errors name neither)."""
    import yaml

    paths = [b for a, b in zip(args, args[1:], strict=False) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    shape = "a mapping of options, e.g. `trainer:` then `  max_steps: 1000` on the next line, indented by spaces"
    for path in paths:
        if not os.path.isfile(path):
            continue  # (jsonargparse says it does not exist, or takes it as inline YAML)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise MLMError(f"config file {path!r} is not UTF-8 text; a config is YAML: {shape}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            tab = " (YAML indents with spaces, never tabs)" if "\t" in text else ""
            problem = " ".join(str(getattr(e, "problem", None) or e).split())
            raise MLMError(f"config file {path!r} is not valid YAML{where}: {problem}{tab}; a config is {shape}") \
                from None
        check(loaded is None or isinstance(loaded, dict),
              f"config file {path!r} holds a {type(loaded).__name__}, not options; a config is {shape}")


def _check_accelerator(accelerator, devices) -> None:
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


def _cli_kwargs() -> dict:
    """How `mlm-lightning` builds its LightningCLI: the one place, for a run and for `parser`."""
    return dict(
        model_class=MLMModule,
        datamodule_class=MLMDataModule,
        seed_everything_default=42,
        save_config_callback=RedactedConfig,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # MLMModule.configure_optimizers builds AdamW and its schedule
        parser_kwargs={"exit_on_error": False},
        trainer_defaults={
            "default_root_dir": "runs",
            "max_epochs": CORPUS_EPOCHS,  # the offline demo gets its recipe's budget from defaults.py
            "log_every_n_steps": 1,  # short CPU runs log every step (a GPU logs every 50: defaults.py)
            "gradient_clip_val": 1.0,
            "use_distributed_sampler": False,  # our BatchPlan shards batches across processes itself
        },
    )


class _Built(Exception):
    def __init__(self, parser):
        self.parser = parser


class _ParserOnly(MLMCLI):
    """LightningCLI up to its parser: `LightningCLI.__init__` builds the parser and parses at once, with no hook
    in between, so the parse is where it stops."""

    def parse_arguments(self, parser, args) -> None:
        raise _Built(self._subcommand_parsers)


def parser(command: str):
    """The full jsonargparse parser of a Lightning subcommand (fit, validate, test, predict), every option."""
    try:
        _ParserOnly(**_cli_kwargs(), args=[])
    except _Built as built:
        sub = built.parser[command]
        sub.prog = f"mlm-lightning {command}"
        return sub
    raise AssertionError("LightningCLI parsed without calling parse_arguments")


def run_lightning_cli(argv: list[str]) -> None:
    try:
        MLMCLI(**_cli_kwargs(), args=argv)
    finally:
        release_run_dirs()
        close_process_group()


def close_process_group() -> None:
    """Destroy the process group while the interpreter is whole (Lightning does so only for NCCL, at exit): a gloo
    group left to interpreter finalization can abort a process that has finished its work ("terminate called
    without an active exception", exit -6: pytorch/pytorch#190489).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
