"""Reading, splitting, tokenizing, caching, packing and batching."""

import os

import numpy as np
import pytest

from mlm_lightning.data import MLMDataModule
from mlm_lightning.data import module as data_module
from mlm_lightning.errors import MLMError
from tests.support.text import sentences


def make(train, tmp_path, **kw):
    kw.setdefault("vocab_size", 200)
    kw.setdefault("max_length", 32)
    dm = MLMDataModule(train_files=train, cache_dir=str(tmp_path / "cache"), **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def texts_of(dm, split):
    ds = dm.datasets[split]
    return [dm.tokenizer.decode(ds[i]["input_ids"], skip_special_tokens=True) for i in range(len(ds))]


def test_txt_jsonl_csv_dirs_globs_and_blank_lines(write, tmp_path):
    lines = sentences(40)
    write("d/a.txt", lines[:20] + ["", "   "])
    write("d/sub/b.jsonl", lines[20:30])
    write("d/sub/c.csv", lines[30:])
    write("d/notes.bin", ["ignored"])
    for spec in (str(tmp_path / "d"), str(tmp_path / "d/**/*.*"), [str(tmp_path / "d/a.txt"), str(tmp_path / "d/sub")]):
        dm = make(spec, tmp_path, line_by_line=True, val_fraction=0.1)
        got = sorted(texts_of(dm, "train") + texts_of(dm, "val"))
        assert len(got) == 40  # blank lines skipped, .bin not read
        assert got == sorted(t.replace(" .", ".") for t in lines)  # decode() joins the period


def test_val_split_is_deterministic_and_seeded(corpus, tmp_path):
    a = texts_of(make(corpus, tmp_path, line_by_line=True), "val")
    b = texts_of(make(corpus, tmp_path / "other", line_by_line=True), "val")
    c = texts_of(make(corpus, tmp_path, line_by_line=True, seed=7), "val")
    assert a == b and a != c
    assert len(a) == round(600 * 0.05)


def test_val_files(write, tmp_path):
    dm = make(write("t.txt", sentences(50)), tmp_path, val_files=write("v.txt", ["the cat likes the river ."]),
              line_by_line=True)
    assert texts_of(dm, "val") == ["the cat likes the river."]
    assert len(dm.datasets["train"]) == 50


def test_packed_blocks_have_no_padding(corpus, tmp_path):
    dm = make(corpus, tmp_path, max_length=24)
    ds = dm.datasets["train"]
    assert len(ds) > 10
    for i in range(len(ds)):
        ids = ds[i]["input_ids"]
        assert len(ids) == 24 and ids[0] == dm.tokenizer.cls_token_id
        assert dm.tokenizer.pad_token_id not in ids
    batch = next(iter(dm.train_dataloader()))
    assert "attention_mask" not in batch and batch["num_real_tokens"] == batch["num_tokens"]


def test_line_by_line_truncates(write, tmp_path):
    dm = make(write("t.txt", sentences(40) + [" ".join(sentences(30))]), tmp_path, line_by_line=True, max_length=16,
              val_fraction=0.05)
    lengths = [len(dm.datasets["train"][i]["input_ids"]) for i in range(len(dm.datasets["train"]))]
    assert max(lengths) == 16 and min(lengths) < 16
    assert all(dm.datasets["train"][i]["input_ids"][-1] == dm.tokenizer.sep_token_id for i in range(10))


def test_second_setup_hits_the_cache(corpus, tmp_path, monkeypatch):
    first = make(corpus, tmp_path)

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_module, "build_cache", boom)
    monkeypatch.setattr(data_module, "train_tokenizer", boom)
    second = make(corpus, tmp_path)
    assert np.array_equal(first.datasets["train"][3]["input_ids"], second.datasets["train"][3]["input_ids"])
    assert isinstance(second.datasets["train"].stream.tokens, np.memmap)


def test_changed_corpus_is_tokenized_again(write, tmp_path):
    path = write("t.txt", sentences(100))
    n1 = len(make(path, tmp_path, line_by_line=True).datasets["train"])
    with open(path, "a") as f:
        f.write("\n".join(sentences(100, seed=5)) + "\n")
    os.utime(path, ns=(1, 1))
    assert len(make(path, tmp_path, line_by_line=True).datasets["train"]) > n1


