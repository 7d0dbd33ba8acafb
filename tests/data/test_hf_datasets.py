"""A Hugging Face `datasets` save_to_disk directory is read as a corpus (its Arrow stream files, in state.json's
order), without `datasets` and without converting it."""

import json

import numpy as np
import pytest

from mlm_lightning.data import corpus
from mlm_lightning.data.cache import TokenStream
from mlm_lightning.data.module import MLMDataModule
from mlm_lightning.errors import MLMError
from tests.helpers import save_to_disk, sentences


def test_save_to_disk_dir_as_train_files(tmp_path):
    texts = sentences(300)
    save_to_disk(tmp_path / "ds", texts)
    (tmp_path / "ds" / "cache-stray.arrow").write_bytes(b"not listed in state.json: not read")
    files = corpus.resolve_files(str(tmp_path / "ds"))
    assert [f.rsplit("/", 1)[1] for f in files] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert list(corpus.iter_texts(files)) == texts  # every row, in order; no json file read as a corpus
    (tmp_path / "same.txt").write_text("\n".join(texts) + "\n")
    kw = dict(cache_dir=str(tmp_path / "cache"), vocab_size=200, max_length=32)
    dm = MLMDataModule(train_files=str(tmp_path / "ds"), **kw)
    dm.prepare_data()
    dm.setup("fit")
    txt = MLMDataModule(train_files=str(tmp_path / "same.txt"), tokenizer=dm._tokenizer_dir(), **kw)
    txt.prepare_data()
    for split in ("train", "val"):
        assert np.array_equal(TokenStream.load(dm._data_dir(), split).tokens,
                              TokenStream.load(txt._data_dir(), split).tokens)


def test_a_dataset_inside_a_corpus_directory(tmp_path):
    save_to_disk(tmp_path / "d" / "ds", sentences(30))
    (tmp_path / "d" / "more.txt").write_text("one more line\n")
    texts = list(corpus.iter_texts(corpus.resolve_files(str(tmp_path / "d"))))
    assert texts == sentences(30) + ["one more line"]  # its state.json/dataset_info.json are not read as jsonl


def test_dataset_dict_and_bad_columns_are_one_line(tmp_path):
    save_to_disk(tmp_path / "dd" / "train", sentences(20))
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(MLMError, match=r"is a datasets DatasetDict with splits \['train', 'test'\]; point at one"
                                       r" split: .*dd/train"):
        corpus.resolve_files(str(tmp_path / "dd"))
    files = corpus.resolve_files(str(tmp_path / "dd" / "train"))
    with pytest.raises(MLMError, match=r"data-00000-of-00002.arrow has no 'body' column \(columns: \['id', 'text'\]\)"):
        list(corpus.iter_texts(files, "body"))
    with pytest.raises(MLMError, match=r"column 'id' holds int64, not text"):
        list(corpus.iter_texts(files, "id"))
    (tmp_path / "bad.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(MLMError, match=r"bad.arrow is not an Arrow stream file"):
        list(corpus.iter_texts([str(tmp_path / "bad.arrow")]))


def test_a_real_save_to_disk_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = sentences(50)
    datasets.Dataset.from_dict({"text": texts, "n": list(range(50))}).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    assert list(corpus.iter_texts(corpus.resolve_files(str(tmp_path / "ds")))) == texts
