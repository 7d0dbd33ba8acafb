"""Streaming tokenization of a corpus into on-disk shards, then one memory-mappable file per split.

Memory is bounded by a constant (a few batches of text and their ids), whatever the corpus size: text is
read as a stream, tokenized in batches by the fast tokenizer's Rust batch encoding (in one process per core
for big corpora, see `_pool`; the next batches are read while earlier ones are encoded), and the ids are
appended to files.

Layout of a finished cache directory `<cache>/data/<key>/` (plain little-endian files, readable by any
later streaming loader such as `litdata` without this package):

    meta.json                     counts, token dtype, format version
    {split}.tokens.bin            token ids (uint16 when the vocabulary fits, else uint32); every line + [SEP]
    {split}.word_starts.bin       uint8, 1 on the first piece of each word (from the tokenizer's word ids) and on [SEP]
    {split}.offsets.bin           int64, line i is tokens[offsets[i]:offsets[i + 1]]

While tokenizing, work lives in `<key>.partial/`: one directory per shard (`train-00000`, ... a run of
consecutive lines of about `shard_chars` characters), each written under a temporary name and renamed when
complete. An interrupted run leaves only complete shards there; the next run skips their lines (reading,
not tokenizing them) and goes on. The last step joins the shards into the layout above, written aside and
renamed, so a cache directory that exists is always complete.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np

from mlm_lightning.data.seeds import val_lines
from mlm_lightning.errors import check
from mlm_lightning.files import share_tree

FORMAT_VERSION = 2
SHARD_CHARS = 64_000_000  # ~64 MB of text per shard: the work an interruption can lose
BATCH_CHARS = 1_000_000  # text handed to the tokenizer at once (bounded memory, enough for all cores)
BATCH_LINES = 10_000
COPY_BYTES = 16 << 20  # buffer when joining shards
PROCESS_MIN_BYTES = 32 << 20  # corpora from this size are encoded in one process per core
SPLITS = ("train", "val")
FILES = {"tokens": None, "word_starts": np.uint8, "offsets": np.int64}


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_LINES:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_batch(backend, texts: list[str], fast: bool = False) -> list:
    """The tokenizer's Rust batch encoding (the GIL released); `fast`: without offsets and word ids."""
    if not texts:
        return []
    encode = backend.encode_batch_fast if fast else backend.encode_batch
    return encode(texts, add_special_tokens=False)


# -- the encoding jobs: in worker processes for big corpora, in a thread of this process for small ones ----
# Why processes: turning encodings into arrays is Python work (~20% of the Rust time) that holds the GIL;
# with one process it competes with the tokenizer's own threads for the cores. A process per core, each
# encoding single-threaded and converting its own batches, keeps every core on useful work (measured:
# `scripts/bench_data.py`). Batches are submitted in order and their results written in order.
_JOB: dict = {}


def _init_job(tokenizer_json: str | None, backend, sep_id: int, dtype: str, worker: bool) -> None:
    if worker:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it stops the pool)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core instead of threads
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer_json)
    table = continuation_table(tokenizer_json or backend.to_str())
    _JOB.update(backend=backend, sep_id=sep_id, dtype=np.dtype(dtype), continuation=table)


def _encode_job(train: list[str], val: list[str]):
    backend, table = _JOB["backend"], _JOB["continuation"]
    return tuple(
        to_arrays(encode_batch(backend, texts, fast=table is not None), _JOB["sep_id"], _JOB["dtype"], table)
        for texts in (train, val)
    )


@contextlib.contextmanager
def main_module_hidden(hide: bool = True):
    """While tokenizing workers start: the user's `__main__` is not re-run in them.

    A spawned process imports the parent's `__main__` module (by path, or by name under `python -m`) before it
    unpickles its work; a script without an `if __name__ == "__main__":` guard would then run its whole fit again in
    every worker, which spawns workers in turn (the pool never starts: the fit hangs). The workers need nothing
    from `__main__` (their job is this module's `_encode_job`), so multiprocessing is shown a `__main__` with no
    path and no spec, as in an interactive session or a notebook, for as long as the pool may start processes.
    https://docs.python.org/3/library/multiprocessing.html#the-spawn-and-forkserver-start-methods
    """
    main = sys.modules.get("__main__")
    if not hide or main is None:
        yield
        return
    missing = object()
    saved = {k: main.__dict__.get(k, missing) for k in ("__file__", "__spec__")}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is missing:
                main.__dict__.pop(key, None)
            else:
                main.__dict__[key] = value


def _pool(tokenizer, workers: int):
    backend, sep_id = tokenizer.backend_tokenizer, tokenizer.sep_token_id
    dtype = np.dtype(token_dtype(len(tokenizer))).name
    if workers <= 1:
        _init_job(None, backend, sep_id, dtype, worker=False)
        return ThreadPoolExecutor(1)  # (the Rust encoding uses all cores by itself here)
    import multiprocessing

    # spawn: a fork of a process that already ran the tokenizer's threads (or torch's) is not safe
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_job,
                               initargs=(backend.to_str(), None, sep_id, dtype, True))


