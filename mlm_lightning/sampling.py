"""Batch plans (shuffled, length-grouped or token-budget) and a data loader that resumes mid-epoch exactly.

A plan is a pure function of (seed, epoch): resuming needs only the epoch and how many batches were done,
never replaying the batches already seen. Batches carry `(epoch, index)` keys so the dataset can derive
each example's mask seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from torch.utils.data import DataLoader, Sampler

MEGABATCH_FACTOR = 50  # length grouping sorts within windows of 50 batches, so batches stay random


class BatchPlan(Sampler[list[tuple[int, int]]]):
    """Yields lists of `(epoch, example index)`; every example exactly once per epoch (single process).

    - `shuffle=False`: fixed order (validation), sorted by length when `group_by_length`.
    - `group_by_length`: shuffle, then sort within mega-batches of `50 * batch_size`, then shuffle batches:
      similar lengths share a batch so little compute goes to padding.
    - `max_tokens`: instead of a fixed batch size, fill each batch up to `max_tokens` padded tokens.
    - `num_replicas`/`rank` (DDP): in training each process takes every `num_replicas`-th batch (all take the
      same number); in evaluation every `num_replicas`-th example (all examples are evaluated).
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        *,
        max_tokens: int | None = None,
        group_by_length: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        epoch_key: int | None = None,
    ):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.group_by_length = group_by_length
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch_key = epoch_key  # fixed mask key (validation): same masks at every evaluation
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        self._cache: tuple[int, list[np.ndarray]] | None = None
        # Lightning calls set_epoch() on `loader.batch_sampler.sampler`, never on the batch sampler itself
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """The next iteration of `epoch` starts after its first `batches_done` batches."""
        self.epoch = epoch
        self._resume = (epoch, batches_done)

    def plan(self, epoch: int) -> list[np.ndarray]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.num_replicas > 1 and not self.shuffle:
            # evaluation: every process takes every num_replicas-th example, none is dropped
            order = order[self.rank :: self.num_replicas]
            n = len(order)
        if self.group_by_length:
            window = n if not self.shuffle else self.batch_size * MEGABATCH_FACTOR
            if self.max_tokens:
                window = max(window, self.max_tokens // max(1, int(self.lengths.min())))
            chunks = [order[i : i + window] for i in range(0, n, window)]
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks]) if n else order
        if self.max_tokens:
            batches, start, longest = [], 0, 0
            for i, idx in enumerate(order):
                longest_with = max(longest, int(self.lengths[idx]))
                if i > start and longest_with * (i - start + 1) > self.max_tokens:
                    batches.append(order[start:i])
                    start, longest_with = i, int(self.lengths[idx])
                longest = longest_with
            if start < n:
                batches.append(order[start:])
        else:
            batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.shuffle and self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.num_replicas > 1 and self.shuffle:
            # training: every process takes every num_replicas-th batch, as many as the others (lockstep)
            per_rank = len(batches) // self.num_replicas
            batches = batches[self.rank :: self.num_replicas][:per_rank]
        self._cache = (epoch, batches)
        return batches

    def __len__(self) -> int:
        return len(self.plan(self.epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        start = 0
        if self._resume is not None and self._resume[0] == epoch:
            start = self._resume[1]
        self._resume = None
        key = epoch if self.epoch_key is None else self.epoch_key
        for batch in self.plan(epoch)[start:]:
            yield [(key, int(i)) for i in batch]


class ResumableDataLoader(DataLoader):
    """A DataLoader with `state_dict`/`load_state_dict`, which Lightning saves in every checkpoint.

    `progress()` returns how many batches of the current epoch the trainer has finished (its own counter:
    the loader itself runs ahead because of prefetching, so it cannot know).
    """

    def __init__(self, dataset, batch_sampler: BatchPlan, progress: Callable[[], int] | None = None, **kwargs):
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict:
        plan: BatchPlan = self.batch_sampler
        done = self.progress() if self.progress else 0
        epoch = plan.epoch
        if done >= len(plan):  # the epoch is over: resume at the start of the next one
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_done": done, "seed": plan.seed}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.resume(int(state["epoch"]), int(state["batches_done"]))
