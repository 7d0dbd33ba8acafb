"""Hugging Face datasets as corpora: a `save_to_disk` directory is read as files (its Arrow stream files, in
state.json's order), without `datasets` and without converting it; a dataset by name (`dataset_name`: a dataset
repository, or one in the `datasets` cache with the hub offline) is streamed through `datasets` into the same
token cache."""

import json
import shutil
import sys

import numpy as np
import pytest

from mlm_lightning.data import corpus
from mlm_lightning.data.cache import TokenStream
from mlm_lightning.data.module import MLMDataModule
from mlm_lightning.errors import MLMError
from tests.support.cli import TINY_DATA, TINY_MODEL, error_line, run_cli
from tests.support.runs import metric
from tests.support.text import save_to_disk, sentences


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


# -- a dataset by name (`--data.dataset_name`): streamed through `datasets` into the same cache as files ----------
README = """---
configs:
- config_name: en
  default: true
  data_files:
  - split: train
    path: en/train.parquet
  - split: validation
    path: en/validation.parquet
- config_name: fr
  data_files:
  - split: train
    path: fr/train-*.parquet
  - split: validation
    path: fr/validation.parquet
---
# A tiny corpus in two configurations
"""
TEXTS = {("en", "train"): sentences(300, seed=1), ("en", "validation"): sentences(40, seed=2),
         ("fr", "train"): [s.replace("the ", "le ") for s in sentences(300, seed=3)],
         ("fr", "validation"): [s.replace("the ", "le ") for s in sentences(40, seed=4)]}


