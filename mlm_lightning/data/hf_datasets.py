"""Corpora by name: a Hugging Face dataset (`--data.dataset_name`) streamed through `datasets` into the same
tokenized-corpus cache as files.

`NAME` is what `datasets.load_dataset` takes: a hub repository (`user/name`), a local dataset repository directory
(data files, maybe a README.md whose YAML header lists `configs:`), or, with the hub offline, a dataset that
`datasets` has prepared in its cache before. Its rows are streamed (`streaming=True`: nothing is downloaded first,
memory stays a few batches), and the tokenized result is cached under a key of the dataset's resolved revision:
what `datasets` itself keys its own cache by (`DatasetBuilder.hash`): the commit of a hub repository, a hash of the
data files (paths and modification times) of a local directory, the prepared version found in the `datasets`
cache offline. A new revision or changed files are a new key; the same dataset on a second fit is not tokenized
again.

`datasets` is an optional extra: `pip install 'mlm-lightning[datasets]'`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

from mlm_lightning.arguments import option
from mlm_lightning.data import corpus
from mlm_lightning.data.corpus import _split_long
from mlm_lightning.errors import MLMError, check

EXTRA = "pip install 'mlm-lightning[datasets]'"
BATCH_ROWS = 1000  # rows per batch read from the stream (bounded memory; `datasets` reads files in batches too)


def _said(e: BaseException) -> str:
    """What `datasets` said, as one line (its messages may run over several: the problem, then what there is)."""
    return " ".join(str(e).split())[:300] or type(e).__name__


def import_datasets():
    """The `datasets` module, or one line saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise MLMError(f"{option('data.dataset_name')} needs the datasets library: {EXTRA}") from None
    return datasets


def check_options(dataset_name, dataset_config, dataset_split, dataset_validation_split, train_files,
                  val_files) -> None:
    """The dataset options together with the file options: one corpus, named once."""
    if dataset_name is None:
        for key, value, unset in (("dataset_config", dataset_config, None), ("dataset_split", dataset_split, "train"),
                                  ("dataset_validation_split", dataset_validation_split, None)):
            check(value == unset, f"{option('data.' + key)} names a part of a dataset: give"
                                  f" {option('data.dataset_name')} too (or drop it to train on files)")
        return
    check(bool(str(dataset_name).strip()), f"{option('data.dataset_name')} is empty; give a dataset's name")
    check(train_files is None, f"give either {option('data.train_files')} or {option('data.dataset_name')}, not both")
    check(val_files is None, f"with {option('data.dataset_name')} the validation text is a split of the dataset:"
                             f" {option('data.dataset_validation_split')} (unset: {option('data.val_fraction')} of"
                             f" the training split is held out)")
    check(bool(dataset_split), f"{option('data.dataset_split')} is empty; e.g. train")
    check(dataset_validation_split != dataset_split,
          f"{option('data.dataset_validation_split')} is the training split {dataset_split!r}: name another split,"
          f" or leave it unset to hold out {option('data.val_fraction')} of the training split")
    import_datasets()  # a missing extra is said now, before anything runs


