"""Pseudo-log-likelihood scoring (`model/score.py`): the same numbers as a brute-force loop straight through
transformers (one forward per masked position), for both variants and several tokenizer kinds; batching does not
change them; the command reads arguments, --file and stdin, from an export or a .ckpt."""

import functools
import io
import json
import math

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from mlm_lightning.errors import MLMError
from mlm_lightning.model import MLMModule
from mlm_lightning.model.checkpoint import load_model
from mlm_lightning.model.score import Scorer
from tests.support.cli import error_line, run_cli
from tests.support.models import family_export, family_tokenizer, module

# "elephant" and "unbelievable" are not in the tiny vocabularies: several pieces each (what word_l2r is about)
TEXTS = ["the elephant sees a ball .", "my friend calls", "unbelievable dogs ."]


@functools.cache
def hf_model(path: str):
    return AutoTokenizer.from_pretrained(path), AutoModelForMaskedLM.from_pretrained(path).eval()


def brute_force(path: str, text: str, variant: str) -> list[float]:
    """log P(token | the rest) of each non-special token, one forward per masked copy, as transformers computes it.
    word_l2r: the pieces of the same word (the tokenizer's word_ids) right of the scored one are masked too."""
    tok, model = hf_model(path)
    encoding = tok(text)
    ids, words = encoding["input_ids"], encoding.word_ids()
    out = []
    for i, token in enumerate(ids):
        if token in tok.all_special_ids:
            continue
        copy = list(ids)
        for j in range(len(ids)):
            if j == i or (variant == "word_l2r" and j > i and words[j] == words[i]):
                copy[j] = tok.mask_token_id
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([copy])).logits[0, i]
        out.append(logits.log_softmax(-1)[token].item())
    return out


@pytest.fixture(scope="module", params=["bert", "roberta", "modernbert"])
def exported(request, tmp_path_factory):
    path, _ = family_export(tmp_path_factory.mktemp(f"score-{request.param}"), request.param)
    return path


@pytest.mark.parametrize("variant", ["original", "word_l2r"])
def test_equals_a_brute_force_loop(exported, variant):
    net, tok = load_model(exported)
    ours = Scorer(net, tok, batch_size=7)(TEXTS, variant)
    for text, result in zip(TEXTS, ours, strict=True):
        expected = brute_force(exported, text, variant)
        assert result["text"] == text and result["n_tokens"] == len(expected) == len(result["tokens"])
        for got, want in zip(result["tokens"], expected, strict=True):
            assert abs(got["log_prob"] - want) < 1e-4, (text, got, want)
        assert abs(result["pll"] - sum(expected)) < 1e-4
        assert abs(result["pppl"] - math.exp(-sum(expected) / len(expected))) < 1e-3 * result["pppl"]
        ids = tok(text)["input_ids"]
        assert [t["token"] for t in result["tokens"]] == tok.convert_ids_to_tokens(ids[1:-1])  # specials unscored


def test_word_l2r_masks_the_rest_of_the_word(exported):
    """Only the pieces of a multi-piece word that have pieces of it to their right score differently."""
    net, tok = load_model(exported)
    scorer = Scorer(net, tok)
    [original], [l2r] = scorer([TEXTS[0]], "original"), scorer([TEXTS[0]], "word_l2r")
    words = [t["word"] for t in original["tokens"]]
    for k, (a, b) in enumerate(zip(original["tokens"], l2r["tokens"], strict=True)):
        has_right = words[k + 1 :].count(words[k]) > 0
        assert (abs(a["log_prob"] - b["log_prob"]) > 1e-6) == has_right, (k, a, b)
    assert words.count(1) >= 3  # "elephant": several pieces, one word


def test_batching_does_not_change_the_scores_or_their_order(exported):
    net, tok = load_model(exported)
    texts = ["the cat sees the river and the old car .", "a bird", "my friend helps the teacher .", "a tree ."]
    one = Scorer(net, tok, batch_size=1)(texts, "word_l2r")
    many = Scorer(net, tok, batch_size=1000)(texts, "word_l2r")
    assert [r["text"] for r in one] == texts
    assert_same(one, many)
    assert_same(Scorer(net, tok, batch_size=5)(texts[::-1], "word_l2r"), many[::-1])