def dataset_repo(directory, fr_train: list[str] | None = None):
    """A dataset repository as on the hub, in a local directory: a README whose YAML header lists two configs (the
    training split of fr in two files), each with a train and a validation split, in Parquet files with a text and a
    number column; `load_dataset(dir)` reads it as it reads a hub repository."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(path, texts):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), path)

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "README.md").write_text(README)
    write(directory / "en" / "train.parquet", TEXTS["en", "train"] + ["   ", None])  # (skipped, as in files)
    write(directory / "en" / "validation.parquet", TEXTS["en", "validation"])
    train = TEXTS["fr", "train"] if fr_train is None else fr_train
    write(directory / "fr" / "train-0.parquet", train[:150])
    write(directory / "fr" / "train-1.parquet", train[150:])
    write(directory / "fr" / "validation.parquet", TEXTS["fr", "validation"])
    return directory


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """`datasets` with its cache under tmp_path/hf and the hub offline (the paths and the switch as `datasets` read
    them from HF_HOME, HF_HUB_OFFLINE and HF_DATASETS_OFFLINE at import)."""
    datasets = pytest.importorskip("datasets")
    home = tmp_path / "hf"
    for name, value in (("HF_HOME", home), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")):
        monkeypatch.setenv(name, str(value))
    cache = home / "datasets"
    for name, value in (("HF_DATASETS_CACHE", cache), ("HF_MODULES_CACHE", home / "modules"),
                        ("DOWNLOADED_DATASETS_PATH", cache / "downloads"),
                        ("EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted"), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setattr(datasets.config, name, value)
    return home


def txt(path, texts: list[str]) -> str:
    path.write_text("\n".join(texts) + "\n")
    return str(path)


def assert_same_tokens(a: MLMDataModule, b: MLMDataModule) -> None:
    assert a._data_dir() != b._data_dir()
    for split in ("train", "val"):
        x, y = TokenStream.load(a._data_dir(), split), TokenStream.load(b._data_dir(), split)
        assert len(x.tokens) > 0 and np.array_equal(x.tokens, y.tokens) and np.array_equal(x.offsets, y.offsets)


def test_a_dataset_repository_by_name_tokenizes_as_its_files_would(hf_home, tmp_path):
    from mlm_lightning.data.tokenizer import tokenizer_fingerprint

    repo = str(dataset_repo(tmp_path / "tiny_corpus"))
    kw = dict(cache_dir=str(tmp_path / "cache"), vocab_size=200, max_length=32)
    fr = MLMDataModule(dataset_name=repo, dataset_config="fr", dataset_validation_split="validation", **kw)
    fr.prepare_data()  # (a vocabulary trained on the dataset's training split)
    same = MLMDataModule(train_files=txt(tmp_path / "fr.txt", TEXTS["fr", "train"]),
                         val_files=txt(tmp_path / "fr-val.txt", TEXTS["fr", "validation"]), **kw)
    same.prepare_data()
    assert tokenizer_fingerprint(fr.tokenizer) == tokenizer_fingerprint(same.tokenizer)
    assert_same_tokens(fr, same)
    # the default config, no validation split: the files' rule holds out a seeded val_fraction of the training split
    en = MLMDataModule(dataset_name=repo, tokenizer=fr._tokenizer_dir(), **kw)
    en.prepare_data()
    en.setup("fit")
    en_files = MLMDataModule(train_files=txt(tmp_path / "en.txt", TEXTS["en", "train"]),
                             tokenizer=fr._tokenizer_dir(), **kw)
    en_files.prepare_data()
    assert_same_tokens(en, en_files)


def test_the_same_dataset_is_not_tokenized_again_and_a_changed_one_is(hf_home, tmp_path, monkeypatch):
    from mlm_lightning.data import module

    repo = dataset_repo(tmp_path / "tiny_corpus")
    kw = dict(dataset_name=str(repo), dataset_config="fr", cache_dir=str(tmp_path / "cache"), vocab_size=200,
              max_length=32)
    first = MLMDataModule(**kw)
    first.prepare_data()
    vocabulary, data = first._tokenizer_dir(), first._data_dir()

    def refused(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as m:
        m.setattr(module, "build_cache", refused)
        m.setattr(module, "train_tokenizer", refused)
        again = MLMDataModule(**kw)  # (a second fit: a new module, the same dataset)
        again.prepare_data()
        again.setup("fit")
        assert again._data_dir() == data and len(again.datasets["train"]) > 0
        dataset_repo(repo, fr_train=TEXTS["fr", "train"] + ["le cat finds a new line ."])  # a changed dataset
        changed = MLMDataModule(tokenizer=vocabulary, **kw)
        assert changed._data_dir() != data
    changed.prepare_data()
    lines = {d: sum(len(TokenStream.load(d, s).offsets) - 1 for s in ("train", "val"))
             for d in (data, changed._data_dir())}
    assert lines[changed._data_dir()] == lines[data] + 1


def test_a_dataset_in_the_datasets_cache_with_the_hub_offline(hf_home, tmp_path, monkeypatch):
    import datasets

    # what a download leaves behind: the Arrow cache `load_dataset` prepares (here of a local repository named as
    # a hub dataset is: the cache knows it by that name), its source then gone
    repo = dataset_repo(tmp_path / "src" / "tiny_corpus")
    datasets.load_dataset(str(repo), "fr")
    assert list((hf_home / "datasets" / "tiny_corpus").glob("fr/*/*/*.arrow"))
    shutil.rmtree(repo)
    monkeypatch.chdir(tmp_path)
    kw = dict(cache_dir=str(tmp_path / "cache"), vocab_size=200, max_length=32)
    cached = MLMDataModule(dataset_name="tiny_corpus", dataset_config="fr", dataset_validation_split="validation",
                           **kw)
    cached.prepare_data()
    same = MLMDataModule(train_files=txt(tmp_path / "fr.txt", TEXTS["fr", "train"]),
                         val_files=txt(tmp_path / "fr-val.txt", TEXTS["fr", "validation"]),
                         tokenizer=cached._tokenizer_dir(), **kw)
    same.prepare_data()
    assert_same_tokens(cached, same)
    with pytest.raises(MLMError, match=r"^dataset 'tiny_corpus' \(config 'en'\): Couldn't find cache for tiny_corpus"
                                       r" for config 'en' Available configs in the cache: \['fr'\]; pass"
                                       r" MLMDataModule\(dataset_config='NAME'\)"):
        MLMDataModule(dataset_name="tiny_corpus", dataset_config="en", **kw).prepare_data()
    with pytest.raises(MLMError, match=r"^dataset 'someone/absent' cannot be read: the Hugging Face hub is not"
                                       r" reachable .* and the datasets cache has no copy; .*load it once with"
                                       r" datasets.load_dataset\('someone/absent'\)"):
        MLMDataModule(dataset_name="someone/absent", **kw).prepare_data()


@pytest.mark.parametrize("options, message", [
    (dict(dataset_config="de"), r"\(config 'de'\): BuilderConfig 'de' not found. Available: \['en', 'fr'\]; pass"
                                r" MLMDataModule\(dataset_config='NAME'\) of one of its configs$"),
    (dict(dataset_split="test"), r"\(config 'fr'\) has no split 'test' \(splits: train, validation\); pass"
                                 r" MLMDataModule\(dataset_split='NAME'\) of one of them$"),
    (dict(dataset_validation_split="valid"),
     r"has no split 'valid' .*MLMDataModule\(dataset_validation_split='NAME'\)"),
    (dict(text_column="body"), r"split 'train' has no 'body' column \(columns: \['text', 'n'\]\); pass"
                               r" MLMDataModule\(text_column='NAME'\)$"),
    (dict(text_column="n"), r"split 'train' column 'n' holds Value\('int64'\), not text"),
])
def test_dataset_mistakes_are_one_line(hf_home, tmp_path, options, message):
    repo = str(dataset_repo(tmp_path / "tiny_corpus"))
    kw = dict(dataset_name=repo, dataset_config="fr", cache_dir=str(tmp_path / "cache"), vocab_size=200) | options
    with pytest.raises(MLMError, match=message) as e:
        MLMDataModule(**kw).prepare_data()
    assert "\n" not in str(e.value)


def test_dataset_options_that_do_not_fit_together_and_a_missing_extra(tmp_path, monkeypatch):
    with pytest.raises(MLMError, match=r"give either MLMDataModule\(train_files=...\) or"
                                       r" MLMDataModule\(dataset_name=...\), not both"):
        MLMDataModule(train_files=txt(tmp_path / "a.txt", ["a line"]), dataset_name="x")
    with pytest.raises(MLMError, match=r"dataset_config=...\) names a part of a dataset: give"):
        MLMDataModule(dataset_config="en")
    with pytest.raises(MLMError, match=r"validation text is a split of the dataset"):
        MLMDataModule(dataset_name="x", val_files=txt(tmp_path / "v.txt", ["a line"]))
    monkeypatch.setitem(sys.modules, "datasets", None)  # (not installed)
    with pytest.raises(MLMError, match=r"^MLMDataModule\(dataset_name=...\) needs the datasets library: pip install"
                                       r" 'mlm-lightning\[datasets\]'$"):
        MLMDataModule(dataset_name="someone/corpus")


def test_fit_on_a_dataset_by_name_from_the_command_line(hf_home, tmp_path, capsys):
    repo = str(dataset_repo(tmp_path / "tiny_corpus"))
    root = tmp_path / "run"
    args = ["fit", "--data.dataset_name", repo, "--data.dataset_config", "fr", *TINY_MODEL, *TINY_DATA,
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar",
            "false", "--trainer.enable_model_summary", "false", "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2"]
    assert run_cli(*args, "--data.dataset_validation_split", "test") == 2
    assert "has no split 'test' (splits: train, validation); pass --data.dataset_validation_split NAME" in \
        error_line(capsys.readouterr().err)
    assert run_cli(*args, "--data.dataset_validation_split", "validation") == 0
    err = capsys.readouterr().err
    assert "offline demo" not in err  # (a dataset is the user's corpus: not the demo's recipe)
    assert metric(root, "val/ppl")
    (config,) = [p.read_text() for p in root.glob("lightning_logs/version_*/config.yaml")]
    assert f"dataset_name: {repo}" in config and "architecture: bert" in config
