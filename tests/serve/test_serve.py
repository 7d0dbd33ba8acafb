"""`mlm-lightning serve`: pipeline parity, 4xx for every bad request, no mix-ups under concurrency, clean stops.

One real server process shared by the module; the tests that stop a server start their own."""

import json
import os
import signal
import threading
import time

import pytest
from transformers import pipeline

from mlm_lightning.model.checkpoint import load_model
from mlm_lightning.model.fill_mask import FillMasker
from mlm_lightning.serve.app import FillRequest, make_work
from tests.support.cli import run_cli
from tests.support.models import tiny_model
from tests.support.server import Server, assert_same_answer, get, post
from tests.support.text import sentences

MAX_INPUTS = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-cwd")


@pytest.fixture(scope="module")
def server(model, cwd):
    s = Server(model, cwd, "--max_inputs", str(MAX_INPUTS))  # no --host: the default
    yield s
    if s.proc.poll() is None:
        s.stop()


@pytest.fixture(scope="module")
def fill_mask(model):
    return pipeline("fill-mask", model=model)


def test_health_page_and_default_host(server):
    status, body = get(server.url, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, page = get(server.url, "/")
    assert status == 200 and "<textarea" in page and "api/fill" in page
    assert "http://" not in page and "https://" not in page  # self-contained: nothing from a CDN
    assert server.url.startswith("http://127.0.0.1:")
    port = int(server.url.rsplit(":", 1)[1])
    with open("/proc/net/tcp") as f:  # the listening socket (state 0A) is on loopback only
        listening = [line.split()[1] for line in f.read().splitlines()[1:] if line.split()[3] == "0A"]
    assert f"0100007F:{port:04X}" in listening


@pytest.mark.parametrize("top_k", [None, 3])
def test_same_as_pipeline_single_multi_mask_and_list(server, fill_mask, top_k):
    single, multi = "the cat [MASK] the river .", "the [MASK] likes [MASK] river ."
    params = {} if top_k is None else {"parameters": {"top_k": top_k}}
    kwargs = {} if top_k is None else {"top_k": top_k}
    for text in (single, multi):
        status, ours = post(server.url, {"inputs": text, **params})
        assert status == 200
        assert_same_answer(ours, fill_mask(text, **kwargs))
    texts = [single, multi, "a bird [MASK] ."]
    status, ours = post(server.url, {"inputs": texts, **params})
    assert status == 200 and len(ours) == 3
    for answer, text in zip(ours, texts, strict=True):
        assert_same_answer(answer, fill_mask(text, **kwargs))
    status, [one] = post(server.url, {"inputs": [single]})  # a list of one is a list of one answer
    assert status == 200 and one[0]["sequence"].startswith("the cat")


def test_page_api_has_the_filled_sentence(server):
    status, out = post(server.url, {"inputs": "the [MASK] likes [MASK] river ."}, path="/api/fill")
    assert status == 200 and len(out["predictions"]) == 2
    firsts = [p[0]["token_str"] for p in out["predictions"]]
    assert out["filled"].split()[1] == firsts[0] and out["filled"].split()[3] == firsts[1]
    status, info = get(server.url, "/api/info")
    assert status == 200 and json.loads(info)["mask_token"] == "[MASK]"


def test_own_mask_token_works_like_mask(tmp_path):
    """A tokenizer whose mask token is <mask>: `[MASK]` and `<mask>` give the pipeline's answer for <mask>."""
    path = tiny_model(tmp_path, mask_token="<mask>")
    masker = FillMasker(*load_model(path))
    masker.pipeline_sequences = True
    work = make_work(masker)
    a, b = work([FillRequest(["the cat [MASK] the river ."], True, 5, True),
                 FillRequest(["the cat <mask> the river ."], True, 5, True)])
    assert a == b
    assert_same_answer(json.loads(a), pipeline("fill-mask", model=path)("the cat <mask> the river ."))



def test_a_bad_text_in_a_batch_fails_its_own_request_only(model, fill_mask):
    """One batch, tokenized in one call: the request with a bad text gets its 400, the others their answers."""
    from mlm_lightning.serve.app import BadRequest

    masker = FillMasker(*load_model(model))
    masker.pipeline_sequences = True
    good = ["the cat [MASK] the river .", "a [MASK] sees the ball ."]
    out = make_work(masker)([FillRequest([good[0]], True, 3, True),
                             FillRequest(["fine [MASK] .", "no mask"], False, 3, True),
                             FillRequest(good, False, 2, True), FillRequest(["  "], True, 3, True)])
    assert isinstance(out[1], BadRequest) and out[1].status == 400 and "input 2 has no mask" in str(out[1])
    assert isinstance(out[3], BadRequest) and "input 1 is empty" in str(out[3])
    assert_same_answer(json.loads(out[0]), fill_mask(good[0], top_k=3))
    for answer, text in zip(json.loads(out[2]), good, strict=True):
        assert_same_answer(answer, fill_mask(text, top_k=2))

BAD = [
    (b"{", 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    (b"\xff\xfe{}", 400, "not valid JSON"),
    (b"[1]", 400, "JSON object"),
    (b"null", 400, "JSON object"),
    ({}, 400, '"inputs" is missing'),
    ({"inputs": ""}, 400, "input 1 is empty"),
    ({"inputs": ["the [MASK] .", "  "]}, 400, "input 2 is empty"),
    ({"inputs": []}, 400, "empty list"),
    ({"inputs": 3}, 400, "must be a string or a list of strings"),
    ({"inputs": {"text": "a [MASK]"}}, 400, "must be a string or a list of strings"),
    ({"inputs": ["a [MASK]", 5]}, 400, "must be a string or a list of strings"),
    ({"inputs": "no mask here"}, 400, "input 1 has no mask"),
    ({"inputs": ["the [MASK] .", "no mask"]}, 400, "input 2 has no mask"),
    ({"inputs": "a [MASK]", "parameters": 5}, 400, '"parameters" must be an object'),
    ({"inputs": "a [MASK]", "parameters": {"top_k": 0}}, 400, '"top_k" must be between 1'),
    ({"inputs": "a [MASK]", "parameters": {"top_k": -3}}, 400, '"top_k" must be between 1'),
    ({"inputs": "a [MASK]", "parameters": {"top_k": 10**12}}, 400, '"top_k" must be between 1'),
    ({"inputs": "a [MASK]", "parameters": {"top_k": "5"}}, 400, '"top_k" must be an integer'),
    ({"inputs": "a [MASK]", "parameters": {"top_k": True}}, 400, '"top_k" must be an integer'),
    ({"inputs": "a [MASK]", "parameters": {"top_k": 2.5}}, 400, '"top_k" must be an integer'),
    ({"inputs": "a [MASK]", "parameters": {"temperature": 1}}, 400, "unsupported parameter(s) 'temperature'"),
    ({"inputs": "a [MASK]", "options": {}}, 400, "unknown field(s) 'options'"),
    ({"inputs": ["a [MASK] ."] * (MAX_INPUTS + 1)}, 413, f"at most {MAX_INPUTS}"),
    ({"inputs": "a [MASK] " + "word " * 300_000}, 413, "over 1048576 bytes"),
    ({"inputs": "[MASK] " + "the cat sees the ball . " * 20 + "[MASK] ."}, 400, "tokens apart"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_request_is_a_4xx_naming_the_problem(server, body, status, message):
    raw = isinstance(body, bytes)
    got, out = post(server.url, body, raw=raw)
    assert (got, message in out.get("error", "")) == (status, True), out


def test_other_bad_calls_and_the_server_keeps_serving(server):
    assert get(server.url, "/nope")[0] == 404 and "Not Found" in json.loads(get(server.url, "/nope")[1])["error"]
    status, body = get(server.url, "/api/fill-mask")
    assert status == 405 and "error" in json.loads(body)
    # far longer than the model (24 tokens): cut to a window around the mask, as `fill-mask` does
    status, out = post(server.url, {"inputs": "the cat sees the ball . " * 40 + "the [MASK] likes the river ."})
    assert status == 200 and len(out) == 5 and all("river" in c["sequence"] for c in out)
    assert post(server.url, {"inputs": "a [MASK] ."})[0] == 200
    assert "internal error" not in server.log and "Traceback" not in server.log


def test_concurrent_requests_each_get_their_own_answer(server, fill_mask):
    """16 threads x 25 requests, different texts and top_k, some lists: every answer is for its own input."""
    words = [s.split() for s in sentences(400, seed=7)]
    texts = [" ".join(w[:j] + ["[MASK]"] + w[j + 1 :]) for n, w in enumerate(words) for j in [n % (len(w) - 1)]]
    texts = [t.replace("the", "[MASK]", 1) if n % 7 == 0 else t for n, t in enumerate(texts)]  # some with 2 masks
    failures, answered, lock = [], [], threading.Lock()

    def client(t: int) -> None:
        top_k = 1 + t % 5
        for i in range(25):
            n = t * 25 + i
            inputs = [texts[n], texts[(n + 1) % 400]] if i % 5 == 0 else texts[n]
            try:  # every failure is recorded (a timeout too): a thread that dies silently would pass the test
                status, out = post(server.url, {"inputs": inputs, "parameters": {"top_k": top_k}})
                assert status == 200, out
                if isinstance(inputs, list):
                    for answer, text in zip(out, inputs, strict=True):
                        assert_same_answer(answer, fill_mask(text, top_k=top_k))
                else:
                    assert_same_answer(out, fill_mask(inputs, top_k=top_k))
                with lock:
                    answered.append((t, i))
            except Exception as e:  # noqa: BLE001 - recorded, asserted below
                with lock:
                    failures.append((t, i, f"{type(e).__name__}: {str(e)[:300]}"))

    threads = [threading.Thread(target=client, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert failures == []
    assert sorted(answered) == [(t, i) for t in range(16) for i in range(25)]  # every request got its answer
    stats = json.loads(get(server.url, "/health")[1])
    assert stats["largest_batch"] > 1  # concurrent requests really shared forward passes


def test_sigterm_stops_the_server_and_nothing_was_written(model, tmp_path):
    """SIGTERM: graceful stop within seconds, exit 143; no file in the working dir (a server of its own: the tests
    of this module pass in any order)."""
    server = Server(model, tmp_path)
    assert post(server.url, {"inputs": "the cat [MASK] the river ."})[0] == 200
    code, seconds = server.stop(signal.SIGTERM)
    assert code == 143 and seconds < 5, (code, seconds, server.log)
    assert "stopped by SIGTERM" in server.log
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_batch_size_wait_and_a_request_in_flight_at_sigterm(model, tmp_path):
    """--max_batch_size caps a batch, --max_wait_ms is how long a lone request waits for company, and a request
    in flight when SIGTERM comes is still answered before the server exits."""
    server = Server(model, tmp_path, "--max_batch_size", "2", "--max_wait_ms", "400")
    start = time.monotonic()
    assert post(server.url, {"inputs": "the cat [MASK] the river ."})[0] == 200
    assert time.monotonic() - start >= 0.4  # it waited for others to join its batch (a lower bound: load-proof)
    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(post(server.url, {"inputs": "a [MASK] sees the ball ."})))
               for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert [a[0] for a in answers] == [200] * 6
    stats = json.loads(get(server.url, "/health")[1])
    assert stats["largest_batch"] == 2 and stats["batches"] >= 4  # 7 requests, batches of at most 2
    server.stop(signal.SIGTERM)

    slow = Server(model, tmp_path, "--max_wait_ms", "5000")  # a lone request waits 5 s: in flight meanwhile
    late: list = []
    th = threading.Thread(target=lambda: late.append(post(slow.url, {"inputs": "the dog [MASK] a tree ."})))
    th.start()
    time.sleep(1.5)
    code, _ = slow.stop(signal.SIGTERM, timeout=60)
    th.join(timeout=60)
    assert code == 143 and late and late[0][0] == 200, (code, late, slow.log)


@pytest.mark.slow
def test_sigint_exits_130_and_a_busy_port_is_one_line(model, tmp_path):
    s = Server(model, tmp_path)
    port = s.url.rsplit(":", 1)[1]
    assert run_cli("serve", "--model", model, "--port", port) == 2  # the port is taken: exit 2 at once
    code, seconds = s.stop(signal.SIGINT)
    assert code == 130 and seconds < 5 and "stopped by SIGINT" in s.log
    assert os.listdir(tmp_path) == []
