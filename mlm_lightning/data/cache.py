"""The tokenized-corpus cache: one directory per (files, tokenizer, split settings) key, all-or-nothing.

`build_cache` tokenizes a corpus (streamed through `shards`, bounded memory) into `<cache>/data/<key>/`: a
`.partial` work area of complete shards (an interrupted run goes on from them), joined aside and renamed, so
a cache directory that exists is always complete; one process at a time per key (a file lock beside it).
`TokenStream` reads a split back memory-mapped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import numpy as np
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from mlm_lightning.data import corpus, shards
from mlm_lightning.errors import check
from mlm_lightning.files import share_tree

log = logging.getLogger("mlm_lightning")
CACHE_VERSION = shards.FORMAT_VERSION


def default_cache_dir() -> str:
    return os.environ.get("MLM_LIGHTNING_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mlm-lightning")


class TokenStream:
    """A split of the corpus: `tokens`, `word_starts` (1 on each word's first piece) and `offsets`
    (line i is tokens[offsets[i]:offsets[i+1]], its last token [SEP]), memory-mapped from the cache.

    Pickling (DataLoader workers, fork or spawn) sends the directory, never the arrays: each worker
    re-opens the memory maps, so no worker holds a copy of the corpus.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, word_starts: np.ndarray | None = None,
                 source: tuple[str, str] | None = None):
        self.tokens, self.offsets, self.source = tokens, offsets, source
        self.word_starts = word_starts if word_starts is not None else np.ones(len(tokens), np.uint8)

    @classmethod
    def load(cls, directory: str, split: str) -> TokenStream:
        tokens, word_starts, offsets = shards.open_split(directory, split)
        return cls(tokens, offsets, word_starts, source=(directory, split))

    def __getstate__(self) -> dict:
        if self.source is None:
            return self.__dict__
        return {"source": self.source}

    def __setstate__(self, state: dict) -> None:
        if set(state) == {"source"}:
            self.__dict__.update(TokenStream.load(*state["source"]).__dict__)
        else:
            self.__dict__.update(state)



def build_cache(
    directory: str, tokenizer, train_paths: list[str], val_paths: list[str] | None, text_column: str,
    val_fraction: float, val_max_lines: int, seed: int, progress: bool = True, shard_chars: int = shards.SHARD_CHARS,
    workers: int | None = None, storage_options: dict | None = None,
) -> dict:
    """Tokenize the corpus into `directory` (see `shards`): resumable, and all-or-nothing for `directory`.

    `storage_options`: fsspec's, for URLs among the files.
    `workers`: encoding processes; default one per core for corpora over `shards.PROCESS_MIN_BYTES` (starting
    them costs about a second), else encoding in this process.

    One process at a time per cache directory (a file lock beside it): jobs started together on one corpus, a sweep
    say, would otherwise tokenize it each, and the first to finish would remove the work area the others still read.
    The lock is the OS's (released if the holder dies), so a crashed run never blocks the next one.
    """
    os.makedirs(os.path.dirname(directory) or ".", exist_ok=True)
    # (the lock file stays: removing a file others may hold is a race; no "soft" lock-file fallback either: a
    # crashed run would leave it behind and block every later one)
    lock = FileLock(f"{directory}.lock", fallback_to_soft=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is tokenizing this corpus into %s; waiting for it", directory)
        lock.acquire()
    except (NotImplementedError, OSError) as e:  # a filesystem without flock (some network mounts)
        log.warning("cannot lock %s (%s): tokenizing without a lock; start one job on this corpus first",
                    directory, e)
        lock = None
    try:
        if os.path.isdir(directory):  # it finished while we waited
            with open(os.path.join(directory, "meta.json")) as f:
                return json.load(f)
        return _tokenize_into(directory, tokenizer, train_paths, val_paths, text_column, val_fraction, val_max_lines,
                              seed, progress, shard_chars, workers, storage_options)
    finally:
        if lock is not None:
            lock.release()


def _tokenize_into(
    directory: str, tokenizer, train_paths: list[str], val_paths: list[str] | None, text_column: str,
    val_fraction: float, val_max_lines: int, seed: int, progress: bool = True, shard_chars: int = shards.SHARD_CHARS,
    workers: int | None = None, storage_options: dict | None = None,
) -> dict:
    """`build_cache` without the lock. In place of a list of files, a reader of texts with `total_bytes` (0: not
    known) and `bytes_done()` (a dataset's: `hf_datasets.DatasetReader`)."""
    partial = f"{directory}.partial"
    os.makedirs(partial, exist_ok=True)

    def opened(files):
        return corpus.CorpusReader(files, text_column, storage_options) if isinstance(files, list) else files

    readers = [("train", opened(train_paths))]
    if val_paths is not None:
        readers.append(("val", opened(val_paths)))
    total = sum(r.total_bytes for _, r in readers)
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = cores if total >= shards.PROCESS_MIN_BYTES else 1
    bar = tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing",
               disable=not progress, mininterval=1.0, smoothing=0.1)
    with bar:
        base = 0
        for phase, reader in readers:
            def update(reader=reader, base=base):
                bar.update(base + reader.bytes_done() - bar.n)

            fraction = 1.0 if phase == "val" else (0.0 if val_paths is not None else val_fraction)
            shards.tokenize_phase(reader, tokenizer, partial, phase, val_fraction=fraction,
                                  val_max_lines=val_max_lines, seed=seed, shard_chars=shard_chars, on_batch=update,
                                  workers=workers)
            base += max(reader.total_bytes, reader.bytes_done())
            bar.update(base - bar.n)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=f".{os.path.basename(directory)}-")
    try:  # joined aside and renamed: a cache directory that exists is complete
        meta = shards.join_shards(partial, [p for p, _ in readers], tmp, len(tokenizer))
        n_train, n_val = meta["train_lines"], meta["val_lines"]
        check(n_train + (n_val if val_paths is None else 0) > 0, "the training files contain no text; add text to them")
        if val_paths is None:
            check(
                n_val > 0 and n_train > 0,
                f"the corpus has {n_train + n_val} lines, too few for a {val_fraction} validation split;"
                " add text, raise --data.val_fraction or pass --data.val_files",
            )
        share_tree(tmp)  # (mkdtemp makes 0700: a cache is shared by jobs, maybe by users)
        try:
            os.rename(tmp, directory)
        except OSError:
            if not os.path.isdir(directory):  # a concurrent writer may have won the rename
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shards.remove_shards(partial, [p for p, _ in readers])  # our own work area, now joined into `directory`
    return meta