def test_a_sentencepiece_tokenizer_groups_its_pieces_into_words(tmp_path):
    """XLM-R / ALBERT's kind of tokenizer (Unigram, a "▁" starting each word): word_l2r equals the loop too."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM, XLMRobertaTokenizerFast

    from tests.support.text import sentences

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    backend.train_from_iterator(sentences(300), trainers.UnigramTrainer(vocab_size=120, special_tokens=specials,
                                                                        unk_token="<unk>", show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                           special_tokens=[("<s>", 0), ("</s>", 2)])
    tok = XLMRobertaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                  sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    torch.manual_seed(0)
    model = XLMRobertaForMaskedLM(XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=64, pad_token_id=1,
                                                   max_position_embeddings=66))
    path = str(tmp_path / "xlmr")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    net, loaded = load_model(path)
    [result] = Scorer(net, loaded)(["the teacher sees an elephant"], "word_l2r")
    assert abs(result["pll"] - sum(brute_force(path, "the teacher sees an elephant", "word_l2r"))) < 1e-4
    assert result["tokens"][0]["token"].startswith("▁") and len({t["word"] for t in result["tokens"]}) == 5


def test_specials_written_in_the_text_and_bad_inputs(tmp_path, caplog):
    path, _ = family_export(tmp_path, "bert")
    net, tok = load_model(path)
    scorer = Scorer(net, tok)
    [with_mask] = scorer(["the [MASK] sees a ball ."])
    assert [t["token"] for t in with_mask["tokens"]] == ["the", "sees", "a", "ball", "."]  # the mask: context only
    with pytest.raises(MLMError, match="input 2 is empty"):
        scorer(["a cat", "  "])
    with pytest.raises(MLMError, match="input 1 has no token to score"):
        scorer(["[MASK] [SEP]"])
    with pytest.raises(MLMError, match="variant must be one of original, word_l2r"):
        scorer(["a cat"], "l2r")
    with caplog.at_level("WARNING", logger="mlm_lightning"):
        [long] = scorer(["the cat sees the ball ." * 30])
    assert long["truncated"] and long["n_tokens"] == 62  # the model's 64 positions, [CLS] and [SEP] among them
    assert any("1 input(s) longer than the model's 64 tokens" in r.getMessage() for r in caplog.records)


def test_the_python_entry_point_gives_the_same(exported):
    net, tok = load_model(exported)
    expected = Scorer(net, tok)(TEXTS, "word_l2r")
    model = MLMModule.load(exported)
    assert model.score(TEXTS, variant="word_l2r") == expected
    assert model.score(TEXTS[1]) == Scorer(net, tok)([TEXTS[1]])[0]
    assert model.model.training  # left as it was


def assert_same(ours: list[dict], expected: list[dict], tol: float = 1e-5) -> None:
    """The same sentences in the same order, the same tokens, scores within float noise (other batch shapes)."""
    assert [r["text"] for r in ours] == [r["text"] for r in expected]
    for a, b in zip(ours, expected, strict=True):
        assert {k: v for k, v in a.items() if k not in ("pll", "pppl", "tokens")} == \
            {k: v for k, v in b.items() if k not in ("pll", "pppl", "tokens")}
        assert abs(a["pll"] - b["pll"]) < tol * a["n_tokens"]
        assert [(t["token"], t["id"], t["word"]) for t in a["tokens"]] == [(t["token"], t["id"], t["word"])
                                                                          for t in b["tokens"]]
        assert all(abs(x["log_prob"] - y["log_prob"]) < tol for x, y in zip(a["tokens"], b["tokens"], strict=True))


def _checkpoint(tmp_path) -> tuple[str, str]:
    """(.ckpt, export dir) of the same tiny BERT: the checkpoint as a fit writes it (its payload by the module)."""
    m = module(family_tokenizer(tmp_path, "bert"))
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "tiny.ckpt")
    return str(tmp_path / "tiny.ckpt"), m.export(str(tmp_path / "export"))


def test_the_command_reads_arguments_a_file_and_stdin_from_a_ckpt(tmp_path, capsys, monkeypatch):
    ckpt, export = _checkpoint(tmp_path)
    expected = Scorer(*load_model(export))(TEXTS, "word_l2r")
    capsys.readouterr()
    assert run_cli("score", "--model", ckpt, "--variant", "word_l2r", *TEXTS) == 0
    assert_same([json.loads(line) for line in capsys.readouterr().out.splitlines()], expected)
    (tmp_path / "in.txt").write_text(f"{TEXTS[0]}\n\n{TEXTS[1]}\n{TEXTS[2]}\n")
    assert run_cli("score", "--model", export, "--file", str(tmp_path / "in.txt"), "--variant", "word_l2r") == 0
    assert_same([json.loads(line) for line in capsys.readouterr().out.splitlines()], expected)  # blank: skipped
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(TEXTS) + "\n"))
    assert run_cli("score", "--model", export, "--batch_size", "3") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert_same(rows, Scorer(*load_model(export))(TEXTS))
    assert run_cli("score", "--model", export, "--variant", "l2r", "a cat") == 2
    assert "--variant must be one of original, word_l2r" in error_line(capsys.readouterr().err)
    assert run_cli("score", "--model", export, "--file", str(tmp_path / "missing.txt")) == 2
    assert "--file" in error_line(capsys.readouterr().err)
