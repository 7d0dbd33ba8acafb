"""`MLMModule`: a Hugging Face masked-LM (`BertForMaskedLM`) trained with Lightning.

The network is built in `configure_model()`, after the data module has produced the tokenizer (whose
vocabulary may have just been trained on the corpus). The MLM head and the loss run only at masked
positions (`sparse_head`): the same loss as `BertForMaskedLM(labels=...)`, without the vocabulary-sized
matmul at the ~85% of positions that carry no label. The weights stay a plain `BertForMaskedLM`.
"""

from __future__ import annotations

import json
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from mlm_lightning.data.tokenizer import tokenizer_files
from mlm_lightning.errors import NonFiniteLossError, check
from mlm_lightning.model import arch, checkpoint
from mlm_lightning.model.fill_mask import FillMasker
from mlm_lightning.training.schedules import check_schedule, run_schedule


class MLMModule(L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str | None = None,
        hidden_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        intermediate_size: int = 512,
        max_position_embeddings: int = 512,
        dropout: float = 0.0,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int | float = 0.06,
        schedule: Literal["linear", "cosine", "wsd", "constant"] = "linear",
        decay_share: float = 0.1,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        sparse_head: bool = True,
        compile: bool = False,
        skip_nonfinite: bool = False,
        top_k: int = 5,
        joint: bool = False,
    ):
        """A BERT masked-language model.

        Args:
            model_name_or_path: A local Hugging Face directory or a hub id (bert-base-uncased) to start from.
                Unset: a new BERT with the sizes below, trained from scratch (the defaults: a tiny BERT sized
                for the offline default run on a CPU).
            hidden_size: From scratch: width of the model.
            num_hidden_layers: From scratch: number of transformer layers.
            num_attention_heads: From scratch: attention heads per layer.
            intermediate_size: From scratch: width of the feed-forward layers.
            max_position_embeddings: From scratch: the longest sequence the model can take.
            dropout: From scratch: hidden and attention dropout (0 suits the few-minute offline default, where
                regularization only slows fitting; BERT's own is 0.1).
            learning_rate: Peak AdamW learning rate.
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
            skip_nonfinite: Skip optimizer steps whose loss is NaN/inf instead of stopping the run.
            top_k: predict: candidates reported per mask.
            joint: predict: fill several masks left to right, feeding each choice back.
        """
        super().__init__()
        # prediction options are not saved: LightningCLI re-applies a checkpoint's hyperparameters over the
        # command line, which would make `predict --ckpt_path X --model.top_k 2` ignore the 2
        self.save_hyperparameters(ignore=["top_k", "joint"])
        self.top_k, self.joint = top_k, joint
        check(learning_rate > 0, f"learning_rate must be positive, got {learning_rate}")
        check(warmup_steps >= 0, f"warmup_steps must be >= 0, got {warmup_steps}")
        check_schedule(schedule, decay_share, min_lr_ratio)
        self.model = None
        self.tokenizer = None
        self._tokenizer_files: dict[str, str] | None = None
        self.val_ppl_history: list[tuple[int, float]] = []  # (step, ppl) of each validation in this process
        self._first_bad: torch.Tensor | None = None  # see training_step
        self._skip = False

    # -- building ---------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.tokenizer is None and self._trainer is not None and self.trainer.datamodule is not None:
            self.tokenizer = self.trainer.datamodule.load_tokenizer()
        check(self.tokenizer is not None, "MLMModule needs a tokenizer: use it with MLMDataModule or set .tokenizer")
        # from_pretrained() returns eval mode and Lightning keeps module modes: train (dropout on) explicitly
        self.model = arch.build(self.hparams, self.tokenizer).train()
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
        self.log(f"{stage}/loss", loss, batch_size=n_masked, prog_bar=True, sync_dist=stage != "train")
        if stage != "train":
            self.val_acc(logits, labels)
            self.val_ppl(logits.float().unsqueeze(0), labels.unsqueeze(0))
            self.log(f"{stage}/acc", self.val_acc, batch_size=n_masked)
            self.log(f"{stage}/ppl", self.val_ppl, batch_size=n_masked, prog_bar=True)
        return loss

    def training_step(self, batch: dict, batch_idx: int):
        loss = self._shared_step(batch, "train")
        # A NaN/inf loss is recorded on the device (no host sync) and decided by all processes together: one
        # process raising alone would leave the others waiting in the gradient all-reduce until the timeout
        bad = ~torch.isfinite(loss.detach())
        if self._first_bad is None:
            self._first_bad = torch.zeros(2, device=self.device)  # (step of the first bad loss, its value)
        step = self.global_step + 1
        first = bad & (self._first_bad[0] == 0)
        self._first_bad = torch.where(first, torch.stack([torch.tensor(float(step), device=self.device),
                                                          loss.detach().float()]), self._first_bad)
        if self.hparams.skip_nonfinite:
            self._skip |= self._agree_nonfinite(bad)  # decided every step: the optimizer step must not happen
            loss = torch.where(bad, torch.zeros_like(loss), loss)  # (its gradients are dropped before the step)
        elif self.device.type != "cuda" or step % max(1, self.trainer.log_every_n_steps) == 0:
            self.check_finite()  # on a GPU only every log interval (a host sync); always before a checkpoint
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        return loss

    def _agree_nonfinite(self, bad: torch.Tensor) -> bool:
        flag = bad.float()
        if self._trainer is not None and self.trainer.world_size > 1:
            flag = self.trainer.strategy.reduce(flag, reduce_op="max")
        return bool(flag.item())

    def check_finite(self) -> None:
        """Raise `NonFiniteLossError` on every process if a loss on any process was NaN/inf (a collective)."""
        if self._first_bad is None or self.hparams.skip_nonfinite:
            return
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

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._skip:  # some process had a NaN/inf loss in this step: every process skips it alike
            self._skip = False
            self.print(f"mlm-lightning: skipping step {self.global_step + 1}: the loss is not finite")
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients untouched

    def validation_step(self, batch: dict, batch_idx: int):
        return self._shared_step(batch, "val")

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

    def predict_step(self, batch: list[tuple[int, str]], batch_idx: int) -> list[dict]:
        indices, texts = zip(*batch, strict=True)
        masker = FillMasker(self.model, self.tokenizer, self.device, self.top_k, len(texts))
        results = masker(list(texts), joint=self.joint, indices=list(indices))
        return [{"index": i, **r} for i, r in zip(indices, results, strict=True)]

    # -- optimization -----------------------------------------------------------------------------------
    def configure_optimizers(self):
        h = self.hparams
        groups = arch.decay_groups(self.model, h.weight_decay)
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
