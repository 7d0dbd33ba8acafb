"""`POST /api/score`: what `mlm-lightning score` prints, for one sentence or a list; a 4xx line for every bad request;
fill-mask keeps its answers beside it."""

import json

import pytest

from mlm_lightning.serve.app import BadRequest, parse_request, parse_score_request
from tests.support.cli import run_cli
from tests.support.models import family_export
from tests.support.server import Server, post

MAX_INPUTS = 4
TEXTS = ["the elephant sees a ball .", "my friend calls", "a bird"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    path, _ = family_export(tmp_path_factory.mktemp("score-api"), "roberta")
    return path


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    s = Server(model, tmp_path_factory.mktemp("score-cwd"), "--max_inputs", str(MAX_INPUTS))
    yield s
    if s.proc.poll() is None:
        s.stop()


def _cli(model: str, capsys, *args: str) -> list[dict]:
    capsys.readouterr()
    assert run_cli("score", "--model", model, "--device", "cpu", *args) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _close(ours, expected) -> None:
    """The same answer; scores within float noise (the server's process may batch other shapes)."""
    assert [r["text"] for r in ours] == [r["text"] for r in expected]
    for a, b in zip(ours, expected, strict=True):
        assert set(a) == set(b) and a["n_tokens"] == b["n_tokens"] and a["truncated"] == b["truncated"]
        assert [t["token"] for t in a["tokens"]] == [t["token"] for t in b["tokens"]]
        assert all(abs(x["log_prob"] - y["log_prob"]) < 1e-5 for x, y in zip(a["tokens"], b["tokens"], strict=True))


@pytest.mark.parametrize("variant", ["original", "word_l2r"])
def test_the_api_answers_what_the_command_prints(server, model, capsys, variant):
    expected = _cli(model, capsys, "--variant", variant, *TEXTS)
    status, out = post(server.url, {"inputs": TEXTS, "parameters": {"variant": variant}}, path="/api/score")
    assert status == 200
    _close(out, expected)
    status, one = post(server.url, {"inputs": TEXTS[1], "parameters": {"variant": variant}}, path="/api/score")
    assert status == 200 and isinstance(one, dict)
    _close([one], expected[1:2])


def test_default_variant_long_sentences_and_fill_mask_beside_it(server, model, capsys):
    long = "the cat sees the ball . " * 30
    expected = _cli(model, capsys, TEXTS[0], long)
    status, out = post(server.url, {"inputs": [TEXTS[0], long]}, path="/api/score")
    assert status == 200 and out[1]["truncated"] and out[1]["n_tokens"] == 62  # as the command: cut, not refused
    _close(out, expected)
    status, fills = post(server.url, {"inputs": "the cat <mask> the ball ."})
    assert status == 200 and len(fills) == 5


BAD = [
    (b"{", 400, "not valid JSON"),
    (b"[1]", 400, "JSON object"),
    ({}, 400, '"inputs" is missing'),
    ({"inputs": ""}, 400, "input 1 is empty"),
    ({"inputs": ["a cat", "  "]}, 400, "input 2 is empty"),
    ({"inputs": []}, 400, "empty list"),
    ({"inputs": 3}, 400, "must be a string or a list of strings"),
    ({"inputs": "<s></s>"}, 400, "input 1 has no token to score"),
    ({"inputs": ["a cat"] * (MAX_INPUTS + 1)}, 413, f"at most {MAX_INPUTS}"),
    ({"inputs": "a cat " + "word " * 300_000}, 413, "over 1048576 bytes"),
    ({"inputs": "a cat", "parameters": {"variant": "l2r"}}, 400, '"variant" must be one of original, word_l2r'),
    ({"inputs": "a cat", "parameters": {"top_k": 5}}, 400, "unsupported parameter(s) 'top_k'; supported: variant"),
    ({"inputs": "a cat", "parameters": []}, 400, '"parameters" must be an object like {"variant": "word_l2r"}'),
    ({"inputs": "a cat", "options": {}}, 400, "unknown field(s) 'options'"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_request_is_a_4xx_naming_the_problem(server, body, status, message):
    got, out = post(server.url, body, path="/api/score", raw=isinstance(body, bytes))
    assert (got, message in out.get("error", "")) == (status, True), out
    assert "internal error" not in server.log and "Traceback" not in server.log


def test_the_parsers_take_their_own_parameters():
    texts, single, variant = parse_score_request(json.dumps({"inputs": "a cat"}).encode(), 4)
    assert (texts, single, variant) == (["a cat"], True, "original")
    with pytest.raises(BadRequest, match="supported: top_k, targets"):
        parse_request(json.dumps({"inputs": "a [MASK]", "parameters": {"variant": "original"}}).encode(), 4, 10)
