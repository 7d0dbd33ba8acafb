"""Fine-tuning one classifier with Lightning, and the encoding both modes share."""

from __future__ import annotations

import inspect
import math

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from mlm_lightning.evaluate.data import Rows


def encode(tokenizer, rows: Rows, max_length: int, accepted: set[str]) -> list[dict]:
    """Each row's token ids (and token types, for a family that takes them), truncated to `max_length`."""
    if not len(rows):
        return []
    encoded = tokenizer(rows.texts, rows.pairs, truncation=True, max_length=max_length, verbose=False)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in encoded and k in accepted]
    return [{k: encoded[k][i] for k in keys} for i in range(len(rows))]


def accepted_inputs(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


class Batches:
    """A collate function: padded to the batch's longest row (the tokenizer's own `pad`), labels beside."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[dict, int]]) -> dict:
        batch = self.tokenizer.pad([x for x, _ in items], return_tensors="pt")
        batch["labels"] = torch.tensor([y for _, y in items])
        return dict(batch)


def loader(examples: list[dict], labels: list[int], tokenizer, batch_size: int, shuffle: bool = False,
           seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(list(zip(examples, labels, strict=True)), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, collate_fn=Batches(tokenizer))


def scores(num_classes: int) -> torch.nn.ModuleDict:
    """Accuracy and macro-F1 (classes absent from both the predictions and the labels do not count)."""
    return torch.nn.ModuleDict({"accuracy": MulticlassAccuracy(num_classes, average="micro"),
                                "f1_macro": MulticlassF1Score(num_classes, average="macro")})


class SequenceClassifier(L.LightningModule):
    """A transformers `*ForSequenceClassification` trained with AdamW (no decay on norms and biases, as `arch`
    groups them), a linear warm-up over the first `warmup` share of the steps and a linear decay to zero."""

    def __init__(self, model, num_classes: int, lr: float, weight_decay: float, warmup: float):
        super().__init__()
        model.train()  # (from_pretrained returns a model in eval mode, and Lightning keeps the modes it finds)
        self.model, self.lr, self.weight_decay, self.warmup = model, lr, weight_decay, warmup
        self.metrics = torch.nn.ModuleDict({"val": scores(num_classes), "test": scores(num_classes)})

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def _score(self, batch, split: str) -> None:
        labels = batch.pop("labels")
        predictions = self.model(**batch).logits.argmax(-1)
        for name, metric in self.metrics[split].items():
            metric.update(predictions, labels)
            self.log(f"{split}/{name}", metric, on_step=False, on_epoch=True, batch_size=len(labels))

    def validation_step(self, batch, batch_idx):
        self._score(batch, "val")

    def test_step(self, batch, batch_idx):
        self._score(batch, "test")

    def configure_optimizers(self):
        from transformers import get_linear_schedule_with_warmup

        from mlm_lightning.model import arch

        optimizer = torch.optim.AdamW(arch.param_groups(self.model, self.weight_decay), lr=self.lr)
        steps = max(1, self.trainer.estimated_stepping_batches)
        schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(self.warmup * steps), steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def finetune(model, tokenizer, data: dict, num_classes: int, seed: int, epochs: int, batch_size: int, lr: float,
             weight_decay: float, warmup: float, accelerator: str, precision: str) -> dict:
    """Train `model` on data["train"] and score it on data["validation"] (if any) and data["test"]; `data`: split
    -> (encoded examples, class ids). Returns {split: {metric: value}}."""
    L.seed_everything(seed, verbose=False)
    module = SequenceClassifier(model, num_classes, lr, weight_decay, warmup)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator=accelerator, devices=1,  # one device: runs are many and short
        precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    train = loader(*data["train"], tokenizer, batch_size, shuffle=True, seed=seed)
    has_val = len(data["validation"][0]) > 0
    trainer.fit(module, train, loader(*data["validation"], tokenizer, batch_size) if has_val else None)
    out = {}
    if has_val:
        out["validation"] = {k.split("/")[1]: float(v) for k, v in trainer.callback_metrics.items()
                             if k.startswith("val/")}
    result = trainer.test(module, loader(*data["test"], tokenizer, batch_size), verbose=False)[0]
    out["test"] = {k.split("/")[1]: float(v) for k, v in result.items()}
    return out
