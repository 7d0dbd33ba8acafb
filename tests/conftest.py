import csv
import json
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# a tiny BERT that trains in seconds on 2 CPU cores; with dropout, so exact-resume tests cover its RNG
TINY_MODEL = [
    "--model.hidden_size", "32", "--model.num_hidden_layers", "2", "--model.num_attention_heads", "2",
    "--model.intermediate_size", "64", "--model.max_position_embeddings", "64", "--model.dropout", "0.1",
]
TINY_DATA = ["--data.max_length", "32", "--data.batch_size", "8", "--data.vocab_size", "300"]

SUBJECTS = ["the cat", "the dog", "a bird", "my friend", "the teacher", "our neighbour"]
VERBS = ["sees", "likes", "finds", "follows", "helps", "calls"]
OBJECTS = ["the ball", "a tree", "the river", "a small house", "the old car", "the red door"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} ." for _ in range(n)]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tokenizers and tokenized corpora go to a per-session cache, never the user's."""
    os.environ["MLM_LIGHTNING_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("\n".join(sentences(600)) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def write(tmp_path):
    """write(name, lines) -> path; .jsonl/.csv get a `text` field."""

    def _write(name: str, lines: list[str], column: str = "text") -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".jsonl"):
            path.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(lines)))
        elif name.endswith(".csv"):
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", column])
                w.writerows([i, t] for i, t in enumerate(lines))
        else:
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return str(path)

    return _write


def run_cli(*args: str) -> int:
    """Run `mlm-lightning ARGS` in this process; returns the exit code."""
    from mlm_lightning.cli import main

    try:
        main(list(args))
    except SystemExit as e:
        return 0 if e.code is None else int(e.code)
    return 0


# a tiny BERT module and tokenizer for unit tests of the LightningModule (test modules may override `tokenizer`)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, dropout=0.0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mlm_lightning.data.tokenizer import train_wordpiece

    return train_wordpiece(sentences(300), str(tmp_path_factory.mktemp("tok") / "wp"), 200, 64)


def module(tokenizer, **kw):
    import torch

    from mlm_lightning.model import MLMModule

    torch.manual_seed(0)
    m = MLMModule(**{**TINY, **kw})
    m.tokenizer = tokenizer
    m.configure_model()
    return m
