"""Streaming tokenization into shards: equality with in-memory tokenization, word starts, resume, memory, workers."""

import json
import os
import pickle
import random
import tracemalloc

import numpy as np
import pytest
import torch

from mlm_lightning.data import MLMDataModule, corpus, seeds, shards
from mlm_lightning.data.cache import TokenStream, build_cache
from mlm_lightning.data.sampling import BatchPlan, ResumableDataLoader
from mlm_lightning.data.tokenizer import sample_texts, train_wordpiece
from tests.support.models import bpe_tokenizer
from tests.support.text import sentences

WORDS = ["river", "unbelievable", "catastrophe", "don't", "state-of-the-art", "x", "3.14", "naïve", "Übermensch"]


def varied(n: int, seed: int = 0) -> list[str]:
    """Sentences with rare long words (split into several pieces by a small vocabulary) and punctuation."""
    rng = random.Random(seed)
    return [f"{s[:-2]} {' '.join(rng.choices(WORDS, k=rng.randint(0, 4)))} ." for s in sentences(n, seed)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_wordpiece(varied(400), str(tmp_path_factory.mktemp("tok") / "wp"), 150, 64)


def reference(texts, tok, sep):
    """The in-memory tokenization the shards equal: each non-empty line's ids followed by [SEP]; word starts from
    word_ids."""
    enc = tok(texts, add_special_tokens=False)
    ids, starts, offsets = [], [], [0]
    for i, line in enumerate(enc["input_ids"]):
        if not line:
            continue
        words = enc.word_ids(i)
        ids += line + [sep]
        starts += [j == 0 or words[j] != words[j - 1] for j in range(len(line))] + [True]
        offsets.append(len(ids))
    return np.array(ids), np.array(starts), np.array(offsets)


def build(tmp_path, tok, texts_path, **kw):
    directory = str(tmp_path / "cache" / "key")
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    kw.setdefault("val_fraction", 0.1)
    kw.setdefault("val_max_lines", 10_000)
    build_cache(directory, tok, [texts_path], kw.pop("val_paths", None), "text", kw.pop("val_fraction"),
                kw.pop("val_max_lines"), seed=3, progress=False, **kw)
    return directory


@pytest.mark.parametrize("shard_chars, workers", [(shards.SHARD_CHARS, 1), (300, 1), (300, 2)])
def test_sharded_output_equals_in_memory_tokenization(write, tmp_path, tok, monkeypatch, shard_chars, workers):
    monkeypatch.setattr(shards, "BATCH_CHARS", 500)  # many batches and shards even on a small corpus
    lines = varied(500, seed=1) + ["[MASK] river", "\u200b"]  # a literal special token; a line with no token
    path = write("t.txt", lines)
    directory = build(tmp_path, tok, path, shard_chars=shard_chars, workers=workers)  # 2: encoding processes
    texts = list(corpus.iter_texts([path]))
    is_val = seeds.val_lines(3, 0, len(texts), 0.1)
    assert 40 <= is_val.sum() <= 60
    for split, chosen in (("train", ~is_val), ("val", is_val)):
        stream = TokenStream.load(directory, split)
        ids, starts, offsets = reference([t for t, c in zip(texts, chosen, strict=True) if c], tok, tok.sep_token_id)
        assert np.array_equal(stream.tokens, ids) and np.array_equal(stream.offsets, offsets)
        assert np.array_equal(stream.word_starts.astype(bool), starts)
    assert not os.path.exists(directory + ".partial")  # the work area is gone once joined


def test_val_cap_and_val_files(write, tmp_path, tok):
    path = write("t.txt", varied(300))
    capped = TokenStream.load(build(tmp_path / "a", tok, path, val_fraction=0.2, val_max_lines=7), "val")
    assert len(capped.offsets) - 1 == 7
    train = TokenStream.load(build(tmp_path / "a", tok, path, val_fraction=0.2, val_max_lines=7), "train")
    assert len(train.offsets) - 1 == 300 - 7  # lines past the cap train
    directory = build(tmp_path / "b", tok, path, val_paths=[write("v.txt", ["the river ."])])
    assert len(TokenStream.load(directory, "train").offsets) - 1 == 300
    assert len(TokenStream.load(directory, "val").offsets) - 1 == 1


def test_examples_carry_word_starts(write, tmp_path):
    dm = MLMDataModule(train_files=write("t.txt", varied(300)), cache_dir=str(tmp_path / "c"), vocab_size=150,
                       max_length=16, line_by_line=True)
    dm.prepare_data()
    dm.setup("fit")
    pieces = 0
    for i in range(len(dm.datasets["train"])):
        ex = dm.datasets["train"][i]
        tokens = dm.tokenizer.convert_ids_to_tokens(ex["input_ids"].tolist())
        assert ex["word_starts"].dtype == bool and len(ex["word_starts"]) == len(tokens)
        assert ex["word_starts"][0] and ex["word_starts"][-1]  # [CLS], [SEP]
        # a WordPiece continuation ("##...") never starts a word; every other piece does
        assert [not t.startswith("##") for t in tokens[1:-1]] == ex["word_starts"][1:-1].tolist()
        pieces += sum(t.startswith("##") for t in tokens)
    assert pieces > 50  # the test saw multi-piece words
    packed = MLMDataModule(train_files=dm.train_paths, cache_dir=str(tmp_path / "c"), vocab_size=150, max_length=16)
    packed.setup("fit")
    ds, mid = packed.datasets["train"], 0
    for i in range(len(ds)):
        ex = ds[i]
        assert ex["word_starts"][0] and ex["word_starts"][1]  # [CLS]; a block starting mid-word starts a word
        first = packed.tokenizer.convert_ids_to_tokens([int(ex["input_ids"][1])])[0]
        mid += first.startswith("##")
        tokens = packed.tokenizer.convert_ids_to_tokens(ex["input_ids"][2:].tolist())
        assert [not t.startswith("##") for t in tokens] == ex["word_starts"][2:].tolist()
    assert mid > 0


def test_interrupted_tokenization_resumes_from_complete_shards(write, tmp_path, tok, monkeypatch):
    monkeypatch.setattr(shards, "BATCH_CHARS", 400)
    path = write("t.txt", varied(600, seed=2))
    expected = build(tmp_path / "whole", tok, path, shard_chars=2000)
    real_encode, calls = shards.encode_batch, []

    def failing(backend, texts, **kw):
        calls.append(len(texts))
        if len(calls) == 40:
            raise KeyboardInterrupt
        return real_encode(backend, texts, **kw)

    monkeypatch.setattr(shards, "encode_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "cut", tok, path, shard_chars=2000)
    directory = str(tmp_path / "cut" / "cache" / "key")
    assert not os.path.exists(directory)  # no half cache
    left = sorted(os.listdir(directory + ".partial"))
    assert left and all(name.startswith("train-") for name in left)  # complete shards only, no temp dirs
    (tmp_path / "cut" / "cache" / "key.partial" / "notes.txt").write_text("a user's file")
    calls.clear()
    monkeypatch.setattr(shards, "encode_batch", lambda backend, texts, **kw: calls.append(len(texts)) or real_encode(
        backend, texts, **kw))
    build(tmp_path / "cut", tok, path, shard_chars=2000)
    assert 0 < sum(calls) < 600 * 0.9  # only the lines after the complete shards were tokenized again
    for split in shards.SPLITS:
        for kind in shards.FILES:
            a = open(os.path.join(expected, f"{split}.{kind}.bin"), "rb").read()
            assert a == open(os.path.join(directory, f"{split}.{kind}.bin"), "rb").read()
    assert os.listdir(directory + ".partial") == ["notes.txt"]  # shards removed, the user's file kept


def test_jobs_started_together_tokenize_a_corpus_once(write, tmp_path, tok, monkeypatch):
    """Two jobs on one corpus and cache (a sweep): one tokenizes, the other waits for its cache (no shared work area
    pulled from under it)."""
    import threading
    import time

    path = write("t.txt", varied(300, seed=4))
    real, phases = shards.tokenize_phase, []

    def slow(*a, **k):
        phases.append(k.get("val_fraction"))
        time.sleep(1.0)  # long enough for the second job to arrive while the first is working
        return real(*a, **k)

    monkeypatch.setattr(shards, "tokenize_phase", slow)
    metas, errors = [], []

    def job():
        try:
            metas.append(open_meta(build(tmp_path, tok, path)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(metas) == 2 and metas[0] == metas[1]
    assert len(phases) == 1  # tokenized once (one phase: train, with its validation split)
    assert not os.path.exists(str(tmp_path / "cache" / "key.partial"))


def test_a_filesystem_without_flock_tokenizes_without_a_lock(write, tmp_path, tok, monkeypatch, caplog):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    path = write("t.txt", varied(100, seed=5))
    with caplog.at_level("WARNING", logger="mlm_lightning"):
        directory = build(tmp_path, tok, path)
    assert open_meta(directory)["train_lines"] > 0
    assert "tokenizing without a lock" in caplog.text


def open_meta(directory):
    import json

    with open(os.path.join(directory, "meta.json")) as f:
        return json.load(f)


def test_memory_stays_flat_as_the_corpus_grows(write, tmp_path, tok, monkeypatch):
    monkeypatch.setattr(shards, "BATCH_CHARS", 20_000)
    monkeypatch.setattr(shards, "COPY_BYTES", 1 << 16)
    small = write("small.txt", varied(4_000, seed=4))  # ~180 kB
    big = write("big.txt", varied(40_000, seed=5))  # 10x
    peaks = []
    for i, path in enumerate((small, big)):
        tracemalloc.start()
        build(tmp_path / str(i), tok, path, shard_chars=100_000)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    tokens_big = os.path.getsize(str(tmp_path / "1" / "cache" / "key" / "train.tokens.bin"))
    assert tokens_big > peaks[1]  # the output is bigger than what was ever held in memory
    assert peaks[1] < 1.5 * peaks[0], peaks  # 10x the corpus, not 10x the memory


def test_tokenizer_sample_is_seeded_and_capped(write, tmp_path, monkeypatch):
    from mlm_lightning.data import tokenizer

    monkeypatch.setattr(tokenizer, "SAMPLE_CHUNK_LINES", 50)  # many chunks: a tight size
    path = write("t.txt", varied(40_000, seed=6))  # ~1.8 MB
    size = os.path.getsize(path)

    def sample(seed, mb=0.5):
        return list(sample_texts(corpus.CorpusReader([path]), mb, seed))

    a, b, c = sample(1), sample(1), sample(2)
    assert a == b and a != c
    chars = sum(map(len, a))
    assert 0.5 * 2**20 * 0.8 < chars < 0.5 * 2**20 * 1.1 and chars < size / 2
    assert len(sample(1, mb=10)) == 40_000  # a corpus under the cap is used whole


def test_dataset_pickles_paths_not_arrays(corpus, tmp_path):
    dm = MLMDataModule(train_files=corpus, cache_dir=str(tmp_path / "c"), vocab_size=200, max_length=16)
    dm.prepare_data()
    dm.setup("fit")
    ds = dm.datasets["train"]
    blob = pickle.dumps(ds)
    assert len(blob) < 2_000 < ds.stream.tokens.nbytes
    copy = pickle.loads(blob)
    assert isinstance(copy.stream.tokens, np.memmap)
    assert all(np.array_equal(copy[i]["input_ids"], ds[i]["input_ids"]) for i in range(len(ds)))


@pytest.mark.slow
def test_two_spawned_workers_give_the_same_batches(corpus, tmp_path):
    dm = MLMDataModule(train_files=corpus, cache_dir=str(tmp_path / "c"), vocab_size=200, max_length=16,
                       batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    ds = dm.datasets["train"]

    def batches(workers):
        kw = {"multiprocessing_context": "spawn"} if workers else {}
        loader = ResumableDataLoader(ds, BatchPlan(ds.lengths, 8, seed=1), collate_fn=dm.collator,
                                     num_workers=workers, **kw)
        return list(loader)

    a, b = batches(0), batches(2)
    assert len(a) == len(b) > 10
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


def test_progress_bar_counts_megabytes(write, tmp_path, tok, capsys):
    path = write("t.txt", varied(200))
    directory = str(tmp_path / "key")
    build_cache(directory, tok, [path], None, "text", 0.1, 10_000, seed=0, progress=True)
    err = capsys.readouterr().err
    size = f"{os.path.getsize(path) / 1024:.2f}k"  # bytes of the file on disk, MB/s and ETA shown
    assert "tokenizing: 100%" in err and f"{size}/{size}" in err and "B/s" in err, err[-300:]


@pytest.mark.parametrize("workers", [1, 2])
def test_word_starts_of_a_bpe_tokenizer_come_from_its_word_ids(write, tmp_path, workers):
    """Not WordPiece (no `##` pieces): the general path, with word ids, gives the same arrays."""
    lines = varied(300, seed=2)
    bpe = bpe_tokenizer(lines)
    assert shards.continuation_table(bpe.backend_tokenizer.to_str()) is None
    directory = build(tmp_path, bpe, write("t.txt", lines), workers=workers)
    texts = list(corpus.iter_texts([str(tmp_path / "t.txt")]))
    is_val = seeds.val_lines(3, 0, len(texts), 0.1)
    stream = TokenStream.load(directory, "train")
    ids, starts, offsets = reference([t for t, v in zip(texts, is_val, strict=True) if not v], bpe, bpe.sep_token_id)
    assert np.array_equal(stream.tokens, ids) and np.array_equal(stream.word_starts.astype(bool), starts)
    assert not starts.all()  # (some words are split into several pieces)


def test_a_tokenizer_saved_with_padding_and_truncation_encodes_lines_whole(write, tmp_path, tok):
    """A sentence-transformers tokenizer.json pads every text to a fixed length and cuts longer ones (MiniLM's: 128);
    the corpus must still hold each line's own tokens, no [PAD] filler and no cut lines."""
    from mlm_lightning.data.tokenizer import load_tokenizer

    saved = str(tmp_path / "st-tok")
    tok.save_pretrained(saved)
    with open(os.path.join(saved, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    spec["padding"] = {"strategy": {"Fixed": 32}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                       "pad_type_id": 0, "pad_token": "[PAD]"}
    spec["truncation"] = {"max_length": 8, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}
    with open(os.path.join(saved, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f)
    loaded = load_tokenizer(saved)
    assert loaded.backend_tokenizer.padding is None and loaded.backend_tokenizer.truncation is None
    from mlm_lightning.model.checkpoint import _tokenizer_from_files  # the tokenizer a checkpoint carries, too

    files = {n: open(os.path.join(saved, n), encoding="utf-8").read() for n in ("tokenizer.json",)}
    assert _tokenizer_from_files(files, "a checkpoint").backend_tokenizer.padding is None
    lines = varied(200, seed=4)
    path = write("t.txt", lines)
    stream = TokenStream.load(build(tmp_path, loaded, path), "train")
    is_val = seeds.val_lines(3, 0, len(lines), 0.1)
    ids, _, offsets = reference([t for t, v in zip(lines, is_val, strict=True) if not v], tok, tok.sep_token_id)
    assert np.array_equal(stream.tokens, ids) and np.array_equal(stream.offsets, offsets)
    assert tok.pad_token_id not in stream.tokens
    assert loaded("a b c", padding="max_length", max_length=6)["input_ids"][-1] == tok.pad_token_id  # per call
