"""`MLMDataModule`: corpus -> tokenizer -> cached token stream -> examples -> masked batches.

The corpus is tokenized once into a flat token stream (every line followed by [SEP]) plus line offsets,
saved as .npy files and memory-mapped. Both ways of forming examples are O(1) views of that stream, so one
cache serves every `max_length`:
- `line_by_line`: one line per example, truncated to `max_length`, batched by similar length;
- packed (default): the stream cut into `max_length` blocks, each starting with [CLS]; no padding at all.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mlm_lightning import corpus
from mlm_lightning.collator import MaskingCollator, mask_seed
from mlm_lightning.errors import check
from mlm_lightning.sampling import BatchPlan, ResumableDataLoader
from mlm_lightning.tokenizer import load_tokenizer, tokenizer_fingerprint, train_wordpiece

log = logging.getLogger("mlm_lightning")
CACHE_VERSION = 1


def default_cache_dir() -> str:
    return os.environ.get("MLM_LIGHTNING_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mlm-lightning")


class TokenStream:
    """A split of the corpus: `tokens` (memory-mapped) and `offsets` (line i is tokens[off[i]:off[i+1]])."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
        self.tokens, self.offsets = tokens, offsets

    @classmethod
    def load(cls, directory: str, split: str) -> TokenStream:
        return cls(
            np.load(os.path.join(directory, f"{split}.tokens.npy"), mmap_mode="r"),
            np.load(os.path.join(directory, f"{split}.offsets.npy")),
        )

    def save(self, directory: str, split: str) -> None:
        np.save(os.path.join(directory, f"{split}.tokens.npy"), self.tokens)
        np.save(os.path.join(directory, f"{split}.offsets.npy"), self.offsets)

    def take(self, lines: np.ndarray) -> TokenStream:
        starts = self.offsets[lines]
        lens = self.offsets[lines + 1] - starts
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        gather = np.repeat(starts - offsets[:-1], lens) + np.arange(offsets[-1])
        return TokenStream(np.asarray(self.tokens[gather]), offsets)


def tokenize(texts, tokenizer, sep_id: int, batch_lines: int = 1000) -> TokenStream:
    """Tokenize with the fast tokenizer in batches; each line's ids are followed by [SEP]."""
    dtype = np.uint16 if len(tokenizer) < 2**16 else np.int32
    chunks, lengths = [], []
    it = iter(texts)
    while batch := list(itertools.islice(it, batch_lines)):
        ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
        ids = [x for x in ids["input_ids"] if x]
        chunks.append(np.fromiter(itertools.chain.from_iterable(x + [sep_id] for x in ids), dtype=dtype))
        lengths += [len(x) + 1 for x in ids]
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    return TokenStream(np.concatenate(chunks) if chunks else np.zeros(0, dtype), offsets)


class MLMDataset(Dataset):
    """Examples from a `TokenStream`; keys are `(epoch, index)` so each example gets its own mask seed."""

    def __init__(self, stream: TokenStream, max_length: int, packed: bool, cls_id: int, sep_id: int, seed: int):
        self.stream, self.max_length, self.packed = stream, max_length, packed
        self.cls_id, self.sep_id, self.seed = cls_id, sep_id, seed
        if packed:
            n = len(stream.tokens) // (max_length - 1)
            self.lengths = np.full(n, max_length, dtype=np.int64)
        else:
            self.lengths = np.minimum(np.diff(stream.offsets) - 1, max_length - 2) + 2

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, key) -> dict:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        if self.packed:
            body = self.stream.tokens[i * (self.max_length - 1) : (i + 1) * (self.max_length - 1)]
            ids = np.concatenate([[self.cls_id], body])
        else:
            start = self.stream.offsets[i]
            body = self.stream.tokens[start : min(self.stream.offsets[i + 1] - 1, start + self.max_length - 2)]
            ids = np.concatenate([[self.cls_id], body, [self.sep_id]])
        return {"input_ids": ids.astype(np.int64), "mask_seed": mask_seed(self.seed, epoch, i)}


class MLMDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        val_fraction: float = 0.05,
        text_column: str = "text",
        line_by_line: bool = False,
        max_length: int = 64,
        batch_size: int = 16,
        max_tokens: int | None = None,
        group_by_length: bool = True,
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        tokenizer: str | None = None,
        vocab_size: int = 8192,
        lowercase: bool = True,
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 42,
        predict_files: str | list[str] | None = None,
    ):
        """Text data for masked-language modeling.

        Args:
            train_files: Training text: a file, a list, a directory or a glob (.txt: one example per line,
                blank lines skipped; .jsonl/.csv: the `text_column` field). Unset: the offline default corpus,
                CPython's bundled language reference.
            val_files: Validation text, same forms. Unset: a seeded `val_fraction` of the training lines.
            val_fraction: Share of training lines held out for validation when `val_files` is unset.
            text_column: The field holding the text in .jsonl/.csv files.
            line_by_line: One example per line (truncated to `max_length`) instead of packed blocks.
            max_length: Tokens per example, including [CLS]/[SEP].
            batch_size: Examples per batch.
            max_tokens: With `line_by_line`: fill batches up to this many (padded) tokens instead of `batch_size`.
            group_by_length: With `line_by_line`: batch examples of similar length (less padding).
            mlm_probability: Share of (non-special) tokens to predict.
            mask_replace_prob: Of the chosen tokens, the share replaced by [MASK].
            random_replace_prob: Of the chosen tokens, the share replaced by a random token (the rest stay).
            tokenizer: A tokenizer dir or hub id. Unset: the model's, or for a model trained from scratch a
                WordPiece vocabulary trained on `train_files` (saved in the cache and reused).
            vocab_size: Size of the WordPiece vocabulary trained when no tokenizer is given.
            lowercase: Lowercase text in the trained WordPiece tokenizer.
            cache_dir: Where tokenizers and tokenized corpora are cached (default ~/.cache/mlm-lightning or
                $MLM_LIGHTNING_CACHE).
            num_workers: DataLoader worker processes.
            seed: Seed of the validation split, the data order and the masks.
            predict_files: Sentences with [MASK] for the `predict` subcommand (one per line).
        """
        super().__init__()
        self.save_hyperparameters()
        check(0 < mlm_probability < 1, f"mlm_probability must be in (0, 1), got {mlm_probability}; e.g. 0.15")
        check(
            0 <= mask_replace_prob and 0 <= random_replace_prob and mask_replace_prob + random_replace_prob <= 1,
            f"mask_replace_prob + random_replace_prob must be at most 1 and neither negative, got "
            f"{mask_replace_prob} + {random_replace_prob}; e.g. 0.8 and 0.1",
        )
        check(batch_size > 0, f"batch_size must be positive, got {batch_size}")
        check(max_length > 2, f"max_length must be at least 3 (room for [CLS] and [SEP]), got {max_length}")
        check(max_tokens is None or max_tokens >= max_length, f"max_tokens must be >= max_length, got {max_tokens}")
        check(0 <= val_fraction < 1, f"val_fraction must be in [0, 1), got {val_fraction}")
        check(
            val_files is not None or val_fraction > 0,
            "no validation data: set --data.val_fraction above 0 or pass --data.val_files",
        )
        check(num_workers >= 0, f"num_workers must be >= 0, got {num_workers}")
        self.cache_dir = cache_dir or default_cache_dir()
        self.train_paths = corpus.resolve_files(train_files) if train_files is not None else None
        self.val_paths = corpus.resolve_files(val_files, "val_files") if val_files is not None else None
        self.predict_paths = corpus.resolve_files(predict_files, "predict_files") if predict_files else None
        self.tokenizer = None
        self.datasets: dict[str, MLMDataset] = {}
        self._train_loader: ResumableDataLoader | None = None
        self._resume_state: dict | None = None
        self._data_dir_path: str | None = None

    # -- preparation (rank 0) and loading (every rank) --------------------------------------------------
    def _train_paths(self) -> list[str]:
        if self.train_paths is None:
            self.train_paths = [corpus.default_corpus(self.cache_dir)]
        return self.train_paths

    def _tokenizer_dir(self) -> str:
        key = corpus.fingerprint(self._train_paths(), self.hparams.vocab_size, self.hparams.lowercase)
        return os.path.join(self.cache_dir, "tokenizers", f"wordpiece-{key}")

    def load_tokenizer(self, train_if_missing: bool = False):
        if self.tokenizer is None:
            if self.hparams.tokenizer:
                self.tokenizer = load_tokenizer(self.hparams.tokenizer)
            elif os.path.isdir(self._tokenizer_dir()):
                self.tokenizer = load_tokenizer(self._tokenizer_dir())
            else:
                check(train_if_missing, "the corpus tokenizer is missing; call prepare_data() first")
                log.info("training a WordPiece tokenizer (vocab %d) on the corpus", self.hparams.vocab_size)
                texts = corpus.iter_texts(self._train_paths(), self.hparams.text_column)
                self.tokenizer = train_wordpiece(
                    texts, self._tokenizer_dir(), self.hparams.vocab_size, self.hparams.max_length,
                    self.hparams.lowercase,
                )
        return self.tokenizer

    def _data_dir(self) -> str:
        if self._data_dir_path is None:  # hashing the tokenizer serializes it: once is enough
            self._data_dir_path = self._data_key_dir()
        return self._data_dir_path

    def _data_key_dir(self) -> str:
        h = self.hparams
        files = self._train_paths() + (self.val_paths or [])
        key = corpus.fingerprint(
            files, len(self._train_paths()), h.text_column, h.val_fraction if self.val_paths is None else None,
            h.seed, tokenizer_fingerprint(self.load_tokenizer()), CACHE_VERSION,
        )
        return os.path.join(self.cache_dir, "data", key)

    def prepare_data(self) -> None:
        self.load_tokenizer(train_if_missing=True)
        if self.trainer is not None and self.trainer.predicting:
            return  # predict needs the tokenizer, not the tokenized corpus
        directory = self._data_dir()
        if os.path.isdir(directory):
            log.info("tokenized corpus found in the cache: %s", directory)
            return
        tmp = f"{directory}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:  # written aside and renamed: an interruption never leaves a half-written cache
            sep = self.tokenizer.sep_token_id
            texts = corpus.iter_texts(self._train_paths(), self.hparams.text_column)
            train = tokenize(texts, self.tokenizer, sep)
            n = len(train.offsets) - 1
            check(n > 0, "the training files contain no text; add text to them")
            if self.val_paths is not None:
                val = tokenize(corpus.iter_texts(self.val_paths, self.hparams.text_column), self.tokenizer, sep)
            else:
                n_val = int(round(n * self.hparams.val_fraction))
                check(
                    0 < n_val < n,
                    f"the corpus has {n} lines, too few for a {self.hparams.val_fraction} validation split;"
                    " add text, raise --data.val_fraction or pass --data.val_files",
                )
                rng = np.random.default_rng(self.hparams.seed)
                is_val = np.zeros(n, dtype=bool)
                is_val[rng.choice(n, n_val, replace=False)] = True
                val, train = train.take(np.flatnonzero(is_val)), train.take(np.flatnonzero(~is_val))
            train.save(tmp, "train")
            val.save(tmp, "val")
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"train_lines": len(train.offsets) - 1, "val_lines": len(val.offsets) - 1,
                           "train_tokens": len(train.tokens), "val_tokens": len(val.tokens)}, f)
            os.replace(tmp, directory)
            log.info("tokenized %d train / %d val tokens into %s", len(train.tokens), len(val.tokens), directory)
        except OSError:
            if not os.path.isdir(directory):  # a concurrent writer may have won the rename
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            return self._setup_predict()
        if self.datasets:
            return
        tok = self.load_tokenizer()
        directory = self._data_dir()
        if not os.path.isdir(directory):
            self.prepare_data()
        h = self.hparams
        for split in ("train", "val"):
            ds = MLMDataset(TokenStream.load(directory, split), h.max_length, not h.line_by_line,
                            tok.cls_token_id, tok.sep_token_id, h.seed)
            check(
                len(ds) > 0,
                f"the {split} split is too small for one example of max_length {h.max_length}"
                f" ({len(ds.stream.tokens)} tokens); add text, lower --data.max_length or use --data.line_by_line",
            )
            self.datasets[split] = ds
        self.collator = MaskingCollator(tok, h.mlm_probability, h.mask_replace_prob, h.random_replace_prob)

    def _setup_predict(self) -> None:
        check(self.predict_paths is not None, "predict needs input: pass --data.predict_files FILE ([MASK] sentences)")
        mask = self.load_tokenizer().mask_token
        self.predict_lines = []
        for path in self.predict_paths:
            for lineno, line in enumerate(corpus.iter_texts([path], self.hparams.text_column), start=1):
                check("[MASK]" in line or mask in line, f"{path} line {lineno} has no [MASK]: {line[:60]!r}")
                self.predict_lines.append(line)

    # -- loaders --------------------------------------------------------------------------------------
    def _loader(self, split: str, train: bool) -> ResumableDataLoader:
        h = self.hparams
        ds = self.datasets[split]
        trainer = self.trainer
        world = trainer.world_size if trainer else 1
        check(
            len(ds) >= world or train,
            f"the {split} split has {len(ds)} examples, fewer than the {world} processes;"
            " add validation text (--data.val_fraction or --data.val_files)",
        )
        plan = BatchPlan(
            ds.lengths, h.batch_size, max_tokens=h.max_tokens if h.line_by_line else None,
            group_by_length=h.group_by_length and h.line_by_line, shuffle=train, seed=h.seed,
            num_replicas=trainer.world_size if trainer else 1, rank=trainer.global_rank if trainer else 0,
            epoch_key=None if train else -1,
        )
        progress = (lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed) if train and trainer else None
        # a private generator: creating a loader iterator must not draw from the global RNG (dropout's)
        return ResumableDataLoader(
            ds, plan, progress=progress, collate_fn=self.collator, num_workers=h.num_workers,
            generator=torch.Generator().manual_seed(h.seed), persistent_workers=h.num_workers > 0,
            pin_memory=bool(trainer and trainer.strategy.root_device.type == "cuda"),
        )

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
