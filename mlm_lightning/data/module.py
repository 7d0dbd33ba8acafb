"""`MLMDataModule`: corpus -> tokenizer -> cached token stream -> examples -> masked batches.

The corpus is streamed through the tokenizer once into a flat token stream (every line followed by [SEP]),
word starts and line offsets, written to disk shard by shard (`shards`, bounded memory) into the cache
(`cache`) and memory-mapped. Both ways of forming examples are O(1) views of that stream, so one cache serves
every `max_length`:
- `line_by_line`: one line per example, truncated to `max_length`, batched by similar length;
- packed (default): the stream cut into `max_length` blocks, each starting with [CLS]; no padding at all.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from mlm_lightning.arguments import RecordsGivenArguments, check_arguments, fspaths, option
from mlm_lightning.data import corpus, hf_datasets, mixture
from mlm_lightning.data.cache import CACHE_VERSION, TokenStream, build_cache, default_cache_dir
from mlm_lightning.data.distributed import together
from mlm_lightning.data.masking import MaskingCollator, check_masking
from mlm_lightning.data.offline import default_corpus_files
from mlm_lightning.data.sampling import BatchPlan, ConcatPlan, MixturePlan, ResumableDataLoader
from mlm_lightning.data.seeds import mask_seed
from mlm_lightning.data.tokenizer import (
    TOKENIZER_KINDS,
    SampledTexts,
    domain_words,
    extend_vocabulary,
    load_tokenizer,
    save_tokenizer_files,
    tokenizer_files,
    tokenizer_fingerprint,
    train_tokenizer,
    vocab_extension,
)
from mlm_lightning.errors import check

log = logging.getLogger("mlm_lightning")


class MLMDataset(Dataset):
    """Examples from a `TokenStream`; keys are `(epoch, index)` so each example gets its own mask seed.

    Each example has `input_ids` and `word_starts` (bool, aligned: True on the first piece of each word, on
    [CLS]/[SEP], and on the first piece of a packed block that starts inside a word) for whole-word masking.
    """

    def __init__(self, stream: TokenStream, max_length: int, packed: bool, cls_id: int, sep_id: int, seed: int):
        self.stream, self.max_length, self.packed = stream, max_length, packed
        self.cls_id, self.sep_id, self.seed = cls_id, sep_id, seed
        if packed:
            self.n = len(stream.tokens) // (max_length - 1)
        else:
            self.n = len(stream.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example (for batch plans); computed on demand, so workers never receive it."""
        if self.packed:
            return np.full(self.n, self.max_length, dtype=np.int64)
        return np.minimum(np.diff(self.stream.offsets) - 1, self.max_length - 2) + 2

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key) -> dict:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        tokens, starts = self.stream.tokens, self.stream.word_starts
        if self.packed:
            a, b = i * (self.max_length - 1), (i + 1) * (self.max_length - 1)
            ids = np.concatenate([[self.cls_id], tokens[a:b]])
            word_starts = np.concatenate([[1, 1], starts[a + 1 : b]])  # a block may start inside a word
        else:
            a = int(self.stream.offsets[i])
            b = min(int(self.stream.offsets[i + 1]) - 1, a + self.max_length - 2)
            ids = np.concatenate([[self.cls_id], tokens[a:b], [self.sep_id]])
            word_starts = np.concatenate([[1], starts[a:b], [1]])
        return {"input_ids": ids.astype(np.int64), "word_starts": word_starts.astype(bool),
                "mask_seed": mask_seed(self.seed, epoch, i)}