def continuation_table(tokenizer_json: str) -> np.ndarray | None:
    """For a WordPiece model: a bool per id, True for continuation pieces (`##...`); else None.

    WordPiece encodes each pre-tokenized word on its own, prefixing every piece but the first, so for it
    "not a continuation piece" is exactly "first piece of a word" (the word ids' answer): the word starts
    then need no word ids, and the encoding can skip them and the offsets (`encode_batch_fast`, ~20% less
    Rust time). Other models (BPE, Unigram) take the word ids."""
    model = json.loads(tokenizer_json).get("model", {})
    if model.get("type") != "WordPiece":
        return None
    prefix = model.get("continuing_subword_prefix") or "##"
    vocab = model.get("vocab", {})
    table = np.zeros(max(vocab.values(), default=0) + 1, dtype=bool)
    table[[i for t, i in vocab.items() if t.startswith(prefix)]] = True
    return table


def to_arrays(encodings: list, sep_id: int, dtype, continuation: np.ndarray | None = None):
    """(tokens, word_starts, line lengths) of encodings, each line followed by [SEP]; lines with no token dropped.

    Per line, not per token, Python work: the id lists are flattened by numpy and word starts come from
    `continuation` (WordPiece) or from comparing neighbouring word ids (a new word id, or a new line, starts a
    word). Added tokens written in the text (a literal "[MASK]") are words of their own either way.
    """
    if not encodings:
        return np.zeros(0, dtype), np.zeros(0, np.uint8), np.zeros(0, np.int64)
    ids = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    body = np.fromiter(itertools.chain.from_iterable(ids), dtype, count=int(lengths.sum()))
    if continuation is not None:
        starts_body = ~continuation[body]
    else:
        words = [e.word_ids for e in encodings]
        # word ids are None only on special tokens written in the text (e.g. a literal "[MASK]"): own words
        if any(None in w for w in words):  # rare: only those lines pay a Python loop
            words = [[-1 if x is None else x for x in w] if None in w else w for w in words]
        wid = np.fromiter(itertools.chain.from_iterable(words), np.int64, count=len(body))
        starts_body = np.ones(len(body), dtype=bool)
        if len(body):
            starts_body[1:] = wid[1:] != wid[:-1]
    lengths = lengths[lengths > 0]
    if len(body):
        starts_body[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True  # every line starts a word
    n = len(body) + len(lengths)
    is_sep = np.zeros(n, dtype=bool)
    is_sep[np.cumsum(lengths + 1) - 1] = True
    tokens = np.empty(n, dtype)
    tokens[~is_sep], tokens[is_sep] = body, sep_id
    starts = np.ones(n, np.uint8)
    starts[~is_sep] = starts_body
    return tokens, starts, lengths + 1


class _ShardWriter:
    """Appends batches to the files of one shard in a temporary directory; `finish()` renames it into place."""

    def __init__(self, partial: str, name: str):
        self.partial, self.name = partial, name
        self.tmp = tempfile.mkdtemp(dir=partial, prefix=f".{name}-")
        self.files = {(s, f): open(os.path.join(self.tmp, f"{s}.{f}.bin"), "wb") for s in SPLITS for f in FILES}
        self.counts = {s: {"lines": 0, "tokens": 0} for s in SPLITS}
        self.input_lines, self.chars = 0, 0

    def add(self, split: str, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:
        c = self.counts[split]
        self.files[split, "tokens"].write(tokens.tobytes())
        self.files[split, "word_starts"].write(starts.tobytes())
        # offsets are written without their leading 0 (joined later, shifted by the tokens before)
        self.files[split, "offsets"].write((c["tokens"] + np.cumsum(lengths)).astype(np.int64).tobytes())
        c["lines"] += len(lengths)
        c["tokens"] += len(tokens)

    def finish(self, extra: dict) -> None:
        for f in self.files.values():
            f.close()
        with open(os.path.join(self.tmp, "shard.json"), "w") as f:
            json.dump({"input_lines": self.input_lines, "counts": self.counts, **extra}, f)
        share_tree(self.tmp)  # (mkdtemp makes 0700)
        try:
            os.rename(self.tmp, os.path.join(self.partial, self.name))
        except OSError:  # another process wrote this shard first: theirs is as good
            shutil.rmtree(self.tmp, ignore_errors=True)

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _done_shards(partial: str, phase: str) -> list[dict]:
    done = []
    for n in itertools.count():
        path = os.path.join(partial, f"{phase}-{n:05d}", "shard.json")
        if not os.path.exists(path):
            return done
        with open(path) as f:
            done.append(json.load(f))


def tokenize_phase(
    texts: Iterable[str], tokenizer, partial: str, phase: str, *, val_fraction: float = 0.0,
    val_max_lines: int | None = None, seed: int = 0, shard_chars: int = SHARD_CHARS, on_batch=None,
    workers: int = 1,
) -> None:
    """Tokenize `texts` into shards `<partial>/<phase>-NNNNN`, resuming after the shards already there.

    `val_fraction` 1.0 sends every line to validation (val_files); otherwise `val_lines` decides, and once
    `val_max_lines` lines were held out the rest go to training. `workers` > 1: encode in that many processes.
    """
    done = _done_shards(partial, phase)
    texts = iter(texts)
    line = sum(s["input_lines"] for s in done)
    n_val = done[-1]["val_so_far"] if done else 0
    for _ in itertools.islice(texts, line):  # resume: read past the lines of complete shards
        pass
    cap = val_max_lines if val_max_lines is not None else 2**62

    shard: _ShardWriter | None = None
    with main_module_hidden(workers > 1):
        pool = _pool(tokenizer, workers)
        pending: collections.deque = collections.deque()  # (future, val lines so far), in corpus order
        try:
            for batch in itertools.chain(_batches(texts), [None]):
                if batch is not None:
                    if val_fraction >= 1.0:
                        is_val = np.ones(len(batch), dtype=bool)
                    else:
                        is_val = val_lines(seed, line, len(batch), val_fraction)
                        over = np.flatnonzero(is_val)[max(0, cap - n_val):]
                        is_val[over] = False  # the cap is reached: the rest of the corpus trains
                    line += len(batch)
                    n_val += int(is_val.sum())
                    train = [t for t, v in zip(batch, is_val, strict=True) if not v]
                    val = [t for t, v in zip(batch, is_val, strict=True) if v] if is_val.any() else []
                    future = pool.submit(_encode_job, train, val)  # encoded while the next batches are read
                    pending.append((future, n_val, len(batch), sum(map(len, batch))))
                # bounded memory: at most two batches per worker in flight
                while pending and (len(pending) > 2 * max(1, workers) or batch is None):
                    future, val_so_far, n_lines, chars = pending.popleft()
                    train_arrays, val_arrays = future.result()
                    if shard is None:
                        shard = _ShardWriter(partial, f"{phase}-{len(done):05d}")
                    shard.add("train", *train_arrays)
                    shard.add("val", *val_arrays)
                    shard.input_lines += n_lines
                    shard.chars += chars
                    if on_batch is not None:
                        on_batch()
                    if shard.chars >= shard_chars or (batch is None and not pending):
                        shard.finish({"val_so_far": val_so_far})
                        done.append({})
                        shard = None
        except BaseException:
            if shard is not None:
                shard.abort()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()


def join_shards(partial: str, phases: list[str], out_dir: str, vocab_size: int) -> dict:
    """Concatenate every complete shard, in order, into one file per split and kind; returns the metadata."""
    dtype = token_dtype(vocab_size)
    shards = [os.path.join(partial, f"{p}-{n:05d}") for p in phases for n in range(len(_done_shards(partial, p)))]
    meta = {"format": FORMAT_VERSION, "token_dtype": np.dtype(dtype).name, "vocab_size": vocab_size}
    for split in SPLITS:
        base_tokens, lines = 0, 0
        with open(os.path.join(out_dir, f"{split}.offsets.bin"), "wb") as off:
            off.write(np.zeros(1, np.int64).tobytes())
            for kind in ("tokens", "word_starts"):
                with open(os.path.join(out_dir, f"{split}.{kind}.bin"), "wb") as out:
                    for shard in shards:
                        with open(os.path.join(shard, f"{split}.{kind}.bin"), "rb") as f:
                            shutil.copyfileobj(f, out, COPY_BYTES)
            for shard in shards:
                offsets = np.fromfile(os.path.join(shard, f"{split}.offsets.bin"), np.int64)
                off.write((offsets + base_tokens).tobytes())
                lines += len(offsets)
                base_tokens += int(offsets[-1]) if len(offsets) else 0
        meta[f"{split}_lines"], meta[f"{split}_tokens"] = lines, base_tokens
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    return meta


def remove_shards(partial: str, phases: list[str]) -> None:
    """Remove the shards (and leftover temporary shards) this module wrote, then `partial` if that empties it.

    Only names this module creates are removed, so a file someone put there is never deleted; and only under the
    cache's lock (`cache.build_cache`), so no other process is writing or reading them.
    """
    if not os.path.isdir(partial):
        return
    for name in os.listdir(partial):
        ours = any(name.startswith((f"{p}-", f".{p}-")) for p in phases)
        if ours and os.path.isdir(os.path.join(partial, name)):
            shutil.rmtree(os.path.join(partial, name), ignore_errors=True)
    try:
        os.rmdir(partial)
    except OSError:  # not empty: someone else's file is in there; leave it
        pass


def open_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, word_starts, offsets) of a finished cache directory, all memory-mapped (nothing read)."""
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    check(meta.get("format") == FORMAT_VERSION, f"{directory} is not a tokenized-corpus cache of this version")

    def mm(kind: str, dtype) -> np.ndarray:
        path = os.path.join(directory, f"{split}.{kind}.bin")
        if os.path.getsize(path) == 0:  # numpy cannot memory-map an empty file
            return np.zeros(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    return mm("tokens", np.dtype(meta["token_dtype"])), mm("word_starts", np.uint8), mm("offsets", np.int64)
