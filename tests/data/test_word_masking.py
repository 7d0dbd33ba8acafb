"""Whole-word and span masking: words stay whole, the masked share is mlm_probability, spans follow their mean.

Word boundaries come from the fast tokenizer's `word_ids()`, as the data pipeline records them, for a
WordPiece tokenizer (`##` pieces) and a byte-level BPE one (no `##` at all).
"""

import random
from itertools import pairwise

import numpy as np
import pytest
import torch

from mlm_lightning.data.masking import MaskingCollator, check_masking, expected_span_words
from mlm_lightning.data.seeds import mask_seed
from mlm_lightning.data.tokenizer import train_wordpiece
from mlm_lightning.errors import MLMError
from tests.support.models import bpe_tokenizer

SYLLABLES = ["ka", "lo", "mi", "tre", "spo", "ven", "dar", "qui", "bel", "nox", "ur", "esh"]


def lines(n: int, seed: int = 0, max_words: int = 25) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(300)]
    return [" ".join(rng.choices(words, k=rng.randint(1, max_words))) + rng.choice([" .", " ,", ""]) for _ in range(n)]


@pytest.fixture(scope="module", params=["wordpiece", "bpe"])
def tokenizer(request, tmp_path_factory):
    texts = lines(2000, seed=1)
    if request.param == "bpe":
        tok = bpe_tokenizer(texts)
        assert not any(t.startswith("##") for t in tok.get_vocab())  # boundaries cannot come from `##`
        return tok
    return train_wordpiece(texts, str(tmp_path_factory.mktemp("tok") / "wp"), 200, 128)


def stream(tokenizer, texts):
    """Token ids, word starts and a word key per token, each line followed by [SEP] (as the dataset stores)."""
    enc = tokenizer(texts, add_special_tokens=False)
    ids, starts, keys, key = [], [], [], 0
    for i, line_ids in enumerate(enc["input_ids"]):
        words = enc.word_ids(i)
        for j, w in enumerate(words):
            start = j == 0 or w != words[j - 1]
            key += start
            ids.append(line_ids[j]), starts.append(start), keys.append(key)
        key += 1
        ids.append(tokenizer.sep_token_id), starts.append(True), keys.append(-1)
    return np.array(ids), np.array(starts), np.array(keys)


_PACKED = {}


def packed(tokenizer, n_lines=3000, length=128, seed=0, max_words=40):
    """Blocks of [CLS] + length-1 stream tokens, as MLMDataset packs them: lines and words cut at block edges."""
    key = (id(tokenizer), n_lines, length, seed, max_words)
    if key not in _PACKED:  # shared by the tests (read-only)
        _PACKED[key] = _packed(tokenizer, n_lines, length, seed, max_words)
    return _PACKED[key]


def _packed(tokenizer, n_lines, length, seed, max_words):
    ids, starts, keys = stream(tokenizer, lines(n_lines, seed=seed, max_words=max_words))
    body = length - 1
    return [
        {
            "input_ids": np.concatenate([[tokenizer.cls_token_id], ids[i * body : (i + 1) * body]]),
            "word_starts": np.concatenate([[True], starts[i * body : (i + 1) * body]]),
            "keys": np.concatenate([[-1], keys[i * body : (i + 1) * body]]),
            "mask_seed": mask_seed(seed, 0, i),
        }
        for i in range(len(ids) // body)
    ]


def collate_all(collator, examples, batch_size=32):
    """Per example: (word-level masked flags per segment, token masked flags, corrupted ids)."""
    out = []
    for b in range(0, len(examples), batch_size):
        chunk = examples[b : b + batch_size]
        batch = collator(chunk)
        for row, e in enumerate(chunk):
            n = len(e["input_ids"])
            out.append((batch["labels"][row, :n] != -100, batch["input_ids"][row, :n]))
    return out


def words_of(example, masked):
    """Words of one example: (segments of word masked flags, whether each word's pieces agree, pieces per word).

    Segments are the runs of words between special tokens; a word cut at the block's start is its own word.
    """
    keys, flags = np.asarray(example["keys"]), masked.numpy()
    cut = np.flatnonzero((keys != np.concatenate([[-1], keys[:-1]])) | (keys == -1))  # a word or special starts
    low, high = np.minimum.reduceat(flags, cut), np.maximum.reduceat(flags, cut)
    special = keys[cut] == -1
    segment = np.cumsum(special)[~special]
    words = high[~special]
    segments = [s.tolist() for s in np.split(words, np.flatnonzero(np.diff(segment)) + 1) if len(s)]
    return segments, (low == high)[~special], np.diff(cut, append=len(keys))[~special]


def runs(flags):
    """(start, length) of each run of True."""
    out, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i - start))
            start = None
    return out