@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_default_corpus_offline(tmp_path):
    dm = MLMDataModule(cache_dir=str(tmp_path / "cache"), vocab_size=500)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) > 100 and len(dm.tokenizer) == 500


@pytest.mark.parametrize(
    "files, kwargs, message",
    [
        ("missing.txt", {}, "does not exist"),
        ("empty.txt", {}, "is empty"),
        ("blank.txt", {}, "only blank lines"),
        ("nodir", {}, "has no .txt/.jsonl/.csv file"),
        ("*.nomatch", {}, "matches no"),
        ("latin1.txt", {}, "is not UTF-8 (line 2, byte"),
        ("binary.txt", {}, "is not a text file"),
        ("nocol.jsonl", {}, "has no 'text' field"),
        ("badjson.jsonl", {}, "line 2 is not valid JSON"),
        ("nocol.csv", {}, "has no 'text' column"),
        ("ok.txt", {"mlm_probability": 1.5}, "mlm_probability must be in (0, 1)"),
        ("ok.txt", {"mask_replace_prob": 0.8, "random_replace_prob": 0.3}, "must be at most 1"),
        ("ok.txt", {"batch_size": 0}, "batch_size must be positive"),
        ("ok.txt", {"max_length": 0}, "max_length must be at least 3"),
        ("ok.txt", {"val_fraction": 0.0}, "no validation data"),
        ("tiny.txt", {}, "too few for a 0.05 validation split"),
        ("ok.txt", {"max_length": 128, "val_fraction": 0.01}, "the val split is too small"),
    ],
)
def test_bad_input_messages(tmp_path, files, kwargs, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "nodir").mkdir()
    (tmp_path / "nodir" / "x.bin").write_bytes(b"1")
    (tmp_path / "latin1.txt").write_bytes("fine\ncaf\xe9 au lait\n".encode("latin1"))
    (tmp_path / "binary.txt").write_bytes(b"ok\n\x00\x01\x02")
    (tmp_path / "nocol.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "badjson.jsonl").write_text('{"text": "x"}\n{oops\n')
    (tmp_path / "nocol.csv").write_text("id,body\n1,x\n")
    (tmp_path / "ok.txt").write_text("\n".join(sentences(60)) + "\n")
    (tmp_path / "tiny.txt").write_text("one line only\n")
    with pytest.raises(MLMError) as e:
        make(str(tmp_path / files), tmp_path, **kwargs)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask_replace_prob": -0.1}, "mask_replace_prob + random_replace_prob must be at most 1"),
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"max_length": 2}, "max_length must be at least 3"),
        ({"max_tokens": 16, "max_length": 32}, "max_tokens must be >= max_length"),
        ({"val_fraction": 1.0}, "val_fraction must be in [0, 1)"),
        ({"num_workers": -1}, "num_workers must be >= 0"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of must be >= 1"),
        ({"val_max_lines": 0}, "val_max_lines must be at least 1"),
        ({"tokenizer_kind": "morse"}, "tokenizer_kind must be one of"),
        ({"tokenizer_sample_mb": 0}, "tokenizer_sample_mb must be positive"),
        ({"epoch_tokens": 0}, "epoch_tokens must be positive"),
        ({"batch_size": 0, "max_length": 2}, "batch_size must be positive"),  # the checks' order
    ],
)
def test_each_option_is_checked_before_any_file_is_read(tmp_path, kwargs, message):
    with pytest.raises(MLMError) as e:
        MLMDataModule(train_files=str(tmp_path / "missing.txt"), cache_dir=str(tmp_path / "cache"), **kwargs)
    assert message in str(e.value)


def test_a_huge_line_is_split_not_fatal(write, tmp_path):
    from mlm_lightning.data.corpus import MAX_CHARS_PER_EXAMPLE

    huge = " ".join(sentences(12_000))  # ~330k characters on one line
    assert len(huge) > 3 * MAX_CHARS_PER_EXAMPLE
    dm = make(write("t.txt", sentences(60) + [huge]), tmp_path, line_by_line=True)
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) >= 60 + 3
