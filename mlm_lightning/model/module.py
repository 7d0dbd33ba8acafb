"""`MLMModule`: a Hugging Face masked LM (`BertForMaskedLM`, `RobertaForMaskedLM`, ... see `arch.py`) trained
with Lightning.

The network is built in `configure_model()`, after the data module has produced the tokenizer (whose
vocabulary may have just been trained on the corpus). The MLM head and the loss run only at masked
positions (`sparse_head`): the same loss as `model(labels=...)`, without the vocabulary-sized matmul at the ~85%
of positions that carry no label. The weights stay a plain transformers `*ForMaskedLM`.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from mlm_lightning.arguments import RecordsGivenArguments, check_arguments, fspaths, option
from mlm_lightning.data.tokenizer import tokenizer_files
from mlm_lightning.errors import NonFiniteLossError, check
from mlm_lightning.metrics import ACC, LOSS, PPL, TRAIN_LOSS, TRAIN_LR, is_log_step, stage_metric
from mlm_lightning.model import arch, checkpoint, pairing
from mlm_lightning.model.fill_mask import FillMasker, truncation_notice
from mlm_lightning.training.schedules import check_schedule, run_schedule

log = logging.getLogger("mlm_lightning")


class MLMModule(RecordsGivenArguments, L.LightningModule):
    """The masked-language model, trained with Lightning.

    BERT, RoBERTa, DistilBERT, ALBERT, ELECTRA or ModernBERT (pretrained: also XLM-R and CamemBERT); the weights
    stay a plain transformers `*ForMaskedLM` (`module.model`).

    Example::

        import lightning as L
        from mlm_lightning import MLMDataModule, MLMModule

        if __name__ == "__main__":
            data = MLMDataModule(train_files="corpus.txt")      # a vocabulary is trained on the corpus
            model = MLMModule(architecture="bert")             # or MLMModule(model_name_or_path="bert-base-uncased")
            L.Trainer(max_steps=1000).fit(model, datamodule=data)
            model.fill_mask("the cat sat on the [MASK] .")     # the fill-mask pipeline's dicts
            model.export("runs/export")                         # a Hugging Face model dir
            model = MLMModule.load("runs/checkpoints/last.ckpt")  # or an export dir

    With a plain `Trainer` the module brings its callbacks (`configure_callbacks`): Ctrl-C or SIGTERM saves
    `<default_root_dir>/checkpoints/last.ckpt` and stops cleanly, the best and the last checkpoints are kept, and a
    start and an end line are logged. `MLMModule(..., callbacks=False)` leaves the Trainer's own.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        architecture: str = "bert",
        hidden_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        intermediate_size: int = 512,
        max_position_embeddings: int = 512,
        dropout: float = 0.0,
        learning_rate: float = 1e-3,
        head_learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int | float = 0.06,
        schedule: Literal["linear", "cosine", "wsd", "constant"] = "linear",
        decay_share: float = 0.1,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        sparse_head: bool = True,
        compile: bool = False,
        fused_optimizer: bool | Literal["auto"] = "auto",
        attn_implementation: str = "auto",
        skip_nonfinite: bool = False,
        skip_nonfinite_limit: int = 20,
        top_k: int = 5,
        joint: bool = False,
        targets: list[str] | None = None,
        callbacks: bool = True,
    ):
        """A masked-language model: BERT, RoBERTa, XLM-R, CamemBERT, DistilBERT, ALBERT, ELECTRA or ModernBERT.

        Args:
            model_name_or_path: A local Hugging Face directory or a hub id (bert-base-uncased, roberta-base,
                answerdotai/ModernBERT-base, ...) to start from; a headless encoder gets a new MLM head.
                Unset: a new `architecture` with the sizes below, trained from scratch (the defaults: a tiny
                model sized for the offline default run on a CPU).
            architecture: From scratch: bert, roberta, distilbert, albert, electra or modernbert (the trained
                tokenizer fits it: WordPiece with [MASK], byte-level BPE with <s> </s> <mask>, ModernBERT's).
            hidden_size: From scratch: width of the model.
            num_hidden_layers: From scratch: number of transformer layers.
            num_attention_heads: From scratch: attention heads per layer.
            intermediate_size: From scratch: width of the feed-forward layers.
            max_position_embeddings: From scratch: the longest sequence the model can take.
            dropout: From scratch: hidden and attention dropout (0 suits the few-minute offline default, where
                regularization only slows fitting; BERT's own is 0.1).
            learning_rate: Peak AdamW learning rate.
            head_learning_rate: Peak learning rate of new parameters (a pretrained encoder without MLM head
                weights: its random head), while the pretrained ones keep `learning_rate`.
            weight_decay: AdamW weight decay (never on biases and LayerNorm weights).
            warmup_steps: Linear warmup: a number of steps, or a float below 1 for a share of the run.
            schedule: After the warmup: `linear` or `cosine` decay, `wsd` (constant, then a decay over the last
                `decay_share` of the run) or `constant`. A run bounded by `--trainer.max_time` follows it by
                elapsed training time.
            decay_share: wsd: the share of the run (its last steps, or its last time) that decays.
            min_lr_ratio: The share of the peak learning rate that the decay ends at.
            betas: AdamW betas.
            eps: AdamW epsilon.
            sparse_head: Run the MLM head and loss only at masked positions (same loss, less compute).
            compile: `torch.compile` the encoder.
            fused_optimizer: AdamW's fused kernel (one kernel for all parameters): auto (on CUDA devices), true
                (any device torch has it for, CPUs too) or false.
            attn_implementation: auto (ModernBERT: flash_attention_2 where flash-attn and a CUDA GPU are there,
                its attention then skips padding; every other family and no flash-attn: sdpa), sdpa, eager, or
                flash_attention_2 (pip install 'mlm-lightning[flash]').
            skip_nonfinite: Skip optimizer steps whose loss is NaN/inf instead of stopping the run.
            skip_nonfinite_limit: With skip_nonfinite: stop (exit 3, the last good checkpoint kept) after this many
                skipped steps in a row (0: never); the model is not recovering.
            top_k: predict: candidates reported per mask.
            joint: predict: fill several masks left to right, feeding each choice back.
            targets: predict: score only these words (as transformers' fill-mask pipeline: a word that is not
                one token is scored by its first token).
            callbacks: Bring the project's callbacks to a Trainer that lacks them (`configure_callbacks`).
        """
        super().__init__()
        # prediction options are not saved: LightningCLI re-applies a checkpoint's hyperparameters over the
        # command line, which would make `predict --ckpt_path X --model.top_k 2` ignore the 2
        check_arguments("MLMModule", MLMModule.__init__, locals())
        model_name_or_path = fspaths(model_name_or_path)  # (a pathlib.Path, saved as a str)
        self.save_hyperparameters(ignore=["top_k", "joint", "targets", "callbacks"])
        self.top_k, self.joint, self.targets, self.brings_callbacks = top_k, joint, targets, callbacks
        check(learning_rate > 0, f"learning_rate must be positive, got {learning_rate}")
        check(warmup_steps >= 0, f"warmup_steps must be >= 0, got {warmup_steps}")
        check(head_learning_rate > 0, f"head_learning_rate must be positive, got {head_learning_rate}")
        check(model_name_or_path or architecture in arch.SCRATCH,
              f"architecture must be one of {', '.join(arch.SCRATCH)}, got {architecture!r}")
        arch.check_attention(attn_implementation)
        check(fused_optimizer in (True, False, "auto"),
              f"fused_optimizer must be auto, true or false, got {fused_optimizer!r}")
        check_schedule(schedule, decay_share, min_lr_ratio)
        self.model = None
        self.new_parameters: list[str] = []  # pretrained weights that were missing: they train at head_learning_rate
        self.new_rows: list[int] = []  # vocabulary ids added by --data.extend_vocab: train at head_learning_rate
        self.tokenizer = None
        self._tokenizer_files: dict[str, str] | None = None
        self.val_ppl_history: list[tuple[int, float]] = []  # (step, ppl) of each validation in this process
        self._first_bad: torch.Tensor | None = None  # see training_step
        self._window_bad: torch.Tensor | None = None  # skip_nonfinite: 1.0 if this step is to be skipped
        self._skips: torch.Tensor | None = None  # skip_nonfinite: counts on the device (see on_before_optimizer_step)
        self._window_tokens = 0  # masked tokens of this optimizer step's micro-batches so far (a Python int)
        self._window_loss: torch.Tensor | None = None  # their summed loss, on the device
        self._unit: float | None = None  # see _loss_unit
        self._truncated: list[int] = []  # predict: inputs truncated so far (one notice for the run)
        self.fused = False  # what configure_optimizers chose (the start line names it)

    # -- building ---------------------------------------------------------------------------------------
    def _half_on_cuda(self) -> bool:
        """Will this run compute in 16/bf16 on a CUDA device (where `auto` attention may take flash-attn)?"""
        if self._trainer is None:
            return False
        return self.trainer.strategy.root_device.type == "cuda" and str(self.trainer.precision).startswith(
            ("16", "bf16"))

    def configure_model(self) -> None:
        if self.model is not None:
            self._add_metrics()
            return
        data = self.trainer.datamodule if self._trainer is not None else None
        if self.tokenizer is None and data is not None:
            self.tokenizer = data.load_tokenizer()
        check(self.tokenizer is not None, "MLMModule needs a tokenizer: use it with MLMDataModule, set .tokenizer,"
              " or load a checkpoint or model dir with MLMModule.load(path)")
        # from_pretrained() returns eval mode and Lightning keeps module modes: train (dropout on) explicitly
        extension = getattr(data, "vocab_extension", None) or []  # (id, piece ids) of added domain words
        model, self.new_parameters = arch.build(self.hparams, self.tokenizer, self._half_on_cuda(), extension)
        self.new_rows = [i for i, _ in extension]
        if self.hparams.model_name_or_path:
            source = getattr(getattr(data, "hparams", None), "get", lambda *_: None)("tokenizer")
            pairing.check_tokenizer_fits(self.tokenizer, self.hparams.model_name_or_path, source,
                                         frozenset(self.new_rows))
        self.model = model.train()
        if self.new_parameters:
            shown = ", ".join(self.new_parameters[:8]) + (", ..." if len(self.new_parameters) > 8 else "")
            rate = option("model.head_learning_rate", self.hparams.head_learning_rate)
            log.info("%d new parameters (not in %s) train at %s: %s", len(self.new_parameters),
                     self.hparams.model_name_or_path, rate, shown)
        if not self.hparams.model_name_or_path and self._trainer is not None and self.trainer.datamodule is not None:
            # a new model only ever saw max_length positions: exported tokenizers truncate there
            self.tokenizer.model_max_length = self.trainer.datamodule.hparams.max_length
        self._add_metrics()
        if self.hparams.compile:
            arch.compile_encoder(self.model)

    def _add_metrics(self) -> None:
        if not hasattr(self, "val_acc"):
            vocab = self.model.config.vocab_size
            self.val_acc = MulticlassAccuracy(num_classes=vocab, average="micro", ignore_index=-100)
            self.val_ppl = Perplexity(ignore_index=-100)

    def pair_data(self, data) -> None:
        """Apply what this model brings to `data`, an `MLMDataModule` (`model/pairing.py`: a pretrained model's own
        tokenizer, length and fine-tuning learning rate; a new model's tokenizer kind) to the options neither
        constructor call was given. `MLMDataModule` asks for it before it trains or loads a tokenizer."""
        if getattr(data, "_paired_with", None) is self or not hasattr(data, "given_arguments"):
            return
        data._paired_with = self

        def given(key: str) -> bool:
            group, _, name = key.partition(".")
            return name in (self.given_arguments if group == "model" else data.given_arguments)

        if self.model is not None and self.tokenizer is not None and not given("data.tokenizer"):
            # a trained model (MLMModule.load) brings the tokenizer it was trained with, whatever it was
            data.tokenizer, data._data_dirs_list = self.tokenizer, None
        changes = pairing.paired_options(dict(self.hparams), dict(data.hparams), given, pairing.default_length)
        for key, (value, _) in changes.items():
            group, _, name = key.partition(".")
            owner = self if group == "model" else data
            owner.hparams[name] = value
            initial = getattr(owner, "_hparams_initial", None)  # (what loggers record as the run's options)
            if initial is not None and name in initial:
                initial[name] = value
        if any(k.startswith("data.") for k in changes) and self.model is None:
            data.tokenizer, data._data_dirs_list = None, None  # (one loaded before the pairing is not the model's)
        if changes and (self._trainer is None or self.trainer.is_global_zero):
            log.info("from the model: %s; pass them to change them", ", ".join(
                f"{option(k, v)} ({why})" for k, (v, why) in changes.items()))

    # -- steps ------------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels at the masked positions only (sparse) or everywhere (dense, -100 elsewhere)."""
        hidden = arch.encode(self.model, batch["input_ids"], batch.get("attention_mask"))
        if self.hparams.sparse_head:
            hidden = hidden.flatten(0, 1).index_select(0, batch["masked_positions"])
            return arch.head(self.model, hidden), batch["masked_labels"]
        return arch.head(self.model, hidden).flatten(0, 1), batch["labels"].flatten()

    def _shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        """Validation/test: the mean loss over this batch's masked tokens. Training: their summed loss (see
        `training_step`)."""
        logits, labels = self(batch)
        n_masked = batch["masked_positions"].numel()  # a shape: no host sync
        train = stage == "train"
        if n_masked == 0:
            # nothing was masked (each token is drawn independently, or all are [UNK]/special): the mean
            # over no tokens would be NaN. A zero that still depends on the logits keeps every parameter
            # in the graph (zero gradients), so DDP's reducer and gradient accumulation stay in step.
            loss = logits.sum() * 0.0
            if not train:
                # batch_size 0 leaves the epoch mean untouched; logging anyway keeps the same keys on
                # every rank for sync_dist. The accuracy/perplexity metrics are logged (every process must
                # reach their synced epoch-end compute) but not updated.
                self.log(stage_metric(stage, LOSS), loss.detach(), batch_size=0, prog_bar=True, sync_dist=True)
                self.log(stage_metric(stage, ACC), self.val_acc, batch_size=1)
                self.log(stage_metric(stage, PPL), self.val_ppl, batch_size=1, prog_bar=True)
            return loss
        if train:
            return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
        loss = F.cross_entropy(logits.float(), labels, ignore_index=-100)
        self.log(stage_metric(stage, LOSS), loss, batch_size=n_masked, prog_bar=True, sync_dist=True)
        self.val_acc(logits, labels)
        self.val_ppl(logits.float().unsqueeze(0), labels.unsqueeze(0))
        self.log(stage_metric(stage, ACC), self.val_acc, batch_size=n_masked)
        self.log(stage_metric(stage, PPL), self.val_ppl, batch_size=n_masked, prog_bar=True)
        return loss

    def training_step(self, batch: dict, batch_idx: int):
        # Token-weighted over the whole optimizer step: each micro-batch returns its *summed* loss over a constant
        # (`_loss_unit`), and `on_before_optimizer_step` rescales the accumulated gradients by the masked tokens of
        # every micro-batch of the step on every process. A per-micro-batch mean would give each micro-batch the
        # same weight however many tokens it masked (Lightning's accumulation and DDP average the micro-batches'
        # losses), so the gradient would depend on how a batch is split across steps and processes (the bug
        # transformers fixed with `num_items_in_batch`, huggingface/transformers#34191).
        summed = self._shared_step(batch, "train")
        n_masked = batch["masked_positions"].numel()  # a shape: no host sync
        self._window_tokens += n_masked
        detached = summed.detach().float()
        self._window_loss = detached if self._window_loss is None else self._window_loss + detached
        loss = summed / self._loss_unit() if self._token_weighted() else summed / max(1, n_masked)
        # Nothing here waits for the device between log steps (on a GPU each wait drains its queue): a NaN/inf
        # loss is recorded on the device and read, by all processes together, at log steps and before a
        # checkpoint (one process raising alone would leave the others waiting in the gradient all-reduce)
        bad = ~torch.isfinite(loss.detach())
        if self._first_bad is None:
            self._first_bad = loss.new_zeros(2, dtype=torch.float32)  # (step of the first bad loss, its value)
        first = bad & (self._first_bad[0] == 0)
        now = torch.stack([loss.new_full((), self.global_step + 1, dtype=torch.float32), loss.detach().float()])
        self._first_bad = torch.where(first, now, self._first_bad)
        if self.hparams.skip_nonfinite:
            flag = bad.float()
            if self.trainer.world_size > 1:  # every process skips alike (a collective, not a host sync)
                flag = self.trainer.strategy.reduce(flag, reduce_op="max")
            self._window_bad = flag if self._window_bad is None else torch.maximum(self._window_bad, flag)
            loss = torch.where(bad, torch.zeros_like(loss), loss)  # (its gradients are dropped before the step)
        if is_log_step(self.trainer):
            self.check_finite()
            self.log(TRAIN_LR, self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        return loss

    def _token_weighted(self) -> bool:
        """Token weighting rescales `.grad` before the step; DeepSpeed's engine keeps gradients of its own (each
        micro-batch then weighs its own mean, as Lightning and DeepSpeed do by default)."""
        return not (self._trainer is not None and isinstance(self.trainer.strategy, DeepSpeedStrategy))

    def _loss_unit(self) -> float:
        """What each micro-batch's summed loss is divided by before backward: a constant, the same on every process
        (DDP averages gradients before `on_before_optimizer_step` could weigh them per process), of the size of a
        batch's masked-token count, so fp16 loss scaling sees gradients of the usual size. Exactness does not
        depend on it: the step's gradients are rescaled by the real count."""
        if self._unit is None:
            data = self.trainer.datamodule if self._trainer is not None else None
            h = getattr(data, "hparams", {})
            try:
                tokens = h.get("max_tokens") or h["batch_size"] * h["max_length"]
                self._unit = max(1.0, float(tokens) * float(h.get("mlm_probability", 0.15)))
            except (KeyError, TypeError, ValueError, AttributeError):  # a data module of the user's own
                self._unit = 1.0
        return self._unit

    def _weigh_by_tokens(self, optimizer) -> None:
        """Rescale the step's accumulated gradients to the gradient of the mean loss over all masked tokens of the
        step (all micro-batches, all processes), and log that mean as `train/loss`.

        Each micro-batch returned sum_i / unit; Lightning divided that by `accumulate_grad_batches` (K) and DDP/FSDP
        averaged over the W processes, so `.grad` = sum over micro-batches and processes of grad(sum_i) / (unit K W).
        Times unit K W / N (N: masked tokens of the step, all processes) gives the token-weighted mean. One
        all-reduce of the (count, loss sum) pair per step on many processes (no host sync); on one process N is a
        Python int already."""
        tokens, self._window_tokens = self._window_tokens, 0
        loss_sum, self._window_loss = self._window_loss, None
        if loss_sum is None:
            return
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            pair = torch.stack([loss_sum.new_full((), float(tokens)), loss_sum])  # (filled on the device: no copy)
            count, loss_sum = self.trainer.strategy.reduce(pair, reduce_op="sum")
            count = count.clamp(min=1.0)
        else:
            count = float(max(1, tokens))
        self.log(TRAIN_LOSS, loss_sum / count, batch_size=1)
        if not self._token_weighted():
            return
        factor = self._loss_unit() * self.trainer.accumulate_grad_batches * world / count
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)  # a device tensor or a float: no host sync either way

    def check_finite(self, weights: bool = False) -> None:
        """Raise `NonFiniteLossError` on every process if a loss on any process was NaN/inf (a collective), or, with
        `skip_nonfinite`, if `skip_nonfinite_limit` optimizer steps in a row were skipped. `weights`: also if any
        weight is NaN/inf (asked before every checkpoint: such weights are never saved, exported or kept)."""
        if self.hparams.skip_nonfinite:
            self._check_skipped()
        elif self._first_bad is not None:
            self._check_first_bad()
        if weights and self.model is not None:
            self._check_weights()

    def _check_first_bad(self) -> None:
        first = self._first_bad
        if self._trainer is not None and self.trainer.world_size > 1:  # the earliest bad step of all processes
            import torch.distributed as dist

            rows = [torch.zeros_like(first) for _ in range(self.trainer.world_size)]
            dist.all_gather(rows, first)
            bad = [r for r in torch.stack(rows).cpu() if r[0] > 0]
            first = min(bad, key=lambda r: float(r[0])) if bad else torch.zeros(2)
        step, value = first.tolist()
        if step > 0:
            raise NonFiniteLossError(
                f"the loss became {value} at step {int(step)}; lower {option('model.learning_rate')}, check the data,"
                f" or pass {option('model.skip_nonfinite', True)} to skip such steps"
            )

    def _check_skipped(self) -> None:
        if self._skips is None:
            return
        total, run, longest = (int(v) for v in self._skips.tolist())  # the same on every process (agreed flags)
        self._skips[0] = 0
        self._skips[2] = run
        if total and self._trainer is not None:
            self.print(f"mlm-lightning: skipped {total} step(s) with a non-finite loss up to step {self.global_step}"
                       f" ({run} in a row now)")
        limit = self.hparams.skip_nonfinite_limit
        if limit and longest >= limit:
            raise NonFiniteLossError(
                f"{longest} optimizer steps in a row had a non-finite loss and were skipped (limit"
                f" --model.skip_nonfinite_limit {limit}): the model does not recover; lower"
                " --model.learning_rate or check the data"
            )

    def _check_weights(self) -> None:
        params = [p for p in self.model.parameters() if p.numel()]
        bad = torch.stack([~torch.isfinite(p).all() for p in params]).any().float()
        if self._trainer is not None and self.trainer.world_size > 1:  # FSDP: each process holds a shard
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        if bad.item():
            raise NonFiniteLossError(
                f"the weights hold NaN/inf at step {self.global_step}: nothing is saved from them; lower"
                " --model.learning_rate or check the data"
            )

    def on_before_optimizer_step(self, optimizer) -> None:
        # (before Lightning clips: clipping sees the token-weighted gradient)
        self._weigh_by_tokens(optimizer)
        if self._window_bad is None:
            return
        flag, self._window_bad = self._window_bad, None  # 1.0 if a loss of this step was NaN/inf on any process
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if fused and scaler is None:
            # fused AdamW (on GPUs) skips its whole update on the device when found_inf is set (no host sync;
            # its step count is rolled back too): what GradScaler does for fp16
            optimizer.found_inf = flag
        elif fused:
            # 16-mixed: the scaler finds inf/NaN in the gradients when it unscales them (in the clip or in its
            # step, both after this hook) and skips the step; NaN gradients where the flag is set, on the device
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, torch.where(flag > 0, float("nan"), 1.0).to(grads[0].dtype))
        elif flag.item():  # other optimizers decide on the host (a sync each step: CPUs, non-fused optimizers)
            self.print(f"mlm-lightning: skipping step {self.global_step + 1}: the loss is not finite")
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients untouched
        if self._skips is None:
            self._skips = flag.new_zeros(3)  # skipped since the last check, skipped in a row now, longest such run
        run = (self._skips[1] + 1) * flag
        self._skips = torch.stack([self._skips[0] + flag, run, torch.maximum(self._skips[2], run)])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            return  # DeepSpeed clips by norm itself (Lightning puts gradient_clip_val in its config)
        by_norm = gradient_clip_algorithm in (None, "norm")  # (Lightning's enum is a str)
        if gradient_clip_val and by_norm and isinstance(strategy, FSDPStrategy):
            # the norm over all shards: only the FSDP root can compute it (Lightning's FSDP precision refuses it);
            # an optimizer that unscales in its step still holds scaled gradients here (16-mixed): unscale first
            scaler = getattr(getattr(self.trainer, "precision_plugin", None), "scaler", None)
            if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
                scaler.unscale_(optimizer)
            strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        if gradient_clip_val and getattr(optimizer, "_step_supports_amp_scaling", False):
            clip_unscaling_optimizer(optimizer, self.trainer.precision_plugin, gradient_clip_val, by_norm)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def validation_step(self, batch: dict, batch_idx: int):
        if self.hparams.compile:
            batch = self._static_rows(batch)
        return self._shared_step(batch, "val")

    def _static_rows(self, batch: dict) -> dict:
        """Under torch.compile: every validation batch as many rows as the first, with an attention mask, so the
        short last batch (or one with padding) reuses the validation graph instead of compiling another one. The
        added rows are padding: no labels, masked out of attention; the loss and metrics are unchanged."""
        ids = batch["input_ids"]
        rows, length = ids.shape
        self._val_rows = max(getattr(self, "_val_rows", 0), rows)
        if rows == self._val_rows and "attention_mask" in batch:
            return batch
        extra = self._val_rows - rows
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        out = dict(batch)
        out["input_ids"] = torch.cat([ids, ids.new_full((extra, length), self.tokenizer.pad_token_id)])
        out["attention_mask"] = torch.cat([mask, mask.new_zeros((extra, length))])
        out["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((extra, length), -100)])
        return out  # (the masked positions index the flattened rows: appended rows leave them as they are)

    def on_train_start(self) -> None:
        # a fit stopped inside an accumulation window (max_time, early stopping) leaves no counts to the next fit
        self._window_tokens, self._window_loss, self._window_bad = 0, None, None

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        count = torch.tensor(float(self.val_ppl.update_count), device=self.device)
        if self.trainer.world_size > 1:  # decided alike on every process: compute() is a collective
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        if count.item() > 0:
            self.val_ppl_history.append((self.global_step, float(self.val_ppl.compute())))

    def test_step(self, batch: dict, batch_idx: int):
        return self._shared_step(batch, "test")

    def on_predict_epoch_start(self) -> None:
        self._truncated: list[int] = []

    def predict_step(self, batch: list[tuple[int, str]], batch_idx: int) -> list[dict]:
        indices, texts = zip(*batch, strict=True)
        masker = FillMasker(self.model, self.tokenizer, self.device, self.top_k, len(texts), notice=False)
        results = masker(list(texts), joint=self.joint, indices=list(indices), targets=self.targets)
        self._truncated += masker.truncated
        return [{"index": i, **r} for i, r in zip(indices, results, strict=True)]

    def on_predict_epoch_end(self) -> None:
        if self._truncated:  # once for the run, not once per batch
            truncation_notice(sorted(self._truncated), FillMasker(self.model, self.tokenizer).max_length)

    # -- optimization -----------------------------------------------------------------------------------
    def configure_optimizers(self):
        h = self.hparams
        groups = arch.param_groups(self.model, h.weight_decay, self.new_parameters, h.head_learning_rate)
        choice = h.get("fused_optimizer", "auto")  # (a checkpoint of an older version has no such option)
        self.fused = self.device.type == "cuda" if choice == "auto" else bool(choice)
        optimizer = torch.optim.AdamW(groups, lr=h.learning_rate, betas=tuple(h.betas), eps=h.eps,
                                      fused=self.fused or None)
        scheduler = run_schedule(optimizer, self.trainer, h.schedule, h.warmup_steps, h.decay_share, h.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # The rows of added words (`new_rows`) train at head_learning_rate, the rest of their matrices at the
        # encoder's rate. They are rows of one Parameter (the embeddings, tied to the decoder: the weights stay a
        # plain transformers model), and a Parameter is in one optimizer group only; scaling their gradient would
        # change nothing, as AdamW's step is invariant to a gradient's scale. But AdamW's whole update, the decay
        # term and the Adam term alike, is proportional to the rate and its moments do not depend on it: so the
        # update the step gave those rows, times head_lr / lr, is exactly the update at head_lr.
        if not self.new_rows:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        check(not isinstance(self.trainer.strategy, (DeepSpeedStrategy, FSDPStrategy)),
              f"{option('data.extend_vocab')} trains on one device or with DDP, not with a sharded strategy")
        rows = getattr(self, "_rows", None)
        if rows is None or rows.device != self.device:  # (made once: no copy to the device every step)
            rows = self._rows = torch.tensor(self.new_rows, device=self.device)
        params = arch.new_row_parameters(self.model)
        before = [p.detach().index_select(0, rows) for p in params]
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        rates = {id(p): g.get("initial_lr", g["lr"]) for g in optimizer.param_groups for p in g["params"]}
        with torch.no_grad():
            for p, old in zip(params, before, strict=True):
                ratio = self.hparams.head_learning_rate / rates[id(p)]
                p.index_copy_(0, rows, old + (p.index_select(0, rows) - old) * ratio)

    def setup(self, stage: str) -> None:
        # `configure_gradient_clipping` leaves DeepSpeed's clipping alone (DeepSpeed clips by norm itself, from
        # gradient_clip_val), so Lightning's warning that an override "will not actually clip gradients" does not
        # apply. Set here, before the strategy's setup warns, rather than at import: importing changes no filter.
        warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")
        # every process draws its own dropout masks (seed_everything gives all the same seed); rank 0 keeps the
        # seed as given, so a single-process run is unchanged
        if stage == "fit" and self.trainer.world_size > 1 and self.global_rank > 0:
            torch.manual_seed(torch.initial_seed() + self.global_rank)

    # -- any Trainer gets the project's safety ---------------------------------------------------------------------
    def configure_callbacks(self):
        """What the command line gives every fit, for a plain `lightning.Trainer` too: the graceful stop (Ctrl-C, a
        notebook's interrupt or SIGTERM save `last.ckpt` within seconds and `fit` returns), the checkpoint policy
        (the best by val/loss and the last, in `<default_root_dir>/checkpoints`, written atomically), the start and
        end lines, throughput logging, and the setup many processes need. Only what the Trainer lacks is added: a
        checkpoint callback of the user's own is kept (Lightning's default one is replaced), and so is every
        callback the CLI configured. Off: `MLMModule(..., callbacks=False)`."""
        from mlm_lightning.training.callbacks import ThroughputLogger
        from mlm_lightning.training.checkpointing import MLMCheckpoint
        from mlm_lightning.training.progress import RunReport
        from mlm_lightning.training.setup import RunSetup
        from mlm_lightning.training.stopping import GracefulStop

        if not self.brings_callbacks or self._trainer is None:
            return []
        show_info_lines()
        present = self.trainer.callbacks
        wanted = [RunSetup(), ThroughputLogger(), RunReport(log_summary=True)]
        if _lightnings_default_checkpoint(self.trainer.checkpoint_callback):  # replaced (MLMCheckpoint subclasses it)
            wanted.append(MLMCheckpoint(dirpath=os.path.join(self.trainer.default_root_dir, "checkpoints")))
        wanted.append(GracefulStop(stop_quietly=True))
        return [c for c in wanted if not any(isinstance(p, type(c)) for p in present)]

    # -- what the callbacks ask of the network: they get it from the module Lightning hands them, so `training/`
    # knows no model family's internals (`arch` does) and its imports point down the layers
    def train_flops(self, seq_len: int, n_tokens: int, n_head_rows: int) -> int:
        """Matmul FLOPs of one training step on a batch of this shape (`arch.train_flops`; MFU divides by them)."""
        return arch.train_flops(self.model.config, seq_len, n_tokens, n_head_rows)

    def layer_classes(self) -> set[type]:
        """The classes of the network's repeated encoder layers (`arch.layer_classes`; FSDP wraps one unit each)."""
        return arch.layer_classes(self.model)

    # -- using a trained model ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, **kwargs) -> MLMModule:
        """A trained model from a `.ckpt` written by a fit (`MLMModule.load_from_checkpoint`), a sharded checkpoint
        directory, an export or any Hugging Face model dir or hub id: ready to `fill_mask`, `export`, validate, or
        train on (a checkpoint keeps its options; `kwargs` replace them)."""
        path = os.fspath(path)
        if os.path.isfile(path):
            return cls.load_from_checkpoint(path, **kwargs)
        net, tokenizer = checkpoint.load_model(path, "MLMModule.load(path)")
        module = cls(model_name_or_path=path, **kwargs)
        module.model, module.tokenizer = net.train(), tokenizer
        module._add_metrics()
        return module

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """The module of a `.ckpt` written by a fit, with its tokenizer (the checkpoint carries it) and its options
        (`kwargs` replace them). Read as data (`weights_only=True`), checked as the command line checks it."""
        kwargs.pop("weights_only", None)  # (always: a checkpoint is data)
        path = os.fspath(checkpoint_path)
        net, tokenizer = checkpoint.load_checkpoint(path, "checkpoint_path")
        if map_location is not None:
            net = net.to(map_location)
        saved = checkpoint.verified_checkpoint(path, "checkpoint_path").get("hyper_parameters") or {}
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        module = cls(**{**{k: v for k, v in saved.items() if k in known}, **kwargs})
        module.model, module.tokenizer = net.train(), tokenizer
        module._add_metrics()
        return module

    def fill_mask(self, texts: str | list[str], top_k: int = 5, targets: str | list[str] | None = None,
                  joint: bool = False, batch_size: int = 64):
        """Fill the masks of one sentence or a list, as transformers' fill-mask pipeline answers: per sentence, a
        list of candidates (`score`, `token`, `token_str`, `sequence`), or one such list per mask where a sentence
        has several. `targets`: score only these words; `joint`: fill several masks left to right."""
        check(self.model is not None and self.tokenizer is not None,
              "fill_mask needs a trained model: train it first, or MLMModule.load(path)")
        single = isinstance(texts, str)
        was_training = self.model.training
        self.model.eval()
        try:
            masker = FillMasker(self.model, self.tokenizer, self.device, top_k, batch_size)
            results = masker([texts] if single else list(texts), joint=joint, targets=targets)
        finally:
            self.model.train(was_training)
        answers = [r["predictions"][0] if len(r["predictions"]) == 1 else r["predictions"] for r in results]
        return answers[0] if single else answers

    def score(self, texts: str | list[str], variant: str = "original", batch_size: int = 256):
        """The pseudo-log-likelihood of one sentence or a list, as `mlm-lightning score` prints it: per sentence,
        `pll`, `n_tokens`, `pppl` and each token's `log_prob` (`model/score.py`). `variant`: original or word_l2r
        (also mask the rest of the scored token's word to its right); `batch_size`: masked copies per forward."""
        from mlm_lightning.model.score import Scorer

        check(self.model is not None and self.tokenizer is not None,
              "score needs a trained model: train it first, or MLMModule.load(path)")
        single = isinstance(texts, str)
        was_training = self.model.training
        self.model.eval()
        try:
            results = Scorer(self.model, self.tokenizer, self.device, batch_size)([texts] if single else list(texts),
                                                                                   variant)
        finally:
            self.model.train(was_training)
        return results[0] if single else results

    def export(self, export_dir: str) -> str:
        """Write the model and its tokenizer as a Hugging Face directory (what `transformers.pipeline` and
        `MLMModule.load` read); an earlier export there is replaced, anything else in the way refused."""
        from mlm_lightning.export import save_hf

        check(self.model is not None and self.tokenizer is not None, "nothing to export: train or load a model first")
        return save_hf(self.model, self.tokenizer, export_dir)

    # -- checkpoints carry the architecture and tokenizer and each process's RNG state (`checkpoint.py`) --------
    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":  # this process's own device only
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def on_save_checkpoint(self, ckpt: dict) -> None:
        if self._tokenizer_files is None:
            self._tokenizer_files = tokenizer_files(self.tokenizer)
        states = [self._rng_state()]
        if self._trainer is not None and self.trainer.world_size > 1:  # every process dumps: a collective is safe
            import torch.distributed as dist

            states = [None] * self.trainer.world_size
            dist.all_gather_object(states, self._rng_state())
            states = [{k: v.cpu() for k, v in s.items()} for s in states]
        checkpoint.write_payload(ckpt, self.model.config, self._tokenizer_files, states)

    def on_load_checkpoint(self, ckpt: dict) -> None:
        saved = checkpoint.saved_tokenizer_json(ckpt)
        if saved is not None and self.tokenizer is not None:
            # (runs before the weights are loaded, so a mismatch never surfaces as a tensor-shape error)
            check(
                _vocab(saved) == _vocab(self.tokenizer.backend_tokenizer.to_str()),
                "the checkpoint was trained with another tokenizer than this data module's (a WordPiece"
                " vocabulary is trained once per corpus and cached: another cache or corpus gives another);"
                f" export the checkpoint (mlm-lightning export) and pass {option('data.tokenizer', 'EXPORT_DIR')}",
            )
        if self._trainer is None or self.trainer.state.fn != "fit":
            return
        states = checkpoint.saved_rng_states(ckpt)
        world = self.trainer.world_size
        if len(states) != world:
            rank_zero_warn(
                f"resuming a run of {len(states)} process(es) on {world}: it continues from the checkpoint, but not"
                " bit-exactly (the dropout streams and the split of batches between processes differ)"
            )
            return
        state = states[self.global_rank]
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)


def clip_unscaling_optimizer(optimizer, precision_plugin, clip_val: float, by_norm: bool) -> None:
    """Clip the gradients of an optimizer that unscales inside its own step (fused AdamW), which Lightning's
    mixed-precision plugin refuses to clip in 2.6 (`MixedPrecision.clip_gradients` raises for any such optimizer,
    under bf16-mixed too, where there is no scaler: Lightning-AI/pytorch-lightning#21435).

    - bf16-mixed, 32-true: no scaler, the gradients are as they are: clip them directly.
    - 16-mixed: unscale first through the scaler (`GradScaler.unscale_`), then clip. The scaler records the
      optimizer as unscaled, so its `step` passes no `grad_scale` to the fused kernel (nothing is unscaled twice)
      and still hands it `found_inf`, so a step with inf/NaN gradients is skipped on the device as before.
    """
    scaler = getattr(precision_plugin, "scaler", None)
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if by_norm:
        torch.nn.utils.clip_grad_norm_(params, clip_val)
    else:
        torch.nn.utils.clip_grad_value_(params, clip_val)


def _lightnings_default_checkpoint(callback) -> bool:
    """Is this the `ModelCheckpoint()` Lightning adds when none is given (not one the user configured)?"""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return (type(callback) is ModelCheckpoint and callback.dirpath is None and callback.monitor is None
            and callback.save_top_k == 1 and callback.save_last is None and callback.filename is None
            and not callback._every_n_train_steps and callback._train_time_interval is None
            and callback._every_n_epochs == 1)


def show_info_lines() -> None:
    """The project's info lines (the start and end lines, where checkpoints went) reach a Python user who configured
    no logging: a stderr handler on the project's own logger, only when neither it nor the root logger has one
    (the root logger is never touched; a configured one gets our records as usual)."""
    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("mlm-lightning: %(message)s"))
    log.addHandler(handler)
    log.propagate = False  # (a root logger configured later would print each line twice)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


def _vocab(tokenizer_json: str) -> dict:
    return json.loads(tokenizer_json).get("model", {}).get("vocab", {})
