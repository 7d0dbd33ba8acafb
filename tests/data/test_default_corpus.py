"""The offline default corpus: the language reference plus the standard library's docstrings, split by module,
cached once per CPython; the fallback for a stripped Python and the refusal without pydoc_data."""

import logging
import os
import sys

import pytest

from mlm_lightning.data import MLMDataModule, offline
from mlm_lightning.errors import MLMError
from tests.support.cli import TINY_MODEL, error_line, run_cli
from tests.support.runs import metric

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# a sentence of a standard-library docstring (shutil.copyfileobj's), not of the language reference
DOCSTRING = "copy data from file-like object fsrc to file-like object fdst"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("offline-cache"))


def lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_corpus_has_reference_and_docstrings_and_a_disjoint_held_out_split(cache):
    train, val = offline.default_corpus_files(cache)
    t, v = lines(train), lines(val)
    assert len(t) > 5000 and len(v) > 100  # the reference alone has ~650 lines
    assert any(DOCSTRING in x.lower() for x in t + v)
    assert any("break may only occur syntactically nested" in x for x in t + v)  # the reference
    assert not set(t) & set(v)
    assert not [x for x in t + v if x.lstrip().startswith((">>>", "..."))]
    assert not [x for x in t + v if len(x) < offline.MIN_CHARS]
    mtime = os.stat(train).st_mtime_ns
    assert offline.default_corpus_files(cache) == (train, val) and os.stat(train).st_mtime_ns == mtime  # cached
    assert not [f for f in os.listdir(os.path.dirname(train)) if f.endswith(".tmp")]


def test_cleaning_drops_doctests_signatures_tables_and_short_lines():
    doc = """sorted(iterable, /, *, key=None) -> list

    Return a new list containing all items from the iterable in ascending order.

    >>> sorted([3, 1])
    [1, 3]

    Short one.

    -k, --key   the key function
    """
    assert list(offline._paragraphs(doc)) == [
        "Return a new list containing all items from the iterable in ascending order."]


def test_split_is_by_whole_unit_and_deterministic():
    units = [(f"mod{i}.py", [f"line {i} {j} " * 5 for j in range(3)]) for i in range(200)]
    train, val = offline.split_lines(units)
    assert (train, val) == offline.split_lines(list(units))
    held = {n for n, _ in units if offline.is_val_unit(n)}
    assert 0 < len(held) < 30
    assert val == [p for n, ps in units if n in held for p in ps]


def test_data_module_default_validates_on_the_held_out_file(cache):
    dm = MLMDataModule(cache_dir=cache, vocab_size=600)
    dm.prepare_data()
    assert dm.val_paths == [offline.default_corpus_files(cache)[1]]
    dm.setup("fit")
    assert len(dm.datasets["val"]) > 10 and len(dm.datasets["train"]) > 10 * len(dm.datasets["val"])


def test_default_config_parses_and_trains_a_few_steps(cache, tmp_path):
    code = run_cli("fit", "--config", os.path.join(ROOT, "configs", "default.yaml"), *TINY_MODEL,
                   "--data.vocab_size", "600", "--data.max_length", "32", "--data.cache_dir", cache,
                   "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
                   "--trainer.accelerator", "cpu",
                   "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false")
    assert code == 0
    assert len(metric(tmp_path, "val/ppl")) >= 1 and os.path.isdir(tmp_path / "export")


def test_stripped_python_falls_back_to_the_reference_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(offline, "stdlib_dir", lambda: None)
    with caplog.at_level(logging.WARNING, logger="mlm_lightning"):
        train, val = offline.default_corpus_files(str(tmp_path))
    assert [r for r in caplog.records if "language reference alone" in r.getMessage()]
    t = lines(train)
    assert 300 < len(t) < 2000 and lines(val)
    assert not any(DOCSTRING in x.lower() for x in t)


def test_no_pydoc_data_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(offline, "stdlib_dir", lambda: None)
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # `from pydoc_data.topics import` now fails
    with pytest.raises(MLMError, match="no pydoc_data"):
        offline.default_corpus_files(str(tmp_path))
    code = run_cli("fit", "--data.cache_dir", str(tmp_path), "--trainer.max_steps", "1",
                   "--trainer.default_root_dir", str(tmp_path / "run"))
    assert code == 2
    assert "--data.train_files" in error_line(capsys.readouterr().err)


def test_demo_sentences_are_held_out_lines_with_one_common_word_masked(cache):
    train, val = offline.default_corpus_files(cache)
    got = offline.demo_sentences(cache, 4)
    assert len(got) == 4 and got == offline.demo_sentences(cache, 4)
    held, trained = lines(val), set(lines(train))
    for s in got:
        assert s.count("[MASK]") == 1
        source = next(x for x in held if len(x.split()) == len(s.split()) and all(
            a == b or b == "[MASK]" for a, b in zip(x.split(), s.split(), strict=True)))
        assert source not in trained
