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
    - `max_tokens`: instead of a fixed batch size, fill each batch up to `max_tokens` tokens after padding to
      a multiple of `pad_multiple`; the number of batches is the same in every epoch.
    - `num_replicas`/`rank` (DDP): in training each process takes every `num_replicas`-th batch (all take the
      same number); in evaluation every `num_replicas`-th example (all examples are evaluated), in as many
      batches as the other processes when it has enough examples (`lockstep`).
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
        pad_multiple: int = 8,
        drop_last: bool = False,
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
        self.pad_multiple = pad_multiple
        self.drop_last = drop_last  # training: full batches only (static shapes for torch.compile and GPUs)
        self.lockstep = True  # evaluation: every process has the same number of batches
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

    def _padded(self, longest: int) -> int:
        """The padded length of a batch whose longest example is `longest` (the collator pads to a multiple)."""
        return -(-longest // self.pad_multiple) * self.pad_multiple

    def _token_batches(self, order: np.ndarray) -> list[np.ndarray]:
        """Batches of at most `max_tokens` padded tokens, from examples sorted by length.

        The cut points depend only on the sorted sequence of lengths, the same in every epoch, so the number of
        batches never changes between epochs (Lightning fixes an epoch's length, and the LR schedule its total,
        from epoch 0). Which examples of equal length share a batch follows `order` (random per epoch)."""
        order = order[np.argsort(-self.lengths[order], kind="stable")]
        batches, start = [], 0
        for i in range(1, len(order) + 1):
            longest = int(self.lengths[order[start]])  # sorted: the first is the longest
            if i == len(order) or self._padded(longest) * (i + 1 - start) > self.max_tokens:
                batches.append(order[start:i])
                start = i
        return batches

    def _batches(self, order: np.ndarray, rng: np.random.Generator | None) -> list[np.ndarray]:
        n = len(order)
        if self.max_tokens:
            return self._token_batches(order)
        if self.group_by_length:
            window = n if rng is None else self.batch_size * MEGABATCH_FACTOR
            chunks = [order[i : i + window] for i in range(0, n, window)]
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks]) if n else order
        if rng is not None and self.drop_last:
            n -= n % self.batch_size  # only full batches (the examples left out change every epoch)
        return [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]

    def plan(self, epoch: int) -> list[np.ndarray]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            batches = self._batches(rng.permutation(len(self.lengths)), rng)
            if self.group_by_length or self.max_tokens:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            # training: every process takes every num_replicas-th batch, as many as the others (lockstep)
            per_rank = len(batches) // self.num_replicas
            batches = batches[self.rank :: self.num_replicas][:per_rank]
        else:
            # evaluation: every process takes every num_replicas-th example (none is dropped), split into as many
            # batches as the process with the most has, so that all stay in step batch by batch (a signal
            # during validation is agreed on after every batch)
            orders = [np.arange(r, len(self.lengths), self.num_replicas) for r in range(self.num_replicas)]
            target = max(len(self._batches(o, None)) for o in orders)
            batches = self._batches(orders[self.rank], None)
            while len(batches) < target and max(map(len, batches)) > 1:
                i = max(range(len(batches)), key=lambda j: len(batches[j]))
                batches[i : i + 1] = np.array_split(batches[i], 2)
            self.lockstep = all(len(o) >= target for o in orders)
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


PASSES = 1 << 16  # mask keys of a mixture: epoch * PASSES + pass of the source within the epoch


