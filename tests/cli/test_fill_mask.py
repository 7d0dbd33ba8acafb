"""Fill-mask: our command vs transformers' pipeline, several masks, bad input, a model that learned."""

import json

import pytest
from transformers import pipeline

from mlm_lightning.errors import MLMError
from mlm_lightning.model.checkpoint import load_model
from mlm_lightning.model.fill_mask import FillMasker
from tests.support.cli import TINY_DATA, TINY_MODEL, error_line, run_cli
from tests.support.models import tiny_model
from tests.support.text import sentences


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny BERT exported in Hugging Face format."""
    return tiny_model(tmp_path_factory.mktemp("fm"))


def test_matches_transformers_pipeline(exported, capsys):
    sentence = "the cat [MASK] the river ."
    expected = pipeline("fill-mask", model=exported, top_k=5)(sentence)
    assert run_cli("fill-mask", "--model", exported, "--json", "--top_k", "5", sentence) == 0
    ours = json.loads(capsys.readouterr().out)["predictions"][0]
    assert [p["token"] for p in ours] == [p["token"] for p in expected]
    for a, b in zip(ours, expected, strict=True):
        assert abs(a["score"] - b["score"]) < 1e-5
        assert a["token_str"] == b["token_str"] and a["sequence"] == b["sequence"]


def test_several_masks_and_joint_mode(exported):
    import torch

    model, tokenizer = load_model(exported)
    with torch.no_grad():  # a random tiny BERT barely mixes its positions: sharper weights make context matter
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(5.0)
    masker = FillMasker(model, tokenizer, top_k=3)
    [independent] = masker(["the [MASK] likes [MASK] river ."])
    assert len(independent["predictions"]) == 2 and all(len(p) == 3 for p in independent["predictions"])
    [joint] = masker(["the [MASK] likes [MASK] river ."], joint=True)
    # the first mask sees the same input either way (scores to float precision: other matmul shapes)
    first_joint, first_independent = joint["predictions"][0], independent["predictions"][0]
    assert [p["token"] for p in first_joint] == [p["token"] for p in first_independent]
    assert all(abs(a["score"] - b["score"]) < 1e-6 for a, b in zip(first_joint, first_independent, strict=True))
    assert "[MASK]" not in joint["filled"]
    # the second mask sees the first one's choice: exactly the prediction for the sentence with it filled in,
    # and not the independent one (which saw [MASK] there)
    top = first_joint[0]["token_str"]
    [given] = masker([f"the {top} likes [MASK] river ."])
    second_joint, second_given = joint["predictions"][1], given["predictions"][0]
    assert [p["token"] for p in second_joint] == [p["token"] for p in second_given]
    assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(second_joint, second_given, strict=True))
    second_independent = independent["predictions"][1]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(second_joint, second_independent, strict=True)) > 1e-4


def test_batches_keep_input_order(exported):
    masker = FillMasker(*load_model(exported), batch_size=2)
    texts = [f"{s[:-2]} [MASK] ." for s in sentences(7)] + ["[MASK]"]
    assert [r["text"] for r in masker(texts)] == texts


def test_bad_inputs(exported, caplog):
    masker = FillMasker(*load_model(exported))
    with pytest.raises(MLMError, match="input 2 has no mask"):
        masker(["the [MASK] .", "no mask here"])
    with pytest.raises(MLMError, match="input 1 is empty"):
        masker([""])
    with pytest.raises(MLMError, match="no input sentences"):
        masker([])
    long = " ".join(sentences(20)) + " the [MASK] likes the river ."
    [result] = masker([long])  # longer than the model's 24 tokens: truncated around the mask, no crash
    assert len(result["predictions"]) == 1
    assert "1 input(s) longer than the model's 24 tokens were truncated" in caplog.text


def test_cli_no_mask_exit_code(exported, capsys):
    assert run_cli("fill-mask", "--model", exported, "nothing to fill") == 2
    assert "has no mask" in capsys.readouterr().err


def test_trained_model_predicts_the_obvious_token(tmp_path, capsys):
    corpus = tmp_path / "rep.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog .\n" * 200 + "a b c d e f g h .\n" * 200)
    root = tmp_path / "run"
    # 300 steps: at 150 the tiny model had not yet learned the context (it gave both lines the same
    # distribution, fox 0.34 / d 0.33, and passed by chance)
    assert run_cli("fit", "--data.train_files", str(corpus), *TINY_MODEL, *TINY_DATA, "--data.line_by_line", "true",
                   "--trainer.max_steps", "300", "--model.learning_rate", "3e-3", "--trainer.default_root_dir",
                   str(root), "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
                   "false") == 0
    capsys.readouterr()
    assert run_cli("fill-mask", "--model", str(root / "export"), "--json",
                   "the quick brown [MASK] jumps over the lazy dog .", "a b c [MASK] e f g h .") == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["predictions"][0][0]["token_str"] == "fox"
    assert lines[1]["predictions"][0][0]["token_str"] == "d"


def test_fill_mask_reads_a_file(exported, tmp_path, capsys):
    sentences_file = tmp_path / "in.txt"
    sentences_file.write_text("the cat [MASK] the river .\n\na [MASK] sees the ball .\n")
    assert run_cli("fill-mask", "--model", exported, "--json", "--file", str(sentences_file)) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["the cat [MASK] the river .", "a [MASK] sees the ball ."]  # blank skipped
    assert run_cli("fill-mask", "--model", exported, "--file", str(tmp_path / "missing.txt")) == 2
    assert "--file" in error_line(capsys.readouterr().err)


def test_text_view_strips_the_leading_space_of_byte_level_tokens():
    """RoBERTa/ModernBERT tokens decode as " same": the terminal shows `same`, the JSON keeps what HF gives."""
    from mlm_lightning.model.fill_mask import format_text

    tops = [{"token_str": " defined", "score": 0.03}, {"token_str": ",", "score": 0.02},
            {"token_str": " ", "score": 0.01}]
    result = {"filled": " defined in version 3.11", "predictions": [tops]}
    assert format_text(result) == "defined in version 3.11\n  mask 1: defined 0.030, , 0.020, ' ' 0.010"
