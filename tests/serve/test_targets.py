"""`targets` (score only given words) in fill-mask, the server's API and predict: the fill-mask pipeline's answers,
including for a word that is several tokens (scored by its first token, as the pipeline does)."""

import json

import pytest
from transformers import pipeline

from mlm_lightning.model.checkpoint import load_model
from mlm_lightning.model.fill_mask import FillMasker
from mlm_lightning.serve.app import BadRequest, FillRequest, make_work, parse_request
from tests.support.cli import run_cli
from tests.support.models import family_export, module
from tests.support.server import Server, assert_same_candidates, post


@pytest.fixture(scope="module", params=["bert", "roberta"])
def exported(request, tmp_path_factory):
    path, _ = family_export(tmp_path_factory.mktemp(request.param), request.param)
    return path


def _targets(tokenizer) -> list[str]:
    """Two words of the vocabulary (one as the vocabulary spells it, one as a user writes it), and a word that the
    tokenizer splits into several tokens."""
    vocab = tokenizer.get_vocab()
    assert "elephant" not in vocab and len(tokenizer("elephant", add_special_tokens=False)["input_ids"]) > 1
    spelled = next(t for t in ("Ġball", "ball") if t in vocab)
    return [spelled, "tree", "elephant"]


def test_fill_mask_targets_equal_the_pipeline(exported, caplog):
    net, tok = load_model(exported)
    text, targets = f"the cat {tok.mask_token} the ball .", _targets(tok)
    expected = pipeline("fill-mask", model=exported, device="cpu")(text, targets=targets, top_k=5)
    assert len(expected) == 3  # top_k is capped at the number of targets
    with caplog.at_level("WARNING", logger="mlm_lightning"):
        ours = FillMasker(net, tok, top_k=5)([text], targets=targets)[0]["predictions"][0]
    assert_same_candidates(ours, expected)
    assert any("'elephant' is not one token" in r.getMessage() for r in caplog.records)
    two = FillMasker(net, tok, top_k=1)(["the [MASK] finds [MASK] ."], targets=targets, joint=True)[0]
    assert all(p[0]["token"] in {e["token"] for e in expected} for p in two["predictions"])


def test_fill_mask_command_takes_comma_separated_targets(exported, capsys):
    _, tok = load_model(exported)
    text, targets = "the dog [MASK] a tree .", _targets(tok)
    expected = pipeline("fill-mask", model=exported, device="cpu")(text.replace("[MASK]", tok.mask_token),
                                                                    targets=targets)
    capsys.readouterr()
    assert run_cli("fill-mask", "--model", exported, "--json", "--targets", ",".join(targets), text) == 0
    assert_same_candidates(json.loads(capsys.readouterr().out)["predictions"][0], expected)
    assert run_cli("fill-mask", "--model", exported, "--targets", " , ", text) == 2
    assert "--targets is empty" in capsys.readouterr().err


def test_api_targets_parameter(exported):
    net, tok = load_model(exported)
    text, targets = f"my friend {tok.mask_token} the river .", _targets(tok)
    expected = pipeline("fill-mask", model=exported, device="cpu")(text, targets=targets, top_k=2)
    texts, single, top_k, got = parse_request(json.dumps(
        {"inputs": text, "parameters": {"targets": targets, "top_k": 2}}).encode(), 8, 10)
    assert got == targets
    work = make_work(FillMasker(net, tok))
    # requests with and without targets share a batch, each answered its own way
    both = work([FillRequest(texts, single, top_k, True, got), FillRequest([text], True, 2, True, None),
                 FillRequest([text], True, 2, True, [""])])
    assert_same_candidates(json.loads(both[0]), expected)
    assert len(json.loads(both[1])) == 2 and json.loads(both[1]) != json.loads(both[0])
    assert isinstance(both[2], BadRequest) and both[2].status == 400
    for bad in (3, [], [1], {"a": 1}):
        with pytest.raises(BadRequest, match="targets"):
            parse_request(json.dumps({"inputs": text, "parameters": {"targets": bad}}).encode(), 8, 10)
    assert parse_request(json.dumps({"inputs": text, "parameters": {"targets": "tree"}}).encode(), 8, 10)[3] == [
        "tree"]


def test_predict_targets(exported):
    net, tok = load_model(exported)
    m = module(tok, model_name_or_path=exported, targets=_targets(tok), top_k=5)
    text = f"a bird {tok.mask_token} the old car ."
    expected = pipeline("fill-mask", model=exported, device="cpu")(text, targets=_targets(tok))
    [out] = m.predict_step([(0, text)], 0)
    assert out["index"] == 0
    assert_same_candidates(out["predictions"][0], expected)
    assert "targets" not in m.hparams  # a prediction option: never saved into checkpoints


@pytest.mark.slow
def test_inference_client_fill_mask_with_targets(exported, tmp_path, monkeypatch):
    """huggingface_hub's own client, pointed at `serve`, gets the pipeline's answer (it got a 400 before)."""
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)  # (it reaches 127.0.0.1 only)

    _, tok = load_model(exported)
    text, targets = f"the teacher {tok.mask_token} the red door .", _targets(tok)
    expected = pipeline("fill-mask", model=exported, device="cpu")(text, targets=targets)
    server = Server(exported, tmp_path)
    try:
        status, body = post(server.url, {"inputs": text, "parameters": {"targets": targets}})
        assert status == 200
        assert_same_candidates(body, expected)
        answer = InferenceClient(model=f"{server.url}/api/fill-mask").fill_mask(text, targets=targets)
        keys = ("score", "token", "token_str", "sequence")
        assert_same_candidates([{k: getattr(a, k) for k in keys} for a in answer], expected)
    finally:
        server.stop()