class MixturePlan(Sampler[list[tuple[int, int]]]):
    """Batches from several sources, each source's batches from its own seeded `BatchPlan`, interleaved so that
    each source's share of the tokens follows its weight.

    Interleaving by token deficit (stride scheduling): the next batch comes from the source furthest below its
    weight (fewest tokens / weight so far), so at any point of an epoch each share is within one batch of its
    weight; random draws would stray by sqrt(w(1-w)/batches), 3 points after 200 batches. What each source
    contributes, and in which order, is its plan's seeded shuffle. Indices are global: source s's example i is
    `offsets[s] + i` (a `MixtureDataset`).

    An epoch ends when the first source runs out of batches (`epoch_tokens` None: no example is seen twice in an
    epoch), or after `epoch_tokens` tokens (all processes together), a source that runs out starting a new
    seeded pass. Like `BatchPlan`, the epoch's plan is a pure function of (seed, epoch), the same for any
    number of loader workers; process `rank` takes every `num_replicas`-th batch of it.
    """

    def __init__(self, plans: list[BatchPlan], lengths: list[np.ndarray], weights: list[float], offsets: list[int],
                 *, seed: int = 0, num_replicas: int = 1, rank: int = 0, epoch_tokens: int | None = None):
        self.plans, self.lengths, self.offsets = plans, [np.asarray(x) for x in lengths], [int(o) for o in offsets]
        total = float(sum(weights))
        self.weights = np.array([w / total for w in weights])
        self.seed, self.num_replicas, self.rank, self.epoch_tokens = seed, num_replicas, rank, epoch_tokens
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        self._cache: tuple[int, list] | None = None
        self.sampler = self  # (Lightning calls set_epoch on `batch_sampler.sampler`)

    set_epoch = BatchPlan.set_epoch
    resume = BatchPlan.resume

    def schedule(self, epoch: int) -> list[tuple[int, int, np.ndarray]]:
        """(source, pass, local example indices) of every batch of `epoch`, all processes together."""
        n = len(self.plans)
        passes = [0] * n
        batches = [plan.plan(epoch * PASSES) for plan in self.plans]
        tokens = np.zeros(n)
        pos = [0] * n
        out = []
        while True:
            s = int(np.argmin(tokens / self.weights))
            if pos[s] == len(batches[s]):
                if self.epoch_tokens is None or not batches[s]:
                    break  # the first source to run out ends the epoch
                passes[s] += 1
                batches[s], pos[s] = self.plans[s].plan(epoch * PASSES + passes[s]), 0
            b = batches[s][pos[s]]
            pos[s] += 1
            out.append((s, passes[s], b))
            tokens[s] += self.lengths[s][b].sum()
            if self.epoch_tokens is not None and tokens.sum() >= self.epoch_tokens:
                break
        return out

    def plan(self, epoch: int) -> list[tuple[int, int, np.ndarray]]:
        if self._cache is None or self._cache[0] != epoch:
            batches = self.schedule(epoch)
            per_rank = len(batches) // self.num_replicas  # lockstep: every process the same number
            self._cache = (epoch, batches[self.rank :: self.num_replicas][:per_rank])
        return self._cache[1]

    def __len__(self) -> int:
        return len(self.plan(self.epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epoch, 0
        if self._resume is not None and self._resume[0] == epoch:
            start = self._resume[1]
        self._resume = None
        for s, p, batch in self.plan(epoch)[start:]:
            key = epoch * PASSES + p
            yield [(key, self.offsets[s] + int(i)) for i in batch]


class ConcatPlan(Sampler[list[tuple[int, int]]]):
    """Evaluation over several sources: each source's own evaluation `BatchPlan` in turn (its batches never mix
    sources), indices shifted by the source's offset in a `MixtureDataset`."""

    def __init__(self, plans: list[BatchPlan], offsets: list[int]):
        self.plans, self.offsets = plans, [int(o) for o in offsets]
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        for p in self.plans:
            p.set_epoch(epoch)

    @property
    def lockstep(self) -> bool:
        return all(len(p) >= 0 and p.lockstep for p in self.plans)  # (len() computes each plan's lockstep)

    def __len__(self) -> int:
        return sum(len(p) for p in self.plans)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for plan, offset in zip(self.plans, self.offsets, strict=True):
            for batch in plan:
                yield [(key, offset + i) for key, i in batch]


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
        return {"epoch": epoch, "batches_done": done, "seed": plan.seed, "num_replicas": plan.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        done = int(state["batches_done"])
        saved = int(state.get("num_replicas", self.batch_sampler.num_replicas))
        if saved != self.batch_sampler.num_replicas:
            # another number of processes: continue after as many batches of the whole run as were done (the
            # batches are split between processes differently, so this is close to, not exactly, the same data)
            done = done * saved // self.batch_sampler.num_replicas
        self.batch_sampler.resume(int(state["epoch"]), done)
