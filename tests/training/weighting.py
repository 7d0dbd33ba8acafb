"""Batches of unequal masked counts, and a one-step fit that records the parameters after one optimizer step:
shared by `test_token_weighting.py` and run as a script for the many-process case
(`python -m tests.training.weighting OUT DEVICES`, each process training on its own rows)."""

from __future__ import annotations

import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

from mlm_lightning.model import MLMModule
from tests.support.models import TINY
from tests.support.text import sentences

# rows of token ids and the columns masked in each: micro-batch A masks 2 tokens, B masks 11 (and is longer)
ROWS_A = [([5, 17, 23, 42, 8], [1]), ([9, 31, 44, 12], [2])]
ROWS_B = [([6, 18, 27, 33, 51, 60, 11], [1, 2, 3, 5]), ([14, 29, 38, 47, 56, 65, 70, 72], [0, 2, 4, 6, 7]),
          ([7, 19, 21, 30], [1, 3])]
# one step's optimizer settings under which the update follows the gradient itself (eps far above |g|: AdamW's first
# step is then ~ lr * g / eps, not lr * sign(g)), so a wrongly weighted gradient moves the parameters elsewhere
STEP = dict(learning_rate=0.5, head_learning_rate=0.5, eps=1.0, weight_decay=0.0, warmup_steps=0,
            schedule="constant", dropout=0.0)


def batch(rows: list[tuple[list[int], list[int]]], mask_id: int) -> dict:
    """A collated batch as `MLMDataModule`'s collator makes it: padded rows, labels at the masked columns only."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for r, (ids, masked) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention[r, : len(ids)] = 1
        for c in masked:
            labels[r, c] = ids[c]
            input_ids[r, c] = mask_id
    positions = torch.nonzero(labels.view(-1) != -100).view(-1)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "masked_positions": positions,
            "masked_labels": labels.view(-1)[positions], "num_tokens": input_ids.numel(),
            "num_real_tokens": int(attention.sum())}


def tokenizer():
    import tempfile

    from mlm_lightning.data.tokenizer import train_wordpiece

    return train_wordpiece(sentences(300), tempfile.mkdtemp(prefix="weighting-tok-"), 200, 64)


class Module(MLMModule):
    """Trains on `micro_batches[rank]` (a list of batches per process), one optimizer step."""

    micro_batches: list[list[dict]] = []

    def train_dataloader(self):
        return DataLoader(self.micro_batches[self.global_rank], batch_size=None)


def one_step(micro_batches: list[list[dict]], tok, devices: int = 1, accumulate: int = 1, fused: bool = False,
             module_kw: dict | None = None, **trainer_kw) -> tuple:
    """(parameters after one optimizer step, the logged train/loss, this process's rank)."""
    torch.manual_seed(0)
    model = Module(**{**TINY, **STEP, **(module_kw or {})}, fused_optimizer=fused)
    model.micro_batches = micro_batches
    model.tokenizer = tok
    model.configure_model()  # (built here, seeded: a DDP process reseeds from PL_GLOBAL_SEED before it would)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
                        accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        log_every_n_steps=1, **trainer_kw)
    trainer.fit(model)
    params = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    return params, float(trainer.callback_metrics.get("train/loss", float("nan"))), trainer.global_rank


if __name__ == "__main__":  # OUT DEVICES: each of DEVICES processes trains on its own micro-batch
    out, devices = sys.argv[1], int(sys.argv[2])
    tok = tokenizer()
    a, b = batch(ROWS_A, tok.mask_token_id), batch(ROWS_B, tok.mask_token_id)
    per_process = [[a], [b]] if devices == 2 else [[batch(ROWS_A + ROWS_B, tok.mask_token_id)]]
    params, loss, rank = one_step(per_process, tok, devices=devices)
    if rank == 0:
        torch.save({"params": params, "loss": loss}, out)
