"""The model card every export writes: hub metadata read back by huggingface_hub, no local path, secrets masked,
a user's README.md never replaced."""

import json
import os

import pytest
from huggingface_hub import ModelCard

from mlm_lightning.card import masked_command, render
from mlm_lightning.errors import MLMError
from mlm_lightning.export import save_hf
from tests.support.cli import error_line, fit_args, run_cli
from tests.support.models import module
from tests.support.text import sentences

SECRET = "S3CR3T-value"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny fit whose command line holds a secret storage option and a license; its corpus in a private dir."""
    tmp = tmp_path_factory.mktemp("card-fit")
    corpus = tmp / "private-dir" / "notes.txt"
    corpus.parent.mkdir()
    corpus.write_text("\n".join(sentences(400)) + "\n", encoding="utf-8")
    root = tmp / "run"
    options = json.dumps({"key": SECRET, "client_kwargs": {"session_token": SECRET}})
    code = run_cli(*fit_args(str(corpus), root, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                             "--data.storage_options", options, "--export.license", "mit"))
    assert code == 0
    return tmp, root


def test_a_fit_exports_a_card_the_hub_reads(fitted):
    tmp, root = fitted
    path = root / "export" / "README.md"
    card = ModelCard.load(path)
    assert card.data.pipeline_tag == "fill-mask" and card.data.library_name == "transformers"
    assert card.data.license == "mit"
    assert set(card.data.tags) >= {"mlm-lightning", "fill-mask", "bert"}
    assert card.data.base_model is None  # trained from scratch
    text = path.read_text(encoding="utf-8")
    assert "notes.txt" in text and "Optimizer steps: 4" in text and "val/ppl" in text and "val/acc" in text
    assert "Tokens seen" in text and 'pipeline("fill-mask"' in text and "[MASK]" in text
    assert str(tmp) not in text and "private-dir" not in text  # the corpus by name only
    assert SECRET not in text and '"key": "***"' in text  # the command line, masked


def test_the_export_command_writes_a_card_with_the_license(fitted, tmp_path):
    _, root = fitted
    out = tmp_path / "exported"
    code = run_cli("export", "--ckpt_path", str(root / "checkpoints" / "last.ckpt"), "--export_dir", str(out),
                   "--license", "apache-2.0")
    assert code == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "fill-mask"
    text = (out / "README.md").read_text(encoding="utf-8")
    assert "Optimizer steps: 4" in text and "notes.txt" in text
    assert str(tmp_path) not in text and str(root) not in text and "--license apache-2.0" in text


def test_base_model_is_a_hub_id_never_a_local_path(tokenizer, tmp_path):
    model = module(tokenizer).model
    hub = ModelCard(render(model, tokenizer, {"model_options": {"model_name_or_path": "google-bert/bert-base-cased"},
                                              "data_options": {"train_files": ["s3://bucket/corpus/web.txt"]}}))
    assert hub.data.base_model == "google-bert/bert-base-cased"
    assert hub.data.pipeline_tag == "fill-mask" and hub.data.library_name == "transformers"
    local = tmp_path / "models" / "my-bert"
    local.mkdir(parents=True)
    text = render(model, tokenizer, {"model_options": {"model_name_or_path": str(local)}})
    assert ModelCard(text).data.base_model is None
    assert str(tmp_path) not in text and "my-bert" in text  # the directory's name only


def test_the_command_line_is_masked_and_has_no_local_paths():
    line = masked_command([
        "fit", "--data.storage_options", '{"key": "AK1", "secret": "SK1", "endpoint_url": "http://h:9000"}',
        "--trainer.logger.init_args.api_key", "K2", "--hub.token=T3", "--data.train_files", "/home/ann/data/c.txt",
        "--data.val_files=s3://AK4:SK4@bucket/v.txt", "--model.model_name_or_path", "org/model"])
    for secret in ("AK1", "SK1", "K2", "T3", "AK4", "SK4", "/home/ann"):
        assert secret not in line, (secret, line)
    assert "c.txt" in line and "org/model" in line and "http://h:9000" in line


def test_a_users_readme_is_never_replaced(tokenizer, tmp_path):
    model = module(tokenizer).model
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my own notes\n")
    with pytest.raises(MLMError, match="README.md"):
        save_hf(model, tokenizer, str(mine))
    assert (mine / "README.md").read_text() == "my own notes\n" and os.listdir(mine) == ["README.md"]
    out = str(tmp_path / "export")
    save_hf(model, tokenizer, out)
    save_hf(model, tokenizer, out)  # its own card: replaced with the export
    with open(os.path.join(out, "README.md"), "a") as f:
        f.write("\nEdited by hand.\n")  # an edited card is the user's now
    with pytest.raises(MLMError, match="README.md"):
        save_hf(model, tokenizer, out)
    assert (tmp_path / "export" / "README.md").read_text().endswith("Edited by hand.\n")


def test_an_edited_card_refuses_the_cli_export_in_one_line(fitted, tmp_path, capsys):
    _, root = fitted
    out = tmp_path / "exported"
    ckpt = str(root / "checkpoints" / "last.ckpt")
    assert run_cli("export", "--ckpt_path", ckpt, "--export_dir", str(out)) == 0
    (out / "README.md").write_text("# mine\n")
    capsys.readouterr()
    assert run_cli("export", "--ckpt_path", ckpt, "--export_dir", str(out)) != 0
    assert "README.md" in error_line(capsys.readouterr().err)
    assert (out / "README.md").read_text() == "# mine\n"
