"""Tokenizers: load one (local dir or hub id, offline-aware) or train one on the corpus (WordPiece or byte-level
BPE, with the special tokens of the model family it is for)."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

from mlm_lightning.data.seeds import uniform
from mlm_lightning.errors import check
from mlm_lightning.files import share_tree
from mlm_lightning.hub import load_pretrained

log = logging.getLogger("mlm_lightning")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SAMPLE_CHUNK_LINES = 1000


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    problem = tokenizer_dir_problem(name_or_path) if os.path.isdir(name_or_path) else None
    check(problem is None, f"tokenizer {name_or_path!r} is incomplete: it lacks {problem}; pass a directory with"
                           " its tokenizer files (mlm-lightning export writes them)")
    tokenizer = load_pretrained(AutoTokenizer, name_or_path, "tokenizer")
    validate_tokenizer(tokenizer, name_or_path)
    return drop_saved_padding(tokenizer, repr(name_or_path))


def drop_saved_padding(tokenizer, source: str):
    """The tokenizer without the padding and truncation its tokenizer.json may carry.

    A sentence-transformers tokenizer.json pads every text to a fixed length and cuts longer ones (MiniLM's: 128);
    the corpus encoder calls this backend directly, so every line would be filled up with [PAD] and long lines
    cut. `tokenizer(...)` (fill-mask, serve, pipelines) sets both per call, so nothing needs them kept."""
    backend = tokenizer.backend_tokenizer
    saved = [k for k in ("padding", "truncation") if getattr(backend, k) is not None]
    if saved:
        log.info("tokenizer %s: its saved %s dropped (lines are encoded whole, then packed)", source,
                 " and ".join(saved))
        backend.no_padding()
        backend.no_truncation()
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
    share_tree(tmp)  # (mkdtemp makes 0700: the cache's files get the umask's permissions)
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


class SampledTexts:
    """`sample_texts` as a collection that can be read more than once (training a WordPiece vocabulary reads its
    sample twice, see `train_tokenizer`). The first complete reading keeps the sample in a temporary file, not in
    memory, and later ones read it from there: the corpus itself (maybe large, maybe remote) is read once."""

    def __init__(self, reader, sample_mb: float, seed: int):
        self.reader, self.sample_mb, self.seed = reader, sample_mb, seed
        self._spool = None

    def __iter__(self) -> Iterator[str]:
        return self._first() if self._spool is None else self._again()

    def _first(self) -> Iterator[str]:
        spool = tempfile.TemporaryFile("w+", encoding="utf-8")  # (removed when closed or collected)
        for text in sample_texts(self.reader, self.sample_mb, self.seed):
            spool.write(json.dumps(text, ensure_ascii=False) + "\n")  # one line per text, whatever it holds
            yield text
        self._spool = spool

    def _again(self) -> Iterator[str]:
        self._spool.seek(0)
        for line in self._spool:
            yield json.loads(line)


# The tokenizers trained for a new model, each like its family's own (`model/arch.py` says which family takes which;
# the data path gets the name as plain data): (model, {role: special token} in id order, the transformers class
# that saves and loads it).
_BERT_MARKS = dict(zip(("pad", "unk", "cls", "sep", "mask"), SPECIAL_TOKENS, strict=True))
TOKENIZER_KINDS = {
    # WordPiece, [CLS] x [SEP], token_type_ids (BERT, ALBERT, ELECTRA)
    "bert": ("wordpiece", _BERT_MARKS, "BertTokenizer"),
    # the same without token_type_ids (DistilBERT's embeddings have none; its forward takes none)
    "distilbert": ("wordpiece", _BERT_MARKS, "DistilBertTokenizer"),
    # byte-level BPE, <s> x </s>, <mask> (RoBERTa's ids: <s> 0, <pad> 1, </s> 2, <unk> 3)
    "roberta": ("bpe", {"cls": "<s>", "pad": "<pad>", "sep": "</s>", "unk": "<unk>", "mask": "<mask>"},
                "RobertaTokenizer"),
    # byte-level BPE with BERT's marks in ModernBERT's order; no token_type_ids
    "modernbert": ("bpe", {"unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]"},
                   "TokenizersBackend"),
}


def train_tokenizer(kind: str, texts: Iterable[str], out_dir: str, vocab_size: int, model_max_length: int,
                    lowercase: bool = True):
    """Train a tokenizer of `kind` (see `TOKENIZER_KINDS`) with the `tokenizers` library and save it as a
    transformers dir.

    The same texts and settings give a byte-identical `tokenizer.json`, in any process and with any number of
    threads (see `_continuation_pieces`). Written to a temporary directory and renamed, so an interrupted training
    never leaves a half tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    check(kind in TOKENIZER_KINDS, f"tokenizer_kind must be one of {', '.join(TOKENIZER_KINDS)}, got {kind!r}")
    model, role, class_name = TOKENIZER_KINDS[kind]
    special = list(role.values())
    if model == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=role["unk"]))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        if iter(texts) is texts:  # a one-shot iterator: kept, as the trainer reads the texts twice
            texts = list(texts)
        pieces = _continuation_pieces(tok, texts, special)
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special + pieces,
                                            show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if model == "wordpiece":  # the pieces were special only to fix their ids: in the vocabulary they are plain
        saved = json.loads(tok.to_str())
        saved["added_tokens"] = [t for t in saved["added_tokens"] if t["content"] in special]
        tok = Tokenizer.from_str(json.dumps(saved))
    cls, sep = role["cls"], role["sep"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    # BPE's mask token takes the space before it ("a <mask> b" tokenizes as "a", <mask>, " b"), as RoBERTa's
    # and ModernBERT's do: the predicted token then brings its own space
    mask = AddedToken(role["mask"], lstrip=model == "bpe", rstrip=False, normalized=False, special=True)
    tok.add_special_tokens([mask])
    kwargs = {f"{r}_token": t for r, t in role.items() if r != "mask"}
    if kind == "roberta":
        kwargs.update(bos_token=cls, eos_token=sep)
    if model == "wordpiece":
        kwargs.update(do_lower_case=lowercase)
    if class_name == "TokenizersBackend":  # the generic class: say which inputs the model takes
        kwargs.update(model_input_names=["input_ids", "attention_mask"])
    import transformers

    tokenizer = getattr(transformers, class_name)(tokenizer_object=tok, model_max_length=model_max_length,
                                                 mask_token=mask, **kwargs)
    parent = os.path.dirname(out_dir) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}-")
    try:
        tokenizer.save_pretrained(tmp)
        share_tree(tmp)  # (mkdtemp makes 0700: the cache's files get the umask's permissions)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process (a DDP rank) finished first: keep theirs
            if not os.path.isdir(out_dir):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(out_dir)