class HFDataset:
    """A dataset by name: its resolved revision (`identity`) and readers of its training and validation splits."""

    def __init__(self, name: str, config: str | None, split: str, validation_split: str | None, text_column: str):
        self.name, self.config, self.split, self.validation_split = name, config, split, validation_split
        self.text_column = text_column
        self._builder = None
        self._splits = None

    def __getstate__(self) -> dict:  # (a spawned process resolves the dataset again: builders hold open state)
        return {**self.__dict__, "_builder": None, "_splits": None}

    def shown(self) -> str:
        return f"dataset {self.name!r}" + (f" (config {self.config!r})" if self.config else "")

    @property
    def builder(self):
        """`datasets.load_dataset(name, config, streaming=True)` in its own two steps: the builder it makes first
        carries the resolved revision (`hash`), which the streamed dataset does not expose."""
        if self._builder is None:
            datasets = import_datasets()
            try:
                self._builder = datasets.load_dataset_builder(self.name, self.config)
            except ConnectionError as e:  # offline, and not prepared in the `datasets` cache either
                raise MLMError(
                    f"{self.shown()} cannot be read: the Hugging Face hub is not reachable ({_said(e)}) and"
                    " the datasets cache has no copy; run once online (to use it offline later: load it once"
                    f" with datasets.load_dataset({self.name!r}{', ' + repr(self.config) if self.config else ''})),"
                    f" or pass its files with {option('data.train_files')}") from None
            except FileNotFoundError as e:  # (DatasetNotFoundError, DataFilesNotFoundError are ones)
                raise MLMError(f"{self.shown()} not found ({_said(e)}); check the name (a hub id user/name or"
                               " a dataset directory), and for a private or gated one set HF_TOKEN") from None
            except ValueError as e:  # an unknown config: "BuilderConfig 'x' not found. Available: [...]"
                raise MLMError(f"{self.shown()}: {_said(e)}; pass {option('data.dataset_config', 'NAME')} of one of its"
                               " configs") from None
            except RuntimeError as e:  # e.g. a dataset script, which `datasets` no longer runs
                raise MLMError(f"{self.shown()} cannot be loaded by datasets ({_said(e)})") from None
        return self._builder

    def identity(self) -> tuple:
        """What names this dataset's content in cache keys: name (a local directory by its absolute path), config,
        `datasets`' own hash of the resolved revision (a hub repository's commit), and the local data files' path,
        size and modification time (`datasets` hashes a local directory's configuration, not its files' state)."""
        b = self.builder
        name = os.path.abspath(self.name) if os.path.isdir(self.name) else self.name
        files = [str(f) for split in (b.config.data_files or {}).values() for f in split]
        local = sorted(f for f in files if not corpus.is_url(f) and os.path.isfile(f))
        return ("datasets", name, b.config.name, b.hash, corpus.fingerprint(local))

    def _stream(self, split: str):
        if self._splits is None:  # every split, lazily (nothing is read until iterated)
            self._splits = self.builder.as_streaming_dataset()
        if split in self._splits:
            return self._splits[split]
        which = "dataset_split" if split == self.split else "dataset_validation_split"
        raise MLMError(f"{self.shown()} has no split {split!r} (splits: {', '.join(self._splits)}); pass"
                       f" {option('data.' + which, 'NAME')} of one of them")

    def reader(self, split: str, limit_mb: float | None = None) -> DatasetReader:
        """A reader of `split`; `limit_mb`: at most about this many MB of text when the split's size is unknown (a
        tokenizer's sample then comes from the start of the split)."""
        stream = self._stream(split)
        info = (self.builder.info.splits or {}).get(split)
        reader = DatasetReader(stream, f"{self.shown()} split {split!r}", self.text_column, info)
        if limit_mb is not None and not reader.total_bytes:
            reader.limit_chars = int(limit_mb * 2**20)
        return reader

    def train_size(self) -> float:
        """The training split's size in bytes, as the dataset's info gives it; inf when unknown."""
        info = (self.builder.info.splits or {}).get(self.split)
        return float(info.num_bytes) if info is not None and info.num_bytes else math.inf

    def readers(self) -> tuple[DatasetReader, DatasetReader | None]:
        train = self.reader(self.split)
        return train, self.reader(self.validation_split) if self.validation_split else None


class DatasetReader:
    """The non-blank texts of a streamed split's `text_column` (a row is one example, as a JSONL record is), with
    the bytes read so far for the progress bar: the split's size from the dataset's info, shared out by rows (the
    info counts rows and bytes, not text); bytes of text read where the info has no size."""

    def __init__(self, stream, shown: str, text_column: str, info=None):
        self.stream, self.shown, self.text_column = stream, shown, text_column
        self.total_bytes = int(info.num_bytes or 0) if info is not None else 0
        self.total_rows = int(info.num_examples or 0) if info is not None else 0
        self.limit_chars: int | None = None
        self._rows, self._chars = 0, 0

    def bytes_done(self) -> int:
        if self.total_bytes and self.total_rows:
            return min(self.total_bytes, self.total_bytes * self._rows // self.total_rows)
        return self._chars

    def _check_column(self) -> None:
        features = self.stream.features  # (None when the stream does not know them before reading)
        if features is None:
            return
        col = self.text_column
        check(col in features, f"{self.shown} has no {col!r} column (columns: {list(features)}); pass"
                               f" {option('data.text_column', 'NAME')}")
        dtype = getattr(features[col], "dtype", None)
        check(dtype in ("string", "large_string"), f"{self.shown} column {col!r} holds {features[col]}, not text;"
                                                   f" pass {option('data.text_column', 'NAME')} of a text column")

    def __iter__(self) -> Iterator[str]:
        self._check_column()
        col, n = self.text_column, 0
        stream = self.stream if self.stream.features is None else self.stream.select_columns([col])
        batches = iter(stream.iter(batch_size=BATCH_ROWS))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (OSError, ValueError, ImportError) as e:  # a broken file or connection, a missing decoder
                raise MLMError(f"{self.shown}: cannot read rows after row {self._rows} ({_said(e)})") from None
            except Exception as e:
                if type(e).__module__.startswith("datasets"):  # DatasetGenerationError and its kin
                    raise MLMError(f"{self.shown}: cannot read rows after row {self._rows}"
                                   f" ({_said(e)})") from None
                raise
            values = batch.get(col)
            check(values is not None, f"{self.shown} has no {col!r} column (columns: {list(batch)}); pass"
                                      f" {option('data.text_column', 'NAME')}")
            for value in values:
                self._rows += 1
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise MLMError(f"{self.shown} row {self._rows}: the {col!r} column holds"
                                   f" {type(value).__name__}, not text; pass {option('data.text_column', 'NAME')}"
                                   " of a text column")
                text = value.strip()
                if not text:
                    continue
                n += 1
                self._chars += len(text.encode("utf-8"))
                yield from _split_long(text)
                if self.limit_chars is not None and self._chars >= self.limit_chars:
                    return
        check(n > 0, f"{self.shown} has no text in column {col!r}; pass {option('data.text_column', 'NAME')} or"
                     " another split")
