"""Training a tokenizer is repeatable: the same texts and settings give a byte-identical tokenizer.json
in any process, with any number of threads."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from mlm_lightning.data.tokenizer import SampledTexts, train_tokenizer
from tests.support import ROOT
from tests.support.text import sentences

# sentences(600) has merges of equal counts: a WordPiece trainer that breaks their ties by ids given in a randomly
# seeded HashMap's order gives another tokenizer.json on every call
TRAIN = """
import hashlib, sys
from mlm_lightning.data.tokenizer import SampledTexts, train_tokenizer
from tests.support.text import sentences
for kind in ("bert", "roberta"):
    out = f"{sys.argv[1]}/{kind}"
    train_tokenizer(kind, sentences(600), out, 300, 64)
    print(kind, hashlib.sha256(open(f"{out}/tokenizer.json", "rb").read()).hexdigest())
"""


@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_the_same_texts_give_the_same_tokenizer_in_every_process_and_thread_count(tmp_path):
    runs = []
    for i, threads in enumerate(["1", "2", None]):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAYON_NUM_THREADS": threads or ""}
        if threads is None:
            del env["RAYON_NUM_THREADS"]
        out = subprocess.run([sys.executable, "-c", TRAIN, str(tmp_path / str(i))], env=env, capture_output=True,
                             text=True, check=True).stdout
        runs.append(dict(line.split() for line in out.splitlines() if line.startswith(("bert ", "roberta "))))
    assert len(runs[0]) == 2 and runs[0] == runs[1] == runs[2]
    # here too, from a one-shot iterator (kept in memory: WordPiece training reads its texts twice)
    tok = train_tokenizer("bert", iter(sentences(600)), str(tmp_path / "here"), 300, 64)
    assert hashlib.sha256((tmp_path / "here" / "tokenizer.json").read_bytes()).hexdigest() == runs[0]["bert"]
    # the pieces fixed as special tokens during training are plain tokens of the vocabulary
    assert set(tok.all_special_tokens) == {"[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]"}
    assert [t["content"] for t in json.loads(tok.backend_tokenizer.to_str())["added_tokens"]] == [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.tokenize("neighbour") == ["neighbour"] and tok.decode(tok("a neighbour")["input_ids"],
                                                                      skip_special_tokens=True) == "a neighbour"


def test_training_on_a_sample_reads_the_corpus_once(tmp_path):
    """The WordPiece trainer reads its sample twice: the second time from a temporary file, not the corpus (which
    may be large and remote)."""

    class Reader:
        total_bytes, reads = 20_000, 0

        def __iter__(self):
            Reader.reads += 1
            return iter(sentences(600))

    texts = SampledTexts(Reader(), sample_mb=100, seed=0)
    tok = train_tokenizer("bert", texts, str(tmp_path / "t"), 300, 64)
    assert Reader.reads == 1 and list(texts) == sentences(600)
    assert tok.tokenize("the neighbour") == ["the", "neighbour"]
