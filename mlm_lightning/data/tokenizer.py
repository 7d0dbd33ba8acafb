"""Tokenizers: load one (local dir or hub id, offline-aware) or train a WordPiece vocabulary on the corpus."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

from mlm_lightning.data.seeds import uniform
from mlm_lightning.errors import check
from mlm_lightning.hub import load_pretrained

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SAMPLE_CHUNK_LINES = 1000


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    problem = tokenizer_dir_problem(name_or_path) if os.path.isdir(name_or_path) else None
    check(problem is None, f"tokenizer {name_or_path!r} is incomplete: it lacks {problem}; pass a directory with"
                           " its tokenizer files (mlm-lightning export writes them)")
    tokenizer = load_pretrained(AutoTokenizer, name_or_path, "tokenizer")
    validate_tokenizer(tokenizer, name_or_path)
    return tokenizer


def tokenizer_dir_problem(path: str) -> str | None:
    """What a local tokenizer dir lacks, or None. Without its files transformers' AutoTokenizer falls back to a
    tokenizer made from config.json alone (BERT's: 5 special tokens, every word unknown)."""
    names = set(os.listdir(path))
    if names & {"tokenizer.json", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model"} or \
            {"vocab.json", "merges.txt"} <= names:
        return None
    return "its tokenizer files (tokenizer.json, or vocab.txt, vocab.json + merges.txt, or a sentencepiece model)"


def validate_tokenizer(tokenizer, source: str) -> None:
    check(tokenizer.is_fast, f"tokenizer {source!r} is not a fast tokenizer; use one with a tokenizer.json")
    check(
        tokenizer.mask_token is not None,
        f"tokenizer {source!r} has no mask token, so it cannot be used for masked-language modeling;"
        " use a BERT-style tokenizer (with [MASK]) or train one (leave --data.tokenizer unset)",
    )
    check(tokenizer.pad_token is not None, f"tokenizer {source!r} has no pad token; set one in its special tokens")


# the files a tokenizer is saved as in checkpoints and given to other processes: the only names ever taken
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The tokenizer's saved files as strings (small; stored in checkpoints, sent to other processes)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        out = {}
        for name in TOKENIZER_FILES:
            try:
                with open(os.path.join(tmp, name), encoding="utf-8") as f:
                    out[name] = f.read()
            except FileNotFoundError:
                pass
        return out


def save_tokenizer_files(files: dict[str, str], out_dir: str) -> str:
    """Write `files` (from `tokenizer_files`) as `out_dir`, atomically; if it exists already, leave it.

    Returns the directory that holds these files: `out_dir`, or a temporary one (the caller's to remove)
    when `out_dir` exists with other contents."""
    check(set(files) <= set(TOKENIZER_FILES), f"unexpected tokenizer files {sorted(files)}")
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=os.path.dirname(out_dir) or ".")
    for name, text in files.items():
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
            f.write(text)
    try:
        os.rename(tmp, out_dir)  # fails if out_dir exists (another process of this node was first)
        return out_dir
    except OSError:
        return tmp


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def sample_texts(reader, sample_mb: float, seed: int) -> Iterator[str]:
    """A seeded sample of about `sample_mb` MB of a `corpus.CorpusReader`'s texts (all of them when smaller).

    Chunks of 1,000 consecutive lines are kept with probability sample size / corpus size, decided by a hash
    of (seed, chunk index): the same corpus and seed give the same sample, spread over the whole corpus.
    The whole corpus is still read (decompressing is cheap next to training), but only the sample is kept.
    """
    cap = sample_mb * 2**20
    if reader.total_bytes <= cap:
        yield from reader
        return
    p = cap / reader.total_bytes
    taken, it = 0, iter(reader)
    for chunk_index in itertools.count():
        chunk = list(itertools.islice(it, SAMPLE_CHUNK_LINES))
        if not chunk or taken >= cap:
            return
        if uniform(seed, chunk_index) < p:
            taken += sum(map(len, chunk))
            yield from chunk


def train_wordpiece(texts: Iterable[str], out_dir: str, vocab_size: int, model_max_length: int, lowercase: bool = True):
    """Train a BERT WordPiece tokenizer with the `tokenizers` library and save it as a transformers dir.

    Written to a temporary directory and renamed, so an interrupted training never leaves a half tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizer

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer = BertTokenizer(tokenizer_object=tok, model_max_length=model_max_length, do_lower_case=lowercase)
    parent = os.path.dirname(out_dir) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}-")
    try:
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process (a DDP rank) finished first: keep theirs
            if not os.path.isdir(out_dir):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(out_dir)
