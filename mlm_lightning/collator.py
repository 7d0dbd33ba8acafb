"""The masking collator: dynamic padding, then BERT's 80/10/10 masking, seeded per example.

Each example arrives with a `mask_seed` derived from (seed, epoch, example index). Its mask is a pure
function of that seed, so masks are fresh every epoch, reproducible, identical whatever the batch size,
worker count or number of GPUs, and a resumed run regenerates exactly the masks it would have drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


def mask_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one example in one epoch (SplitMix64-style mixing of the three ints)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEDA3A1F9D5B) & (2**64 - 1)
    return (x ^ (x >> 29)) & (2**63 - 1)


class MaskingCollator:
    """Pads a list of `{"input_ids", "mask_seed"}` examples and masks them for MLM.

    Returns `input_ids`, `labels` (-100 where not masked), `masked_positions` (flat indices into
    `input_ids.view(-1)`, so the head can run on masked rows only without a host sync), `masked_labels`,
    `attention_mask` only when the batch has padding, and the counts `num_tokens`/`num_real_tokens`.
    """

    def __init__(
        self,
        tokenizer,
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        pad_to_multiple_of: int | None = 8,
    ):
        self.mlm_probability = mlm_probability
        self.mask_replace_prob = mask_replace_prob
        self.random_replace_prob = random_replace_prob
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = tokenizer.pad_token_id
        self.mask_id = tokenizer.mask_token_id
        special = set(tokenizer.all_special_ids) | {self.pad_id}
        vocab = len(tokenizer)
        self.special_ids = torch.tensor(sorted(special), dtype=torch.long)
        # random replacements never insert [CLS]/[SEP]/[PAD]/[MASK]
        self.random_candidates = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
        self._gen = torch.Generator()

    # a torch.Generator cannot be sent to a spawned DataLoader worker; it is re-seeded per example anyway
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_gen"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _gen=torch.Generator())

    def __call__(self, examples: Sequence[dict]) -> dict:
        lengths = [len(e["input_ids"]) for e in examples]
        longest = max(lengths)
        padded = any(n != longest for n in lengths)
        if padded and self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), longest), self.pad_id, dtype=torch.long)
        select = torch.ones(len(examples), longest)  # uniform draw deciding "mask this token"
        replace = torch.ones(len(examples), longest)  # uniform draw deciding [MASK]/random/keep
        random_tokens = torch.zeros(len(examples), longest, dtype=torch.long)
        for row, (example, n) in enumerate(zip(examples, lengths, strict=True)):
            input_ids[row, :n] = torch.as_tensor(np.asarray(example["input_ids"], dtype=np.int64))
            self._gen.manual_seed(int(example["mask_seed"]))
            select[row, :n] = torch.rand(n, generator=self._gen)
            replace[row, :n] = torch.rand(n, generator=self._gen)
            random_tokens[row, :n] = torch.randint(len(self.random_candidates), (n,), generator=self._gen)
        return self.mask(input_ids, select, replace, self.random_candidates[random_tokens], padded)

    def mask(self, input_ids, select, replace, random_tokens, padded: bool) -> dict:
        maskable = ~torch.isin(input_ids, self.special_ids)
        select = select.masked_fill(~maskable, 2.0)  # 2.0 is never < p and never the row minimum
        masked = select < self.mlm_probability
        # every example with something maskable gets at least one prediction (no empty loss)
        empty = ~masked.any(dim=1) & maskable.any(dim=1)
        if empty.any():
            rows = empty.nonzero().squeeze(1)
            masked[rows, select[rows].argmin(dim=1)] = True
        labels = torch.where(masked, input_ids, IGNORE_INDEX)
        to_mask = masked & (replace < self.mask_replace_prob)
        to_random = masked & ~to_mask & (replace < self.mask_replace_prob + self.random_replace_prob)
        corrupted = torch.where(to_mask, self.mask_id, input_ids)
        corrupted = torch.where(to_random, random_tokens, corrupted)
        positions = masked.view(-1).nonzero().squeeze(1)
        real = input_ids != self.pad_id if padded else None
        batch = {
            "input_ids": corrupted,
            "labels": labels,
            "masked_positions": positions,
            "masked_labels": labels.view(-1)[positions],
            "num_tokens": input_ids.numel(),
            "num_real_tokens": int(real.sum()) if padded else input_ids.numel(),
        }
        if padded:
            batch["attention_mask"] = real.long()
        return batch
