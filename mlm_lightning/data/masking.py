"""The masking collator: dynamic padding, then BERT's 80/10/10 masking, seeded per example.

Each example arrives with a `mask_seed` derived from (seed, epoch, example index). Its mask is a pure
function of that seed, so masks are fresh every epoch, reproducible, identical whatever the batch size,
worker count or number of GPUs, and a resumed run regenerates exactly the masks it would have drawn.

Three ways to choose what is masked (`masking`):
- `token` (BERT): each maskable token independently with `mlm_probability`.
- `whole_word`: each word independently with `mlm_probability`, all its pieces together, so the model
  cannot recover a piece from its unmasked siblings. Words come from the example's `word_starts`
  (recorded by the fast tokenizer at tokenization, so any tokenizer works, not only `##` WordPiece).
- `span` (SpanBERT): runs of whole words with geometric lengths (mean `mean_span_length`, at most 10
  words), never across a special token, so the model learns to rebuild a phrase from its context.
In every mode about `mlm_probability` of the maskable tokens are chosen, for any line length, and each
chosen token then becomes [MASK] / a random token / stays itself (80/10/10 by default) on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from mlm_lightning.errors import check

IGNORE_INDEX = -100
MAX_SPAN_WORDS = 10  # SpanBERT's clip


def expected_span_words(mean_span_length: float) -> float:
    """Mean of SpanBERT's span length: geometric with p = 1/mean, clipped at MAX_SPAN_WORDS words."""
    return mean_span_length * (1 - (1 - 1 / mean_span_length) ** MAX_SPAN_WORDS)