class MLMDataModule(RecordsGivenArguments, L.LightningDataModule):
    """The text a model trains on, tokenized once and masked afresh every epoch.

    Files, dirs, globs or URLs (txt, jsonl, csv, parquet; compressed too), a weighted mixture, a Hugging Face
    dataset by name, or the offline default corpus, tokenized into a memory-mapped cache. Used with `MLMModule`, it
    takes what the model brings (a pretrained model's own tokenizer and length, a new model's tokenizer kind) for
    the options it was not given.

    Example::

        data = MLMDataModule(train_files=["notes/*.txt"], line_by_line=True, max_length=128)
        lightning.Trainer(max_epochs=3).fit(MLMModule(model_name_or_path="bert-base-uncased"), datamodule=data)
    """

    def __init__(
        self,
        train_files: str | list[str | dict] | None = None,
        val_files: str | list[str] | None = None,
        val_fraction: float = 0.05,
        val_max_lines: int = 10_000,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        dataset_split: str = "train",
        dataset_validation_split: str | None = None,
        text_column: str = "text",
        line_by_line: bool = False,
        max_length: int = 64,
        batch_size: int = 16,
        max_tokens: int | None = None,
        group_by_length: bool = True,
        pad_to_multiple_of: int = 8,
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        masking: str = "token",
        mean_span_length: float = 3.0,
        tokenizer: str | None = None,
        tokenizer_kind: str = "bert",
        vocab_size: int = 8192,
        extend_vocab: int = 0,
        lowercase: bool = True,
        tokenizer_sample_mb: float = 100.0,
        cache_dir: str | None = None,
        num_workers: int = 0,
        pin_memory: bool | Literal["auto"] = "auto",
        seed: int = 42,
        predict_files: str | list[str] | None = None,
        storage_options: dict | None = None,
        epoch_tokens: int | None = None,
    ):
        """Text data for masked-language modeling.

        Args:
            train_files: Training text: a file, a list, a directory or a glob (.txt: one example per line,
                blank lines skipped; .jsonl/.csv/.parquet: the `text_column` field; txt/jsonl/csv may be
                compressed: .gz, .bz2, .xz, .zst; a `datasets` save_to_disk directory: its Arrow files). Paths
                or fsspec URLs (s3://, gs://, http(s)://; globs and directories where the store lists them).
                A mixture: a list of sources `{"path": ..., "weight": 0.8, "name": ..., "val_files": ...}`,
                each tokenized into its own cache, batches drawn by weight (by tokens). Unset: the offline
                default corpus: CPython's language reference and standard-library docstrings, validated on its
                held-out modules (`data/offline.py`).
            val_files: Validation text, same forms. Unset: a seeded `val_fraction` of the training lines.
            val_fraction: Share of training lines held out for validation when `val_files` is unset (a seeded
                function of each line's index, decided before tokenizing).
            val_max_lines: At most this many lines are held out by `val_fraction` (the rest train), so a huge
                corpus does not validate for hours.
            dataset_name: Training text from a Hugging Face dataset instead of files: a hub id (`user/name`), a
                local dataset repository directory, or offline a dataset in the `datasets` cache; streamed through
                `datasets.load_dataset(..., streaming=True)` (`pip install 'mlm-lightning[datasets]'`), its
                `text_column`, cached by the dataset's resolved revision.
            dataset_config: The dataset's configuration (subset), e.g. `wikitext-103-raw-v1`. Unset: its default.
            dataset_split: The dataset's split to train on.
            dataset_validation_split: The dataset's split to validate on, e.g. `validation`. Unset: a seeded
                `val_fraction` of the training split is held out, as for files.
            text_column: The field holding the text in .jsonl/.csv/.parquet files and in a dataset's rows.
            line_by_line: One example per line (truncated to `max_length`) instead of packed blocks.
            max_length: Tokens per example, including [CLS]/[SEP].
            batch_size: Examples per batch.
            max_tokens: With `line_by_line`: fill batches up to this many (padded) tokens instead of `batch_size`.
            group_by_length: With `line_by_line`: batch examples of similar length (less padding).
            pad_to_multiple_of: With `line_by_line`: pad batches to a multiple of this length (8 suits tensor
                cores; with `--model.compile` 64, so that few shapes are compiled).
            mlm_probability: Share of (non-special) tokens to predict.
            mask_replace_prob: Of the chosen tokens, the share replaced by [MASK].
            random_replace_prob: Of the chosen tokens, the share replaced by a random token (the rest stay).
            masking: What gets masked: `token` (BERT: each token independently), `whole_word` (all pieces of a
                word together) or `span` (SpanBERT: runs of whole words, never across lines).
            mean_span_length: span masking: the mean span length in words (geometric, clipped at 10 words).
            tokenizer: A tokenizer dir or hub id. Unset: the model's, or for a model trained from scratch a
                vocabulary of `tokenizer_kind` trained on `train_files` (saved in the cache and reused).
            tokenizer_kind: The tokenizer trained when none is given, fitting the model family: bert (WordPiece,
                [CLS] [SEP] [MASK]), distilbert (the same without token_type_ids), roberta (byte-level BPE,
                <s> </s> <mask>) or modernbert (byte-level BPE with [CLS] [SEP] [MASK]). fit sets it from
                --model.architecture.
            vocab_size: Size of the vocabulary trained when no tokenizer is given.
            extend_vocab: Continuing a pretrained model: add this many domain words to its vocabulary, the most
                frequent words of the corpus (its `tokenizer_sample_mb` sample) that its tokenizer cuts into
                pieces; each new embedding row starts at the mean of its pieces' rows and trains at
                `--model.head_learning_rate` (docs/vocabulary.md). 0: off.
            lowercase: Lowercase text in the trained tokenizer.
            tokenizer_sample_mb: The WordPiece vocabulary is trained on a seeded sample of about this many MB of
                the corpus (all of it when smaller): the same corpus and seed give the same sample.
            cache_dir: Where tokenizers and tokenized corpora are cached (default ~/.cache/mlm-lightning or
                $MLM_LIGHTNING_CACHE).
            num_workers: DataLoader worker processes.
            pin_memory: Batches in page-locked memory, so the copy to the GPU runs asynchronously: auto (when training
                on a CUDA device), true or false.
            seed: Seed of the validation split, the data order and the masks.
            predict_files: Sentences with [MASK] for the `predict` subcommand (one per line).
            storage_options: fsspec options for URL corpora, e.g. `{"endpoint_url": ...}` (an S3-compatible store),
                `{"anon": true}` (a public bucket), `{"profile": ...}`.
            epoch_tokens: A mixture's epoch: this many training tokens (all processes together), a source that
                runs out starting a new seeded pass. Unset: an epoch ends when the first source runs out.
        """
        super().__init__()
        check_arguments("MLMDataModule", MLMDataModule.__init__, locals())
        train_files, val_files, predict_files = fspaths(train_files), fspaths(val_files), fspaths(predict_files)
        tokenizer, cache_dir = fspaths(tokenizer), fspaths(cache_dir)  # (pathlib.Paths, saved as strs)
        self.save_hyperparameters(ignore=["storage_options"])
        self.hparams["storage_options"] = corpus.redacted(storage_options)  # (hparams go into every checkpoint)
        self._check_options()
        self.hf_dataset = hf_datasets.HFDataset(dataset_name, dataset_config, dataset_split, dataset_validation_split,
                                                text_column) if dataset_name is not None else None
        self.cache_dir = cache_dir or default_cache_dir()
        self.storage_options = storage_options
        self.sources = mixture.parse_sources(train_files, storage_options) if mixture.is_mixture(train_files) else None
        check(self.sources is None or val_files is None, "with a mixture, give each source its own val_files"
              ' ({"path": ..., "weight": ..., "val_files": ...}), or none to hold out --data.val_fraction of each')
        check(epoch_tokens is None or self.sources is not None, "epoch_tokens sets a mixture's epoch; with one"
              " corpus use --trainer.limit_train_batches")
        if self.sources is not None:
            self.train_paths = list(dict.fromkeys(p for s in self.sources for p in s.paths))
        elif train_files is not None:
            self.train_paths = corpus.resolve_files(train_files, storage_options=storage_options)
        else:
            self.train_paths = None
        self.val_paths = None if val_files is None else corpus.resolve_files(val_files, "val_files", storage_options)
        self.predict_paths = corpus.resolve_files(predict_files, "predict_files", storage_options) \
            if predict_files else None
        self.tokenizer = None
        self.vocab_extension: list[tuple[int, list[int]]] = []  # (new id, its pieces' ids): see `_extended`
        self.datasets: dict[str, MLMDataset] = {}
        self._train_loader: ResumableDataLoader | None = None
        self._resume_state: dict | None = None
        self._data_dirs_list: list[str] | None = None

    def _check_options(self) -> None:
        """Each option's own range, in one place (called first thing in `__init__`: no file is read before)."""
        h = self.hparams
        mask_share, random_share = h.mask_replace_prob, h.random_replace_prob
        check(
            0 <= mask_share and 0 <= random_share and mask_share + random_share <= 1,
            f"mask_replace_prob + random_replace_prob must be at most 1 and neither negative, got "
            f"{mask_share} + {random_share}; e.g. 0.8 and 0.1",
        )
        check(h.batch_size > 0, f"batch_size must be positive, got {h.batch_size}")
        check(h.max_length > 2, f"max_length must be at least 3 (room for [CLS] and [SEP]), got {h.max_length}")
        check(h.max_tokens is None or h.max_tokens >= h.max_length,
              f"max_tokens must be >= max_length, got {h.max_tokens}")
        check(0 <= h.val_fraction < 1, f"val_fraction must be in [0, 1), got {h.val_fraction}")
        check(
            h.val_files is not None or h.val_fraction > 0,
            f"no validation data: set {option('data.val_fraction')} above 0 or pass {option('data.val_files')}",
        )
        check(h.num_workers >= 0, f"num_workers must be >= 0, got {h.num_workers}")
        check(h.pin_memory in (True, False, "auto"), f"pin_memory must be auto, true or false, got {h.pin_memory!r}")
        check(h.pad_to_multiple_of >= 1, f"pad_to_multiple_of must be >= 1, got {h.pad_to_multiple_of}")
        check_masking(h.masking, h.mlm_probability, h.mean_span_length)  # (mlm_probability too)
        check(h.val_max_lines >= 1, f"val_max_lines must be at least 1, got {h.val_max_lines}")
        check(h.tokenizer_kind in TOKENIZER_KINDS,
              f"tokenizer_kind must be one of {', '.join(TOKENIZER_KINDS)}, got {h.tokenizer_kind!r}")
        check(h.tokenizer_sample_mb > 0, f"tokenizer_sample_mb must be positive, got {h.tokenizer_sample_mb}")
        check(h.epoch_tokens is None or h.epoch_tokens > 0, f"epoch_tokens must be positive, got {h.epoch_tokens}")
        check(h.extend_vocab >= 0, f"extend_vocab must be 0 (off) or a number of words, got {h.extend_vocab}")
        hf_datasets.check_options(h.dataset_name, h.dataset_config, h.dataset_split, h.dataset_validation_split,
                                  h.train_files, h.val_files)

    # -- preparation (rank 0) and loading (every rank) --------------------------------------------------
    def _train_paths(self) -> list[str]:
        # (a dataset by name has no files: never the default corpus in its place)
        assert self.hf_dataset is None, "read a dataset by name with _train_reader()"
        if self.train_paths is None:  # the offline default, with its own held-out modules (unless val_files)
            train, val = default_corpus_files(self.cache_dir)
            self.train_paths = [train]
            self.val_paths = [val] if self.val_paths is None else self.val_paths
        return self.train_paths

    def _train_reader(self, sample_mb: float | None = None):
        """A reader of the training text: its files', or a dataset's training split (`sample_mb`: see
        `HFDataset.reader`)."""
        if self.hf_dataset is not None:
            return self.hf_dataset.reader(self.hf_dataset.split, sample_mb)
        return corpus.CorpusReader(self._train_paths(), self.hparams.text_column, self.storage_options)

    def _tokenizer_dir(self) -> str:
        h = self.hparams
        files, named = ([], [self.hf_dataset.identity()]) if self.hf_dataset else (self._train_paths(), [])
        size = self.hf_dataset.train_size() if self.hf_dataset else \
            sum(corpus.file_size(f, self.storage_options) for f in files)
        sampled = size > h.tokenizer_sample_mb * 2**20
        kind = h.get("tokenizer_kind", "bert")
        # (BERT's key and name are those of the caches written before other kinds came: they stay valid)
        key = corpus.fingerprint(files, *named, h.vocab_size, h.lowercase,
                                 (h.tokenizer_sample_mb, h.seed) if sampled else None,
                                 *([kind] if kind != "bert" else []), storage_options=self.storage_options)
        return os.path.join(self.cache_dir, "tokenizers", f"{'wordpiece' if kind == 'bert' else kind}-{key}")

    def load_tokenizer(self, train_if_missing: bool = False):
        if self.tokenizer is None:
            if self.hparams.tokenizer:
                self.tokenizer = self._extended(load_tokenizer(self.hparams.tokenizer))
            elif os.path.isdir(self._tokenizer_dir()):
                self.tokenizer = load_tokenizer(self._tokenizer_dir())
            else:
                check(train_if_missing, "the corpus tokenizer is missing; call prepare_data() first")
                check(not self.hparams.get("extend_vocab"), f"{option('data.extend_vocab')} extends a pretrained"
                      f" model's vocabulary: it needs {option('model.model_name_or_path')} (or"
                      f" {option('data.tokenizer')}); a vocabulary trained on the corpus fits it already")
                kind = self.hparams.get("tokenizer_kind", "bert")
                log.info("training a %s tokenizer (vocab %d) on the corpus", kind, self.hparams.vocab_size)
                reader = self._train_reader(self.hparams.tokenizer_sample_mb)
                texts = SampledTexts(reader, self.hparams.tokenizer_sample_mb, self.hparams.seed)
                self.tokenizer = train_tokenizer(
                    kind, texts, self._tokenizer_dir(), self.hparams.vocab_size, self.hparams.max_length,
                    self.hparams.lowercase,
                )
                if len(self.tokenizer) > self.hparams.vocab_size:  # (the trainer goes over a size too small)
                    log.warning("--data.vocab_size %d is below what this corpus needs: the tokenizer has %d tokens"
                                " (each special token and each character of the corpus needs one); the model uses"
                                " them all",
                                self.hparams.vocab_size, len(self.tokenizer))
        return self.tokenizer

    def _extended(self, base):
        """`base` with `extend_vocab` domain words of the corpus added (`tokenizer.domain_words`), cached under the
        corpus, the base tokenizer's content and the count: a resume or a second run reuses it (and the tokenized
        corpus, whose key hashes the extended tokenizer); `vocab_extension` tells the model the new rows."""
        h = self.hparams
        self.vocab_extension = []
        if not h.get("extend_vocab"):
            return base
        files, named = ([], [self.hf_dataset.identity()]) if self.hf_dataset else (self._train_paths(), [])
        size = self.hf_dataset.train_size() if self.hf_dataset else \
            sum(corpus.file_size(f, self.storage_options) for f in files)
        sampled = size > h.tokenizer_sample_mb * 2**20
        key = corpus.fingerprint(files, *named, h.text_column, tokenizer_fingerprint(base), h.extend_vocab,
                                 (h.tokenizer_sample_mb, h.seed) if sampled else None,
                                 storage_options=self.storage_options)
        target = os.path.join(self.cache_dir, "tokenizers", f"extended-{key}")
        if not os.path.isdir(target):
            log.info("counting the corpus's words for %d domain words (--data.extend_vocab)", h.extend_vocab)
            reader = self._train_reader(h.tokenizer_sample_mb)
            words = domain_words(base, SampledTexts(reader, h.tokenizer_sample_mb, h.seed), h.extend_vocab)
            where = save_tokenizer_files(tokenizer_files(extend_vocabulary(base, words)), target)
            if where != target:  # another process wrote it first: theirs (the same words) is kept
                shutil.rmtree(where, ignore_errors=True)
        extended = load_tokenizer(target)
        self.vocab_extension = vocab_extension(base, extended)
        log.info("vocabulary extended by %d entries (%s)", len(self.vocab_extension), target)
        return extended

    def _parts(self) -> list[tuple[list[str], list[str] | None]]:
        """(train files, val files) of each tokenized cache: one, or one per source of a mixture (a dataset by name:
        no files, and [] for val when it has a validation split)."""
        if self.hf_dataset is not None:
            return [([], [] if self.hf_dataset.validation_split else None)]
        if self.sources is None:
            train = self._train_paths()  # (first: the default corpus brings its validation file)
            return [(train, self.val_paths)]
        return [(s.paths, s.val_paths) for s in self.sources]

    def _data_dirs(self) -> list[str]:
        if self._data_dirs_list is None:  # hashing the tokenizer serializes it: once is enough
            self._data_dirs_list = [self._data_key_dir(train, val) for train, val in self._parts()]
        return self._data_dirs_list

    def _data_dir(self) -> str:
        return self._data_dirs()[0]

    def _cached(self) -> bool:
        return all(os.path.isdir(d) for d in self._data_dirs())

    def _data_key_dir(self, train: list[str], val: list[str] | None) -> str:
        h = self.hparams
        key = corpus.fingerprint(
            train + (val or []), len(train), h.text_column,
            (h.val_fraction, h.val_max_lines) if val is None else None, h.seed,
            tokenizer_fingerprint(self.load_tokenizer()), CACHE_VERSION,
            *([self.hf_dataset.identity(), self.hf_dataset.split, self.hf_dataset.validation_split]
              if self.hf_dataset else []), storage_options=self.storage_options,
        )
        return os.path.join(self.cache_dir, "data", key)

    def _pair_with_model(self) -> None:
        """What the model brings (its tokenizer, length, tokenizer kind) for options this module was not given,
        asked of the Trainer's module before any tokenizer is trained or loaded (`MLMModule.pair_data`; the data
        path never imports the model)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if callable(getattr(module, "pair_data", None)):
            module.pair_data(self)

    def prepare_data(self) -> None:
        self._pair_with_model()
        if self.trainer is not None and self.trainer.world_size > 1:
            return  # several processes: setup() agrees on one vocabulary first (see _setup_distributed)
        self.load_tokenizer(train_if_missing=True)
        if self.trainer is not None and self.trainer.predicting:
            return  # predict needs the tokenizer, not the tokenized corpus
        if self._cached():
            log.info("tokenized corpus found in the cache: %s", ", ".join(self._data_dirs()))
            return
        self._build_cache()

    def _build_cache(self) -> None:
        h = self.hparams
        show = self.trainer is None or self.trainer.is_global_zero
        for directory, (train, val) in zip(self._data_dirs(), self._parts(), strict=True):
            if os.path.isdir(directory):
                continue
            if self.hf_dataset is not None:  # (readers of its splits, where files are listed)
                train, val = self.hf_dataset.readers()
            meta = build_cache(
                directory, self.tokenizer, train, val, h.text_column,
                h.val_fraction, h.val_max_lines, h.seed, progress=show, storage_options=self.storage_options,
            )
            log.info("tokenized %d train / %d val tokens into %s", meta["train_tokens"], meta["val_tokens"], directory)

    def setup(self, stage: str | None = None) -> None:
        self._pair_with_model()  # (processes that ran no prepare_data)
        distributed = self.trainer is not None and self.trainer.world_size > 1
        if stage == "predict":
            if distributed:
                self._setup_distributed(self.trainer, tokenize=False)
            return self._setup_predict()
        if self.sources is not None:
            mixture.attach_logger(self.trainer, [s.name for s in self.sources])
        if self.datasets:
            return
        if distributed:
            self._setup_distributed(self.trainer)
        tok = self.load_tokenizer()
        if not self._cached():
            self.prepare_data()
        h = self.hparams
        for split in ("train", "val"):
            parts = []
            for i, directory in enumerate(self._data_dirs()):
                ds = MLMDataset(TokenStream.load(directory, split), h.max_length, not h.line_by_line,
                                tok.cls_token_id, tok.sep_token_id, h.seed)
                where = "" if self.sources is None else f" of source {self.sources[i].name!r}"
                check(
                    len(ds) > 0,
                    f"the {split} split{where} is too small for one example of max_length {h.max_length}"
                    f" ({len(ds.stream.tokens)} tokens); add text, lower --data.max_length or use --data.line_by_line",
                )
                parts.append(ds)
            names = [s.name for s in self.sources or []]
            self.datasets[split] = parts[0] if self.sources is None else mixture.MixtureDataset(parts, names, h.seed)
        self.collator = MaskingCollator(tok, h.mlm_probability, h.mask_replace_prob, h.random_replace_prob,
                                        masking=h.masking, mean_span_length=h.mean_span_length,
                                        pad_to_multiple_of=h.pad_to_multiple_of)
        if self.sources is not None:
            self.collator = mixture.MixtureCollator(self.collator)

    def _setup_distributed(self, trainer, tokenize: bool = True) -> None:
        """One vocabulary for all processes, then each node's cache tokenized with it.

        Lightning prepares data once per node, and nodes' caches may hold different vocabularies under one key (one
        written by another version): two vocabularies would make every gradient all-reduce mix them. So global rank 0
        loads or trains the tokenizer and sends its files to every process, which keeps them in its node's
        cache (node-local or shared alike). Then global rank 0 tokenizes, and afterwards the first process of
        each node whose cache does not have the result yet (node-local caches)."""
        strategy = trainer.strategy
        if not self.hparams.tokenizer:
            files = together(trainer, lambda: tokenizer_files(self.load_tokenizer(train_if_missing=True))
                             if trainer.is_global_zero else None)
            files = strategy.broadcast(files, src=0)
            if not trainer.is_global_zero and self.tokenizer is None:  # (one given already, a checkpoint's own on
                # resume, is kept: the fingerprints below must agree)
                self.tokenizer = self._received_tokenizer(files)
        prints = [None] * trainer.world_size
        dist.all_gather_object(prints, together(trainer, lambda: tokenizer_fingerprint(self.load_tokenizer())))
        check(
            len(set(prints)) == 1,
            f"the processes have different vocabularies (fingerprints by process: {', '.join(prints)}); give every"
            " node the same --data.tokenizer directory",
        )
        if not tokenize:
            return
        for first in (trainer.is_global_zero, trainer.local_rank == 0 and not trainer.is_global_zero):
            # (the gather in `together` is also the barrier: the others wait until this turn's cache exists)
            together(trainer, lambda first=first: self._build_cache() if first and not self._cached() else None)

    def _received_tokenizer(self, files: dict[str, str]):
        target = self._tokenizer_dir()
        where = save_tokenizer_files(files, target)
        tokenizer = load_tokenizer(where)
        if where != target:  # this node's cache already had a tokenizer under that key
            shutil.rmtree(where, ignore_errors=True)  # (our own temporary directory)
            cached = load_tokenizer(target)
            if tokenizer_fingerprint(cached) == tokenizer_fingerprint(tokenizer):
                return cached
            log.warning("this node's cached tokenizer %s differs from process 0's; using process 0's", target)
        return tokenizer

    def _setup_predict(self) -> None:
        check(self.predict_paths is not None,
              f"predict needs input: pass {option('data.predict_files', 'FILE')} (a file of [MASK] sentences)")
        mask = self.load_tokenizer().mask_token
        self.predict_lines = []
        for path in self.predict_paths:
            lines = corpus.iter_texts([path], self.hparams.text_column, self.storage_options)
            for lineno, line in enumerate(lines, start=1):
                check("[MASK]" in line or mask in line, f"{path} line {lineno} has no [MASK]: {line[:60]!r}")
                self.predict_lines.append(line)

    # -- loaders --------------------------------------------------------------------------------------
    def _loader(self, split: str, train: bool) -> ResumableDataLoader:
        h = self.hparams
        ds = self.datasets[split]
        trainer = self.trainer
        world = trainer.world_size if trainer else 1
        rank = trainer.global_rank if trainer else 0
        parts = ds.parts if self.sources is not None else [ds]
        for part in parts:
            check(
                len(part) >= world or train,
                f"the {split} split has {len(part)} examples, fewer than the {world} processes;"
                f" add validation text ({option('data.val_fraction')} or {option('data.val_files')})",
            )

        def batch_plan(lengths, seed, replicas, replica):
            return BatchPlan(
                lengths, h.batch_size, max_tokens=h.max_tokens if h.line_by_line else None,
                group_by_length=h.group_by_length and h.line_by_line, shuffle=train, seed=seed,
                num_replicas=replicas, rank=replica, epoch_key=None if train else -1,
                # packed training: every batch batch_size x max_length, a static shape (torch.compile compiles once)
                drop_last=train and not h.line_by_line, pad_multiple=h.pad_to_multiple_of,
            )

        if self.sources is None:
            plan = batch_plan(ds.lengths, h.seed, world, rank)
        elif train:  # each source's own seeded order over all its batches; the mixture splits them by process
            lengths = [p.lengths for p in parts]
            plans = [batch_plan(x, mixture.source_seed(h.seed, i), 1, 0) for i, x in enumerate(lengths)]
            plan = MixturePlan(plans, lengths, [s.weight for s in self.sources], list(ds.offsets[:-1]),
                               seed=h.seed, num_replicas=world, rank=rank, epoch_tokens=h.epoch_tokens)
        else:
            plan = ConcatPlan([batch_plan(p.lengths, h.seed, world, rank) for p in parts], list(ds.offsets[:-1]))
        check(
            len(plan) > 0 or not train,
            f"the training split gives too few batches for {world} processes (each needs at least one batch of"
            f" {h.batch_size if not h.max_tokens else f'up to {h.max_tokens} tokens'}); add text, lower"
            " --data.batch_size or use fewer processes",
        )
        progress = (lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed) if train and trainer else None
        # a private generator: creating a loader iterator must not draw from the global RNG (dropout's)
        return ResumableDataLoader(
            ds, plan, progress=progress, collate_fn=self.collator, num_workers=h.num_workers,
            generator=torch.Generator().manual_seed(h.seed), persistent_workers=h.num_workers > 0,
            pin_memory=self.pins_memory(),
        )

    def pins_memory(self) -> bool:
        """`pin_memory` resolved: auto pins when the trainer runs on a CUDA device."""
        choice = self.hparams.get("pin_memory", "auto")
        if choice == "auto":
            return bool(self.trainer is not None and self.trainer.strategy.root_device.type == "cuda")
        return bool(choice)

    def train_dataloader(self):
        self._train_loader = self._loader("train", train=True)
        if self._resume_state:
            self._train_loader.load_state_dict(self._resume_state)
            self._resume_state = None
        return self._train_loader

    # The position in the data (epoch, batches done) is checkpointed here as well as in the loader:
    # Lightning restores a data module before configure_optimizers() builds the train loader (through
    # `estimated_stepping_batches`), but restores loader states only for loaders built after that.
    def state_dict(self) -> dict:
        return self._train_loader.state_dict() if self._train_loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._resume_state = state

    def val_dataloader(self):
        return self._loader("val", train=False)

    def test_dataloader(self):
        return self._loader("val", train=False)

    def predict_dataloader(self):
        """Batches of (line number, sentence); each process takes every world_size-th line."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        items = list(enumerate(self.predict_lines))[rank::world]
        return DataLoader(items, batch_size=self.hparams.batch_size, collate_fn=list)