def _continuation_pieces(tok, texts: Iterable[str], special: list[str]) -> list[str]:
    """The word-continuing pieces ("##e") of the texts' characters, sorted: the WordPiece trainer is given them
    first (as special tokens) so that their ids do not depend on the process.

    Why (tokenizers 0.2x, `BpeTrainer`, which `WordPieceTrainer` wraps): the trainer counts words in a Rust
    `HashMap`, randomly seeded in each process, and gives each "##x" piece its id in the order it meets them while
    iterating that map (`tokenize_words`); the plain characters get sorted ids (`compute_alphabet`). Merges are
    picked by count, and ties (common in a real corpus) by the pair's ids: so the ids, the merges and even the
    set of tokens changed from one process to the next (three calls, three `tokenizer.json`s; 242 tokens apart on
    one corpus), whatever RAYON_NUM_THREADS. Not the sample's order (the counts are the same) and not threads (the
    sums commute). Byte-level BPE has no such pieces (its alphabet is all 256 bytes, sorted): it is deterministic
    as it is. A first pass that stops before any merge (vocab_size: the special tokens) lists the pieces; given
    as special tokens they take fixed ids before the trainer walks its map, and the same pieces are in the
    vocabulary as without it."""
    from tokenizers import Tokenizer, trainers

    probe = Tokenizer.from_str(tok.to_str())  # (the same normalizer and pre-tokenizer)
    probe.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=len(special), special_tokens=special,
                                                               show_progress=False))
    return sorted(t for t in probe.get_vocab() if t.startswith("##"))


def train_wordpiece(texts: Iterable[str], out_dir: str, vocab_size: int, model_max_length: int, lowercase: bool = True):
    """Train a BERT WordPiece tokenizer (`train_tokenizer` of kind "bert")."""
    return train_tokenizer("bert", texts, out_dir, vocab_size, model_max_length, lowercase)


def tokenizer_length_limit(name_or_path: str) -> int | None:
    """The `model_max_length` a local tokenizer dir sets (an export of a model trained on shorter examples sets
    its training length), or None when it sets no real limit or is not a local dir."""
    try:
        with open(os.path.join(name_or_path, "tokenizer_config.json"), encoding="utf-8") as f:
            limit = json.load(f).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return None
    return int(limit) if isinstance(limit, (int, float)) and 0 < limit < 1e6 else None


# -- domain words added to a pretrained vocabulary (`--data.extend_vocab N`) --------------------------------------
EXTEND_MAX_DISTINCT = 500_000  # distinct words counted at most: beyond, the rarer half is dropped (bounded memory)
EXTEND_MIN_COUNT = 2  # a word seen once is no domain word
BYTE_SPACE = "Ġ"  # how byte-level BPE writes the space a word follows (its pre-tokenizer's words carry it)


def vocabulary_kind(tokenizer) -> str | None:
    """"wordpiece", "bpe" (byte-level BPE) or None (another model, e.g. a sentencepiece Unigram): the tokenizers
    whose vocabulary `extend_vocabulary` knows how to extend."""
    saved = json.loads(tokenizer.backend_tokenizer.to_str())
    model = saved.get("model", {}).get("type")
    if model == "WordPiece":
        return "wordpiece"
    if model == "BPE" and '"ByteLevel"' in json.dumps(saved.get("pre_tokenizer")):
        return "bpe"
    return None