class Masking:
    """What gets masked: one subclass per strategy, registered by `name` (a new strategy is one class here).

    `choose` returns a bool tensor like `input_ids`: True where a token gets a label. `maskable` is False on
    special tokens and padding. `select` holds one uniform draw per token; strategies with `draws = 3` get a
    second one (`extra`); `needs_words` strategies get each example's `word_starts`.
    """

    name: ClassVar[str]
    needs_words: ClassVar[bool] = False
    draws: ClassVar[int] = 2  # uniform draws per token: "choose" and [MASK]/random/keep, plus any extra
    registry: ClassVar[dict[str, type[Masking]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Masking.registry[cls.name] = cls

    def __init__(self, mlm_probability: float, mean_span_length: float = 3.0):
        self.mlm_probability, self.mean_span_length = mlm_probability, mean_span_length

    @classmethod
    def check(cls, mlm_probability: float, mean_span_length: float) -> None:
        """Refuse options this strategy cannot meet (one line, before any tokenization)."""

    def choose(self, input_ids, maskable, select, word_starts=None, extra=None) -> torch.Tensor:
        raise NotImplementedError


class TokenMasking(Masking):
    """BERT: each maskable token independently with `mlm_probability`.

    The masked share is mlm_probability whatever the line length (forcing one prediction per example
    over-masked short lines); a batch may mask nothing, and the model's step then contributes a zero loss."""

    name = "token"

    def choose(self, input_ids, maskable, select, word_starts=None, extra=None) -> torch.Tensor:
        return maskable & (select < self.mlm_probability)


def _word_first(input_ids, maskable, word_starts):
    """(each token's word's first column, word starts, row/segment starts) for the word-level strategies.

    A word also starts at every special token and right after one: a packed block may begin mid-word after
    [CLS], and no word or span reaches across [SEP]/[UNK]/[PAD]."""
    special = ~maskable
    after_special = F.pad(special[:, :-1], (1, 0), value=True)
    starts = word_starts | special | after_special
    columns = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    return torch.where(starts, columns, 0).cummax(dim=1).values, starts, after_special


class WholeWordMasking(Masking):
    """Each word independently with `mlm_probability`, all its pieces together, so the model cannot recover a
    piece from its unmasked siblings. A word is chosen by the draw at its first piece: each token is then masked
    with mlm_probability too, so the expected share matches token masking."""

    name = "whole_word"
    needs_words = True

    def choose(self, input_ids, maskable, select, word_starts=None, extra=None) -> torch.Tensor:
        word_first, _, _ = _word_first(input_ids, maskable, word_starts)
        return maskable & (select.gather(1, word_first) < self.mlm_probability)


class SpanMasking(Masking):
    """SpanBERT: runs of whole words with geometric lengths (mean `mean_span_length`, at most 10 words), never
    across a special token. Spans and the gaps between them alternate (gaps of at least one word, so spans never
    merge); the geometric gap mean is chosen so that spans cover mlm_probability of the words."""

    name = "span"
    needs_words = True
    draws = 3  # plus "does a line segment start inside a span" (read at its first word)

    def __init__(self, mlm_probability: float, mean_span_length: float = 3.0):
        super().__init__(mlm_probability, mean_span_length)
        self.gap_p = self.gap_probability(mlm_probability, mean_span_length)

    @staticmethod
    def gap_probability(mlm_probability: float, mean_span_length: float) -> float:
        span = expected_span_words(mean_span_length)
        return mlm_probability / (span * (1 - mlm_probability))

    @classmethod
    def check(cls, mlm_probability: float, mean_span_length: float) -> None:
        span = expected_span_words(mean_span_length)
        check(
            cls.gap_probability(mlm_probability, mean_span_length) <= 1,
            f"span masking cannot mask {mlm_probability} of the tokens with spans of {mean_span_length} words"
            f" on average (at most {span / (span + 1):.2f}); lower --data.mlm_probability or raise"
            " --data.mean_span_length",
        )

    def choose(self, input_ids, maskable, select, word_starts=None, extra=None) -> torch.Tensor:
        word_first, starts, after_special = _word_first(input_ids, maskable, word_starts)
        chosen_starts = self._spans(starts & maskable, after_special, select, extra)
        return maskable & chosen_starts.gather(1, word_first)

    def _spans(self, word_start, line_start, select, first_draw) -> torch.Tensor:
        """SpanBERT spans over the words of each line segment: True at the first piece of chosen words.

        Along a segment (the words between two special tokens) spans and gaps alternate; a span's length
        is geometric (p = 1/mean_span_length, clipped), a gap's is geometric with the mean that makes
        spans cover mlm_probability of the words; the segment starts inside a span with that probability.
        All segments of the batch are laid out at once (numpy: these small arrays are cheaper there): one
        row of run lengths per segment, expanded with `repeat`. Run j of a segment draws from the
        `select` value at the segment's j-th word, so a mask depends on its own example only.
        """
        out = np.zeros(word_start.numel(), dtype=bool)
        flat = np.flatnonzero(word_start.numpy().ravel())  # every maskable word's first token, row-major
        if flat.size:
            segment_start = line_start.numpy().ravel()[flat]  # first word after a special token or row start
            first_word = np.flatnonzero(segment_start)
            counts = np.diff(first_word, append=flat.size)[:, None]  # words per segment
            run = np.arange(counts.max())
            draws = select.numpy().ravel()[flat[np.minimum(first_word[:, None] + run, flat.size - 1)]]
            starts_in_span = first_draw.numpy().ravel()[flat[first_word]] < self.mlm_probability
            is_span = (run % 2 == 0) == starts_in_span[:, None]
            # geometric lengths >= 1 by inversion: 1 + floor(log(1-u) / log(1-p)); p = 1 gives length 1
            log_u = np.log1p(-draws.astype(np.float64))
            span_len = np.minimum(1 + np.floor(log_u / _log1m(1 / self.mean_span_length)), MAX_SPAN_WORDS)
            gap_len = 1 + np.floor(log_u / _log1m(self.gap_p))
            # a segment of n words needs at most n runs of >= 1 word: cut the runs at n words in all
            lengths = np.minimum(np.where(is_span, span_len, gap_len), counts).astype(np.int64)
            lengths = np.clip(counts - (np.cumsum(lengths, axis=1) - lengths), 0, lengths)
            states = np.repeat(is_span.ravel(), lengths.ravel())  # each segment's words, then the next's
            segment = np.cumsum(segment_start) - 1
            offset = np.arange(flat.size) - first_word[segment]
            out[flat] = states[(np.cumsum(counts) - counts[:, 0])[segment] + offset]
        return torch.from_numpy(out).view(word_start.shape)



def check_masking(masking: str, mlm_probability: float, mean_span_length: float) -> None:
    """Validate the masking options (`MLMDataModule` calls this early, before any tokenization)."""
    names = ", ".join(Masking.registry)
    check(masking in Masking.registry, f"masking must be one of {names}, got {masking!r}")
    check(0 < mlm_probability < 1, f"mlm_probability must be in (0, 1), got {mlm_probability}; e.g. 0.15")
    check(
        mean_span_length >= 1,
        f"mean_span_length is counted in words and must be at least 1, got {mean_span_length}; e.g. 3",
    )
    Masking.registry[masking].check(mlm_probability, mean_span_length)


class MaskingCollator:
    """Pads a list of `{"input_ids", "mask_seed"}` examples (plus `"word_starts"` for word masking) for MLM.

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
        *,
        masking: str = "token",
        mean_span_length: float = 3.0,
    ):
        check_masking(masking, mlm_probability, mean_span_length)
        self.mlm_probability = mlm_probability
        self.mask_replace_prob = mask_replace_prob
        self.random_replace_prob = random_replace_prob
        self.pad_to_multiple_of = pad_to_multiple_of
        self.masking = masking
        self.strategy = Masking.registry[masking](mlm_probability, mean_span_length)
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
        real = torch.arange(longest) < torch.tensor(lengths)[:, None]
        fields, words = self.strategy.draws, self.strategy.needs_words
        ids, draws, randoms, starts = [], [], [], []
        for example, n in zip(examples, lengths, strict=True):
            ids.append(np.asarray(example["input_ids"], dtype=np.int64))
            self._gen.manual_seed(int(example["mask_seed"]))
            draws.append(torch.rand(fields, n, generator=self._gen))
            randoms.append(torch.randint(len(self.random_candidates), (n,), generator=self._gen))
            if words:
                word_starts = example.get("word_starts")
                check(
                    word_starts is not None and len(word_starts) == n,
                    f"masking {self.masking!r} needs the word boundaries of every example (`word_starts`, one"
                    " bool per token, recorded by a fast tokenizer at tokenization); got "
                    + ("none" if word_starts is None else f"{len(word_starts)} for {n} tokens")
                    + ": use data prepared with word boundaries, or --data.masking token",
                )
                starts.append(np.asarray(word_starts, dtype=bool))
        # one scatter per field instead of a slice assignment per row (row-major order = concatenation order)
        input_ids = torch.full(real.shape, self.pad_id).masked_scatter_(real, torch.from_numpy(np.concatenate(ids)))
        draws = torch.cat(draws, dim=1)
        select, replace, *rest = (torch.ones(real.shape).masked_scatter_(real, d) for d in draws)
        random_tokens = torch.zeros(real.shape, dtype=torch.long).masked_scatter_(real, torch.cat(randoms))
        word_starts = None
        if starts:
            word_starts = torch.zeros(real.shape, dtype=torch.bool).masked_scatter_(
                real, torch.from_numpy(np.concatenate(starts))
            )
        masked = self.choose(input_ids, select, word_starts, rest[0] if rest else None)
        return self.mask(input_ids, masked, replace, self.random_candidates[random_tokens], padded)

    def choose(self, input_ids, select, word_starts=None, extra=None) -> torch.Tensor:
        """Which tokens get a label: a bool tensor like `input_ids`, never on special tokens or padding."""
        maskable = ~torch.isin(input_ids, self.special_ids)
        return self.strategy.choose(input_ids, maskable, select, word_starts, extra)

    def mask(self, input_ids, masked, replace, random_tokens, padded: bool) -> dict:
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


def _log1m(p: float) -> float:
    """log(1 - p), -inf at p = 1 (every geometric length is then 1)."""
    return math.log1p(-p) if p < 1 else -math.inf
