"""`MLMModule`: a Hugging Face masked LM (`BertForMaskedLM`, `RobertaForMaskedLM`, ... see `arch.py`) trained
with Lightning.

The network is built in `configure_model()`, after the data module has produced the tokenizer (whose
vocabulary may have just been trained on the corpus). The MLM head and the loss run only at masked
positions (`sparse_head`): the same loss as `model(labels=...)`, without the vocabulary-sized matmul at the ~85%
of positions that carry no label. The weights stay a plain transformers `*ForMaskedLM`.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from mlm_lightning.data.tokenizer import tokenizer_files
from mlm_lightning.errors import NonFiniteLossError, check
from mlm_lightning.model import arch, checkpoint
from mlm_lightning.model.fill_mask import FillMasker, truncation_notice
from mlm_lightning.training.schedules import check_schedule, run_schedule

log = logging.getLogger("mlm_lightning")
# `configure_gradient_clipping` below leaves DeepSpeed's clipping alone (DeepSpeed clips by norm itself, from
# gradient_clip_val), so Lightning's warning that an override "will not actually clip gradients" does not apply
warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")


class MLMModule(L.LightningModule):
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
        attn_implementation: str = "auto",
        skip_nonfinite: bool = False,
        skip_nonfinite_limit: int = 20,
        top_k: int = 5,
        joint: bool = False,
        targets: list[str] | None = None,
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
        """
        super().__init__()
        # prediction options are not saved: LightningCLI re-applies a checkpoint's hyperparameters over the
        # command line, which would make `predict --ckpt_path X --model.top_k 2` ignore the 2
        self.save_hyperparameters(ignore=["top_k", "joint", "targets"])
        self.top_k, self.joint, self.targets = top_k, joint, targets
        check(learning_rate > 0, f"learning_rate must be positive, got {learning_rate}")
        check(warmup_steps >= 0, f"warmup_steps must be >= 0, got {warmup_steps}")
        check(head_learning_rate > 0, f"head_learning_rate must be positive, got {head_learning_rate}")
        check(model_name_or_path or architecture in arch.SCRATCH,
              f"architecture must be one of {', '.join(arch.SCRATCH)}, got {architecture!r}")
        arch.check_attention(attn_implementation)
        check_schedule(schedule, decay_share, min_lr_ratio)
        self.model = None
        self.new_parameters: list[str] = []  # pretrained weights that were missing: they train at head_learning_rate
        self.tokenizer = None
        self._tokenizer_files: dict[str, str] | None = None
        self.val_ppl_history: list[tuple[int, float]] = []  # (step, ppl) of each validation in this process
        self._first_bad: torch.Tensor | None = None  # see training_step
        self._window_bad: torch.Tensor | None = None  # skip_nonfinite: 1.0 if this step is to be skipped
        self._skips: torch.Tensor | None = None  # skip_nonfinite: counts on the device (see on_before_optimizer_step)

    # -- building ---------------------------------------------------------------------------------------
    def _half_on_cuda(self) -> bool:
        """Will this run compute in 16/bf16 on a CUDA device (where `auto` attention may take flash-attn)?"""
        if self._trainer is None:
            return False
        return self.trainer.strategy.root_device.type == "cuda" and str(self.trainer.precision).startswith(
            ("16", "bf16"))

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.tokenizer is None and self._trainer is not None and self.trainer.datamodule is not None:
            self.tokenizer = self.trainer.datamodule.load_tokenizer()
        check(self.tokenizer is not None, "MLMModule needs a tokenizer: use it with MLMDataModule or set .tokenizer")
        # from_pretrained() returns eval mode and Lightning keeps module modes: train (dropout on) explicitly
        model, self.new_parameters = arch.build(self.hparams, self.tokenizer, self._half_on_cuda())
        self.model = model.train()
        if self.new_parameters:
            shown = ", ".join(self.new_parameters[:8]) + (", ..." if len(self.new_parameters) > 8 else "")
            log.info("%d new parameters (not in %s) train at --model.head_learning_rate %g: %s",
                     len(self.new_parameters), self.hparams.model_name_or_path, self.hparams.head_learning_rate, shown)
        if not self.hparams.model_name_or_path and self._trainer is not None and self.trainer.datamodule is not None:
            # a new model only ever saw max_length positions: exported tokenizers truncate there
            self.tokenizer.model_max_length = self.trainer.datamodule.hparams.max_length
        vocab = self.model.config.vocab_size
        self.val_acc = MulticlassAccuracy(num_classes=vocab, average="micro", ignore_index=-100)
        self.val_ppl = Perplexity(ignore_index=-100)
        if self.hparams.compile:
            arch.compile_encoder(self.model)

    # -- steps ------------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels at the masked positions only (sparse) or everywhere (dense, -100 elsewhere)."""
        hidden = arch.encode(self.model, batch["input_ids"], batch.get("attention_mask"))
        if self.hparams.sparse_head:
            hidden = hidden.flatten(0, 1).index_select(0, batch["masked_positions"])
            return arch.head(self.model, hidden), batch["masked_labels"]
        return arch.head(self.model, hidden).flatten(0, 1), batch["labels"].flatten()

    def _shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        logits, labels = self(batch)
        n_masked = batch["masked_positions"].numel()  # a shape: no host sync
        if n_masked == 0:
            # nothing was masked (each token is drawn independently, or all are [UNK]/special): the mean
            # over no tokens would be NaN. A zero that still depends on the logits keeps every parameter
            # in the graph (zero gradients), so DDP's reducer and gradient accumulation stay in step.
            loss = logits.sum() * 0.0
            if stage != "train":
                # batch_size 0 leaves the epoch mean untouched; logging anyway keeps the same keys on
                # every rank for sync_dist. The accuracy/perplexity metrics are logged (every process must
                # reach their synced epoch-end compute) but not updated.
                self.log(f"{stage}/loss", loss.detach(), batch_size=0, prog_bar=True, sync_dist=True)
                self.log(f"{stage}/acc", self.val_acc, batch_size=1)
                self.log(f"{stage}/ppl", self.val_ppl, batch_size=1, prog_bar=True)
            return loss
        loss = F.cross_entropy(logits.float(), labels, ignore_index=-100)
        # not in Lightning's bar in training: it would read the loss off the device every step (the bar shows it
        # from log steps, see progress.py)
        train = stage == "train"
        self.log(f"{stage}/loss", loss, batch_size=n_masked, prog_bar=not train, sync_dist=not train)
        if stage != "train":
            self.val_acc(logits, labels)
            self.val_ppl(logits.float().unsqueeze(0), labels.unsqueeze(0))
            self.log(f"{stage}/acc", self.val_acc, batch_size=n_masked)
            self.log(f"{stage}/ppl", self.val_ppl, batch_size=n_masked, prog_bar=True)
        return loss

    def training_step(self, batch: dict, batch_idx: int):
        loss = self._shared_step(batch, "train")
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
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        return loss

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
                f"the loss became {value} at step {int(step)}; lower --model.learning_rate, check the data,"
                " or pass --model.skip_nonfinite true to skip such steps"
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
        if self._window_bad is None:
            return
        flag, self._window_bad = self._window_bad, None  # 1.0 if a loss of this step was NaN/inf on any process
        if getattr(optimizer, "_step_supports_amp_scaling", False) and not getattr(
                self.trainer.precision_plugin, "scaler", None):
            # fused AdamW (on GPUs) skips its whole update on the device when found_inf is set (no host sync;
            # its step count is rolled back too): what GradScaler does for fp16
            optimizer.found_inf = flag
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
            # the norm over all shards: only the FSDP root can compute it (Lightning's FSDP precision refuses it)
            strategy.model.clip_grad_norm_(gradient_clip_val)
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
        fused = self.device.type == "cuda" or None
        optimizer = torch.optim.AdamW(groups, lr=h.learning_rate, betas=tuple(h.betas), eps=h.eps, fused=fused)
        scheduler = run_schedule(optimizer, self.trainer, h.schedule, h.warmup_steps, h.decay_share, h.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        # every process draws its own dropout masks (seed_everything gives all the same seed); rank 0 keeps the
        # seed as given, so a single-process run is unchanged
        if stage == "fit" and self.trainer.world_size > 1 and self.global_rank > 0:
            torch.manual_seed(torch.initial_seed() + self.global_rank)

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
                " export the checkpoint (mlm-lightning export) and pass --data.tokenizer EXPORT_DIR",
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


def _vocab(tokenizer_json: str) -> dict:
    return json.loads(tokenizer_json).get("model", {}).get("vocab", {})


def is_log_step(trainer) -> bool:
    """Is this training batch one whose metrics are logged (`log_every_n_steps`)? Lightning's own test, from the
    step counters alone: the same on every process, so collectives decided here are entered by all."""
    every = trainer.log_every_n_steps or 50
    return (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every == 0
