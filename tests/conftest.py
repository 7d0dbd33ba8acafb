"""Fixtures only (tests share code through the modules of tests/support/)."""

import csv
import json
import os

import pytest

# before transformers is imported (through tests.support): it reads them once
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.support.text import sentences  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tokenizers and tokenized corpora go to a per-session cache, never the user's."""
    os.environ["MLM_LIGHTNING_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("\n".join(sentences(600)) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """The directory of a finished 4-step fit of the tiny model on `corpus` (validated every 2 steps): its
    `checkpoints/last.ckpt` for the commands that read one."""
    from tests.support.cli import fit_args, run_cli

    root = tmp_path_factory.mktemp("run")
    assert run_cli(*fit_args(corpus, root, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2")) == 0
    return root


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


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mlm_lightning.data.tokenizer import train_wordpiece

    return train_wordpiece(sentences(300), str(tmp_path_factory.mktemp("tok") / "wp"), 200, 64)