@pytest.mark.parametrize("masking", ["whole_word", "span"])
def test_words_stay_whole_and_the_share_is_mlm_probability(tokenizer, masking):
    examples = packed(tokenizer)
    assert len(examples) >= 1000
    results = collate_all(MaskingCollator(tokenizer, masking=masking), examples)
    special = torch.tensor(tokenizer.all_special_ids)
    masked = maskable = multi = words = mixed_corruption = as_mask = 0
    for e, (flags, corrupted) in zip(examples, results, strict=True):
        ids = torch.as_tensor(e["input_ids"])
        assert not flags[torch.isin(ids, special)].any()  # never [CLS]/[SEP]
        _, whole, pieces = words_of(e, flags)
        assert whole.all()  # a word's pieces: all masked or none
        words += len(pieces)
        multi += int((pieces > 1).sum())
        masked += int(flags.sum())
        maskable += int((~torch.isin(ids, special)).sum())
        as_mask += int((corrupted[flags] == tokenizer.mask_token_id).sum())
        # 80/10/10 is drawn per token: a masked word's pieces need not all become [MASK]
        _, word = np.unique(e["keys"][flags.numpy()], return_inverse=True)
        if len(word):
            pieces = np.bincount(word)
            to_mask = np.bincount(word, weights=(corrupted[flags] == tokenizer.mask_token_id).numpy())
            mixed_corruption += int(((to_mask > 0) & (to_mask < pieces)).sum())
    assert multi / words > 0.3, "the test corpus must have many multi-piece words"
    assert abs(masked / maskable - 0.15) < 0.02, masked / maskable
    assert abs(as_mask / masked - 0.8) < 0.03
    assert mixed_corruption > 0


@pytest.mark.parametrize("masking", ["token", "whole_word", "span"])
@pytest.mark.parametrize("words", [1, 2, 3])
def test_share_on_short_lines(tokenizer, masking, words):
    # one piece per word here, so token and word shares coincide: p for every line length
    n = 6000 // words
    body = np.arange(10, 10 + words)
    examples = [{"input_ids": np.array([tokenizer.cls_token_id, *body, tokenizer.sep_token_id]),
                 "word_starts": np.ones(words + 2, dtype=bool), "mask_seed": mask_seed(3, 0, i)} for i in range(n)]
    batch = MaskingCollator(tokenizer, masking=masking)(examples)
    share = (batch["labels"] != -100).sum().item() / (n * words)
    assert abs(share - 0.15) < 0.015, share


@pytest.mark.parametrize("mean", [3.0, 5.0])
def test_span_lengths_follow_the_mean_and_spans_stop_at_special_tokens(tokenizer, mean):
    examples = packed(tokenizer)
    results = collate_all(MaskingCollator(tokenizer, masking="span", mean_span_length=mean), examples)
    lengths, within, across = [], [0, 0], [0, 0]
    for e, (flags, _) in zip(examples, results, strict=True):
        segments, whole, _ = words_of(e, flags)
        assert whole.all()
        for segment in segments:
            for start, length in runs(segment):
                assert length <= 10
                if start + 10 < len(segment):  # never cut by the segment's end: its full drawn length
                    lengths.append(length)
            for a, b in pairwise(segment):  # inside a segment, a span goes on with ~1 - 1/mean
                within[0] += a and b
                within[1] += a
        for prev, nxt in pairwise(segments):  # across [SEP]: a fresh start, masked with ~p
            across[0] += prev[-1] and nxt[0]
            across[1] += prev[-1]
    expected = expected_span_words(mean)  # the clipped geometric's mean: 2.95 for 3, 4.46 for 5
    assert len(lengths) > 1000
    assert abs(np.mean(lengths) - expected) < 0.06 * expected, (np.mean(lengths), expected)
    assert within[0] / within[1] > 0.5 and across[1] > 200 and across[0] / across[1] < 0.25, (within, across)
    share = sum(int(f.sum()) for f, _ in results) / sum(
        int((~torch.isin(torch.as_tensor(e["input_ids"]), torch.tensor(tokenizer.all_special_ids))).sum())
        for e in examples
    )
    assert abs(share - 0.15) < 0.02, share


@pytest.mark.parametrize("masking", ["whole_word", "span"])
def test_masks_are_a_function_of_seed_epoch_and_example(tokenizer, masking):
    examples = packed(tokenizer)[:16]
    a = MaskingCollator(tokenizer, masking=masking)(examples)
    b = MaskingCollator(tokenizer, masking=masking)(examples)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    other_epoch = [{**e, "mask_seed": mask_seed(0, 1, i)} for i, e in enumerate(examples)]
    assert not torch.equal(a["labels"], MaskingCollator(tokenizer, masking=masking)(other_epoch)["labels"])
    # an example's mask does not depend on its batch (nor on the padding a shorter neighbour brings)
    short = {**examples[0], "input_ids": examples[0]["input_ids"][:20], "word_starts": examples[0]["word_starts"][:20]}
    c = MaskingCollator(tokenizer, masking=masking)([examples[5], short])
    assert torch.equal(c["labels"][0], a["labels"][5])


def test_clear_errors(tokenizer):
    example = {"input_ids": np.array([tokenizer.cls_token_id, 10, 11, tokenizer.sep_token_id]), "mask_seed": 1}
    MaskingCollator(tokenizer)([example])  # token masking needs no word boundaries
    for masking in ("whole_word", "span"):
        with pytest.raises(MLMError, match="word_starts"):
            MaskingCollator(tokenizer, masking=masking)([example])
        with pytest.raises(MLMError, match="word_starts"):
            MaskingCollator(tokenizer, masking=masking)([{**example, "word_starts": np.ones(3, dtype=bool)}])
    with pytest.raises(MLMError, match="masking must be one of token, whole_word, span"):
        MaskingCollator(tokenizer, masking="words")
    with pytest.raises(MLMError, match="mean_span_length"):
        MaskingCollator(tokenizer, masking="span", mean_span_length=0.5)
    with pytest.raises(MLMError, match="lower --data.mlm_probability or raise --data.mean_span_length"):
        MaskingCollator(tokenizer, 0.8, masking="span", mean_span_length=1.0)
    check_masking("span", 0.8, 10.0)  # long spans can cover 80%: only the impossible is refused
    with pytest.raises(MLMError, match="mlm_probability must be in"):
        check_masking("token", 1.0, 3.0)