def domain_words(tokenizer, texts: Iterable[str], n: int) -> list[str]:
    """The vocabulary entries to add for the `n` most frequent words of `texts` that `tokenizer` splits into at
    least 2 pieces, in that order (ties: by the word).

    A word is a word of the tokenizer's own pre-tokenizer, after its normalizer (BERT's: lowercased, split at
    spaces and punctuation), holding at least one letter and seen at least `EXTEND_MIN_COUNT` times. Byte-level
    BPE tells a word after a space ("Ġword", in the middle of a sentence) from the same word without one (at the
    start of a line, after a bracket), as its pretrained vocabulary does ("Ġthe", "the"): a word is counted in
    both forms together, qualifies when its spaced form splits, and each of its forms that splits is added (up to
    2 entries per word). Counting keeps at most `EXTEND_MAX_DISTINCT` distinct words: when more come, the rarer
    half is dropped (a word that is frequent overall stays; one seen only early and rarely may be lost)."""
    from collections import Counter

    backend, kind = tokenizer.backend_tokenizer, vocabulary_kind(tokenizer)
    check(kind is not None, "extend_vocab adds words to a WordPiece or byte-level BPE vocabulary; this tokenizer"
                            " is neither (a sentencepiece model?): leave --data.extend_vocab at 0")
    normalizer, pre = backend.normalizer, backend.pre_tokenizer
    counts: Counter[str] = Counter()
    for text in texts:
        text = normalizer.normalize_str(text) if normalizer is not None else text
        words = (w for w, _ in pre.pre_tokenize_str(text))
        counts.update(w.removeprefix(BYTE_SPACE) if kind == "bpe" else w for w in words)
        if len(counts) > EXTEND_MAX_DISTINCT:
            counts = Counter(dict(counts.most_common(EXTEND_MAX_DISTINCT // 2)))
    model = backend.model
    chosen: list[str] = []
    ranked = sorted((w for w, c in counts.items() if c >= EXTEND_MIN_COUNT and any(ch.isalpha() for ch in w)),
                    key=lambda w: (-counts[w], w))
    words = 0
    for word in ranked:
        if words == n:
            break
        forms = [BYTE_SPACE + word, word] if kind == "bpe" else [word]
        if len(model.tokenize(forms[0])) < 2:
            continue
        chosen += [f for f in forms if len(model.tokenize(f)) >= 2]
        words += 1
    if words < n:
        log.warning("--data.extend_vocab %d: only %d words of the corpus qualify (seen at least %d times and split"
                    " into pieces by the tokenizer); adding those", n, words, EXTEND_MIN_COUNT)
    return chosen


def extend_vocabulary(tokenizer, entries: list[str]):
    """`tokenizer` with `entries` (from `domain_words`) in its vocabulary, with ids after all of its own.

    They go into the model's vocabulary itself, not in as added tokens: the pre-tokenizer's word boundaries then
    hold exactly (an added token is matched in the raw text, so a byte-level "Ġword" one would also cut "Ġwords"
    into "Ġword" + "s", and `single_word` refuses it after any letter since the match starts at the space), and
    "Ġword" decodes with its space, as every other word of a byte-level vocabulary. WordPiece takes the longest
    vocabulary entry at a word's start, so the whole word wins (and "words" becomes "word" + "##s", as it
    would had the word been in the vocabulary all along). BPE builds words by merges, so it is told to take a word
    that is in its vocabulary as it is (`ignore_merges`, as Llama 3's tokenizer does). The result is the generic
    transformers class over this tokenizer.json: a family's own class (RobertaTokenizer) rebuilds its BPE from
    vocab and merges and drops `ignore_merges`."""
    from tokenizers import Tokenizer
    from transformers import TokenizersBackend

    saved = json.loads(tokenizer.backend_tokenizer.to_str())
    model = saved["model"]
    vocab = model["vocab"]
    next_id = max([*vocab.values(), *(t["id"] for t in saved.get("added_tokens", []))], default=-1) + 1
    for entry in entries:
        if entry not in vocab:
            vocab[entry], next_id = next_id, next_id + 1
    if model["type"] == "BPE":
        model["ignore_merges"] = True
    special = {f"{r}_token": getattr(tokenizer, f"{r}_token") for r in ("bos", "eos", "unk", "sep", "pad", "cls",
                                                                       "mask")}
    return TokenizersBackend(tokenizer_object=Tokenizer.from_str(json.dumps(saved)),
                             model_max_length=tokenizer.model_max_length,
                             model_input_names=list(tokenizer.model_input_names),
                             **{k: v for k, v in special.items() if v is not None})


def vocab_extension(base, extended) -> list[tuple[int, list[int]]]:
    """(id, ids of its pieces in `base`) of each entry `extended` has beyond `base`'s vocabulary: what the model
    starts the new rows from (the pieces the original tokenizer cut that very word into)."""
    own, model = base.get_vocab(), base.backend_tokenizer.model
    new = sorted((i, t) for t, i in extended.get_vocab().items() if t not in own)
    return [(i, [p.id for p in model.tokenize(t)]) for i, t in new]
