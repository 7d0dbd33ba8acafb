"""Weighted mixtures of corpora: `--data.train_files '[{"path": "domain/", "weight": 0.8}, {"path": ..., ...}]'`.

Each source is tokenized into its own cache (the key a plain run on the same files would have, so a source's
cache is shared with such runs); `sampling.MixturePlan` draws batches by weight (by tokens); every batch comes
from one source and carries its name (`batch["source"]`), which `SourceLogger` turns into
`perf/source_share/NAME` (training) and `val/loss/NAME` (validation, when there are several sources).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Dataset

from mlm_lightning.data import corpus
from mlm_lightning.data.seeds import mask_seed
from mlm_lightning.errors import check
from mlm_lightning.metrics import SOURCE_SHARE, VAL_LOSS

SOURCE_KEYS = {"path", "weight", "name", "val_files"}


@dataclass
class Source:
    name: str
    paths: list[str]
    weight: float
    val_paths: list[str] | None = None


def is_mixture(train_files) -> bool:
    return isinstance(train_files, (list, tuple)) and any(isinstance(x, dict) for x in train_files)


def _default_name(path) -> str:
    spec = path if isinstance(path, str) else (path[0] if path else "source")
    base = os.path.basename(str(spec).rstrip("/")) or "source"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base.split(".")[0]) or "source"


def parse_sources(train_files: Sequence, storage_options: dict | None = None) -> list[Source]:
    """The sources of a mixture spec, their files resolved (local paths or URLs); one line on any mistake."""
    example = '[{"path": "domain/", "weight": 0.8}, {"path": "s3://bucket/general/", "weight": 0.2}]'
    sources: list[Source] = []
    for i, item in enumerate(train_files):
        check(isinstance(item, dict) and "path" in item,
              f"train_files item {i + 1} is {item!r}; a mixture lists sources like {example}")
        unknown = set(item) - SOURCE_KEYS
        check(not unknown, f"train_files item {i + 1} has unknown keys {sorted(unknown)}; a source has"
              f" {sorted(SOURCE_KEYS)}")
        weight = item.get("weight", 1.0)
        check(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0,
              f"train_files item {i + 1}: weight must be a positive number, got {weight!r}")
        name = str(item.get("name") or _default_name(item["path"]))
        check(re.fullmatch(r"[A-Za-z0-9_.-]+", name) is not None,
              f"train_files item {i + 1}: name {name!r} may hold only letters, digits, _ . - (it names metrics)")
        val = item.get("val_files")
        sources.append(Source(
            name, corpus.resolve_files(item["path"], f"train_files[{i}].path", storage_options), float(weight),
            corpus.resolve_files(val, f"train_files[{i}].val_files", storage_options) if val else None))
    names = [s.name for s in sources]
    check(len(set(names)) == len(names), f"the sources' names {names} repeat; give each a \"name\"")
    check(all(s.val_paths is None for s in sources) or all(s.val_paths for s in sources),
          "give every source its own val_files, or none (then each holds out --data.val_fraction of its lines)")
    return sources


def source_seed(seed: int, source: int) -> int:
    """Source `source`'s order seed in a mixture (each source shuffled independently of the others)."""
    return mask_seed(seed, -2, source)


class MixtureDataset(Dataset):
    """Several `MLMDataset`s as one: index `offsets[s] + i` is source s's example i.

    The mask seed is drawn from the global index, so two sources' i-th examples get different masks."""

    def __init__(self, parts: list, names: list[str], seed: int):
        self.parts, self.names, self.seed = parts, names, seed
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key) -> dict:
        epoch, g = key if isinstance(key, tuple) else (0, key)
        g = int(g)
        s = int(np.searchsorted(self.offsets, g, side="right") - 1)
        item = self.parts[s][(epoch, g - int(self.offsets[s]))]
        item["mask_seed"] = mask_seed(self.seed, epoch, g)
        item["source"] = self.names[s]
        return item


class MixtureCollator:
    """The masking collator, plus the batch's source name (every batch of a mixture comes from one source)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: Sequence[dict]) -> dict:
        source = examples[0].pop("source")
        for e in examples[1:]:
            e.pop("source")
        batch = self.collator(examples)
        batch["source"] = source
        return batch


class SourceLogger(Callback):
    """Logs `perf/source_share/NAME` (each source's share of the real tokens trained on since the fit started)
    and, with several sources, `val/loss/NAME` (each source's validation loss).

    The data module attaches it to its trainer (the data module is what knows about sources, and a mixture
    should report its shares whether or not the CLI built the trainer). The counts are the collator's Python
    ints: no host sync."""

    def __init__(self, names: list[str]):
        self.names = names
        self.tokens = dict.fromkeys(names, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not isinstance(batch, dict) or "source" not in batch:
            return
        self.tokens[batch["source"]] += int(batch["num_real_tokens"])
        total = max(1, sum(self.tokens.values()))
        pl_module.log_dict({f"{SOURCE_SHARE}/{n}": t / total for n, t in self.tokens.items()}, batch_size=1)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if len(self.names) < 2 or not isinstance(batch, dict) or "source" not in batch or outputs is None:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        n_masked = batch["masked_positions"].numel()  # a shape: no sync
        pl_module.log(f"{VAL_LOSS}/{batch['source']}", loss.detach(), batch_size=n_masked, sync_dist=True,
                      on_step=False, on_epoch=True)


def attach_logger(trainer, names: list[str]) -> None:
    """Give `trainer` a `SourceLogger` unless it has one (a data module reused by a new trainer attaches it again)."""
    if trainer is not None and not any(isinstance(c, SourceLogger) for c in trainer.callbacks):
        trainer.callbacks.append(SourceLogger(names))
