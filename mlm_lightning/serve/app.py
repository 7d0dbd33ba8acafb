"""`mlm-lightning serve`: fill-mask over HTTP (FastAPI + uvicorn) and a web page to try a model in a browser.

`POST /api/fill-mask` answers exactly what `transformers.pipeline("fill-mask")` returns; `POST /api/fill` answers
what `mlm-lightning fill-mask --json` prints (the page uses it: it also has the filled sentence); `POST /api/score`
answers what `mlm-lightning score` prints (the pseudo-log-likelihood of each sentence, `model/score.py`). Concurrent
requests share forward passes (`batcher.Batcher`); the model runs in one worker thread, never on the event loop.
Every bad request is a 4xx with `{"error": "<the problem and the fix>"}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from typing import Any, NamedTuple

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from mlm_lightning.errors import MLMError, check
from mlm_lightning.model.checkpoint import load_model
from mlm_lightning.model.fill_mask import FillMasker, pick_device
from mlm_lightning.model.score import VARIANTS, Scorer
from mlm_lightning.serve.batcher import Batcher
from mlm_lightning.serve.onnx_backend import BACKENDS, OnnxFillMasker

log = logging.getLogger("mlm_lightning")

MAX_BODY_BYTES = 1 << 20  # longer texts than this are no sentences; a model sees at most 512 tokens of them
PARAMETERS = ("top_k", "targets")
EXAMPLES = [  # the demo model's domain (CPython's docs: reference + stdlib docstrings); `--examples` sets your own
    "the [MASK] statement is used to leave a loop.",
    "a class definition defines a [MASK] object.",
    "if the condition is false, the [MASK] clause is executed.",
    "the [MASK] of a function is the value it [MASK].",
]


class FillRequest(NamedTuple):
    """One request's work for the batcher: its texts, whether `inputs` was a single string (answered unwrapped),
    the candidates per mask, the pipeline's answer format (else the CLI's `--json`) and the `targets` to score."""

    texts: list[str]
    single: bool
    top_k: int
    pipeline_format: bool
    targets: list[str] | None = None


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_inputs(body: bytes, max_inputs: int, supported: tuple[str, ...], example: str = "a [MASK] sentence",
                 sentence: str = "a sentence with [MASK] where a word should go", like: str = '{"top_k": 5}'
                 ) -> tuple[list[str], bool, dict]:
    """(texts, whether `inputs` was a single string, parameters) of a request body `{"inputs": ...,
    "parameters": {...}}` for any endpoint, or `BadRequest`. `supported`: the parameter names it takes; `example`,
    `sentence` and `like` (a parameters object) show the way in the endpoint's own terms."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"the body is not valid JSON ({e}); send {{\"inputs\": \"{example}\"}}") from None
    if not isinstance(data, dict):
        raise BadRequest(400, f"the body must be a JSON object with \"inputs\", got {type(data).__name__}")
    unknown = sorted(set(data) - {"inputs", "parameters"})
    if unknown:
        raise BadRequest(400, f"unknown field(s) {', '.join(map(repr, unknown))}; expected \"inputs\", \"parameters\"")
    if "inputs" not in data:
        raise BadRequest(400, f"\"inputs\" is missing; send {{\"inputs\": \"{example}\"}} or a list of them")
    inputs, single = data["inputs"], isinstance(data["inputs"], str)
    texts = [inputs] if single else inputs
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        got = type(inputs).__name__ if not isinstance(inputs, list) else "a list with non-strings"
        raise BadRequest(400, f"\"inputs\" must be a string or a list of strings, got {got}")
    if not texts:
        raise BadRequest(400, f"\"inputs\" is an empty list; send {{\"inputs\": [\"{example}\"]}}")
    if len(texts) > max_inputs:
        raise BadRequest(413, f"{len(texts)} inputs in one request; at most {max_inputs} (split the list)")
    for i, t in enumerate(texts, start=1):
        if not t.strip():
            raise BadRequest(400, f"input {i} is empty; give {sentence}")
    params = data.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequest(400, f"\"parameters\" must be an object like {like}, got {type(params).__name__}")
    unknown = sorted(set(params) - set(supported))
    if unknown:
        raise BadRequest(400, f"unsupported parameter(s) {', '.join(map(repr, unknown))}; supported:"
                              f" {', '.join(supported)}")
    return texts, single, params


def parse_request(body: bytes, max_inputs: int, max_top_k: int) -> tuple[list[str], bool, int, list[str] | None]:
    """(texts, whether `inputs` was a single string, top_k, targets) from a request body, or `BadRequest`."""
    texts, single, params = parse_inputs(body, max_inputs, PARAMETERS)
    top_k = params.get("top_k", 5)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise BadRequest(400, f"\"top_k\" must be an integer, got {json.dumps(top_k)}")
    if not 1 <= top_k <= max_top_k:
        raise BadRequest(400, f"\"top_k\" must be between 1 and {max_top_k}, got {top_k}")
    targets = params.get("targets")  # the pipeline's: a word or a list of words
    targets = [targets] if isinstance(targets, str) else targets
    if targets is not None and (not isinstance(targets, list) or not targets
                                or not all(isinstance(t, str) for t in targets) or len(targets) > max_top_k * 10):
        raise BadRequest(400, f"\"targets\" must be a word or a non-empty list of words (at most {max_top_k * 10})")
    return texts, single, top_k, targets


TOO_BIG = f"the body is over {MAX_BODY_BYTES} bytes; send shorter texts or fewer per request"


async def read_body(request: Request) -> bytes | None:
    """The request's body; None: over `MAX_BODY_BYTES` (counted as it comes: a chunked body has no Content-Length).
    A body somewhat over the limit is read to its end first, so that the client, still sending, reads the 413
    instead of a reset connection; a huge one is cut off."""
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            body += chunk
        elif size > 16 * MAX_BODY_BYTES:
            break
    return bytes(body) if size <= MAX_BODY_BYTES else None


def parse_score_request(body: bytes, max_inputs: int) -> tuple[list[str], bool, str]:
    """(texts, whether `inputs` was a single string, variant) of a `/api/score` body, or `BadRequest`."""
    texts, single, params = parse_inputs(body, max_inputs, ("variant",), "a sentence", "a sentence to score",
                                         '{"variant": "word_l2r"}')
    variant = params.get("variant", "original")
    if variant not in VARIANTS:
        raise BadRequest(400, f"\"variant\" must be one of {', '.join(VARIANTS)}, got {json.dumps(variant)}")
    return texts, single, variant


def score_work(scorer, texts: list[str], single: bool, variant: str) -> bytes:
    """Score one request's sentences (in the model's thread): JSON bytes, or `BadRequest` for a bad sentence."""
    encoded = scorer.encode_many(texts, list(range(len(texts))))
    bad = next((e for e in encoded if isinstance(e, MLMError)), None)
    if bad is not None:
        raise BadRequest(400, str(bad))
    results = scorer.score(encoded, variant)
    return json.dumps(results[0] if single else results, ensure_ascii=False).encode()


def make_work(masker):
    """The batch function for the worker thread: [FillRequest] -> [JSON bytes | BadRequest]."""

    def work(items: list[FillRequest]) -> list[Any]:
        outcomes: list[Any] = [None] * len(items)
        # tokenized here, not on the event loop, all texts of the batch in one call; a bad text fails its own
        # request only
        texts = [t for item in items for t in item.texts]
        everything = masker.encode_many(texts, [i for item in items for i in range(len(item.texts))])
        encoded, top_ks, target_ids, owners, start = [], [], [], [], 0
        for n, item in enumerate(items):
            mine, start = everything[start : start + len(item.texts)], start + len(item.texts)
            bad = next((e for e in mine if isinstance(e, MLMError)), None)
            try:
                ids = masker.target_ids(item.targets, "\"targets\"")
            except MLMError as e:
                bad = bad or e
            if bad is not None:
                outcomes[n] = BadRequest(400, str(bad))
                continue
            encoded += mine
            top_ks += [item.top_k] * len(mine)
            target_ids += [ids] * len(mine)
            owners += [n] * len(mine)
        masker.truncated = []  # encode() notes truncated inputs for the CLI's warning; nobody reads them here
        results = masker.fill(encoded, top_ks, target_ids) if encoded else []
        per_item: dict[int, list[dict]] = {}
        for owner, result in zip(owners, results, strict=True):
            per_item.setdefault(owner, []).append(result)
        for n, rs in per_item.items():
            if items[n].pipeline_format:  # the pipeline: one mask -> its list; several -> a list per mask
                rs = [r["predictions"][0] if len(r["predictions"]) == 1 else r["predictions"] for r in rs]
            outcomes[n] = json.dumps(rs[0] if items[n].single else rs, ensure_ascii=False).encode()
        return outcomes

    return work


def create_app(masker, *, model_name: str, max_batch_size: int = 32, max_wait_ms: float = 2.0, max_inputs: int = 64,
               max_top_k: int = 100, examples: list[str] | None = None):
    """The FastAPI app around a `FillMasker` (its tokenizer runs in the worker thread too)."""
    masker.pipeline_sequences = True
    masker.batch_size = max_batch_size
    max_top_k = min(max_top_k, len(masker.tokenizer))
    batcher = Batcher(make_work(masker), max_batch_size, max_wait_ms / 1000)
    page = resources.files("mlm_lightning").joinpath("serve/static/index.html").read_text(encoding="utf-8")
    info = {"model": model_name, "mask_token": masker.tokenizer.mask_token, "max_top_k": max_top_k,
            "max_inputs": max_inputs, "examples": EXAMPLES if examples is None else examples}

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    # no /docs: FastAPI's pages load their scripts from a CDN, and this server works offline
    app = FastAPI(title="mlm-lightning", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # 404, 405, ... in the same shape as ours
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    @app.exception_handler(Exception)
    async def server_error(request, exc):  # a bug, not the client's fault: say so, keep serving
        log.exception("error while serving %s", request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); see the server's log")

    async def answer(request: Request, pipeline_format: bool) -> Response:
        body = await read_body(request)
        if body is None:
            return error(413, TOO_BIG)
        try:
            texts, single, top_k, targets = parse_request(body, max_inputs, max_top_k)
            out = await batcher.submit(FillRequest(texts, single, top_k, pipeline_format, targets), len(texts))
        except BadRequest as e:
            return error(e.status, str(e))
        return Response(out, media_type="application/json")

    @app.post("/api/fill-mask")
    async def fill_mask(request: Request) -> Response:
        return await answer(request, pipeline_format=True)

    @app.post("/api/fill")
    async def fill(request: Request) -> Response:
        return await answer(request, pipeline_format=False)

    # (the fill-mask backend's logits: torch's, or ONNX Runtime's)
    scorer = Scorer(masker.model, masker.tokenizer, masker.device, notice=False, logits=masker._logits)

    @app.post("/api/score")  # what `mlm-lightning score` prints: one object per sentence (a list for a list)
    async def score(request: Request) -> Response:
        body = await read_body(request)
        if body is None:
            return error(413, TOO_BIG)
        try:
            texts, single, variant = parse_score_request(body, max_inputs)
            # in the model's one thread (queued behind fill-mask batches), never on the event loop
            out = await asyncio.get_running_loop().run_in_executor(batcher.executor, score_work, scorer, texts,
                                                                   single, variant)
        except BadRequest as e:
            return error(e.status, str(e))
        return Response(out, media_type="application/json")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, **batcher.stats}

    @app.get("/api/info")
    async def api_info() -> dict:
        return info

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    return app


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", max_batch_size: int = 32,
          max_wait_ms: float = 2.0, max_inputs: int = 64, max_top_k: int = 100, examples: list[str] | None = None,
          access_log: bool = False, backend: str = "auto") -> None:
    """Serve fill-mask over HTTP and as a web page until SIGINT/SIGTERM, then end the process (exit 130/143).

    Args:
        model: An exported/Hugging Face model directory, a hub id in the local cache, or a .ckpt file.
        host: The address to listen on. The default serves this machine only; 0.0.0.0 serves your whole network,
            with no authentication: anyone who can reach the port can use the model.
        port: The TCP port (0: any free port; the log line says which).
        device: cpu, cuda or auto.
        max_batch_size: At most this many sentences of concurrent requests go through the model together.
        max_wait_ms: How long a batch waits for more requests to join it, when it is not full.
        max_inputs: At most this many texts in one request (more: 413).
        max_top_k: The largest top_k a request may ask for (capped at the vocabulary size).
        examples: Example sentences the page offers (default: a few for the demo model).
        access_log: Log every request (uvicorn's access log) on stderr.
        backend: torch, or onnx: ONNX Runtime on the CPU, from the model.onnx of `mlm-lightning export --format
            onnx`; auto: torch (measured faster than onnx on the CPU: see docs/export.md).
    """
    for s in (signal.SIGINT, signal.SIGTERM):  # stopped while loading: the same exit codes, nothing to clean up
        signal.signal(s, _exit_on_signal)
    check(max_batch_size >= 1 and max_inputs >= 1 and max_top_k >= 1 and max_wait_ms >= 0,
          "--max_batch_size, --max_inputs and --max_top_k must be at least 1, --max_wait_ms at least 0")
    check(0 <= port <= 65535, f"--port {port} is not a TCP port; use 1-65535 (or 0 for any free port)")
    try:  # bind before the (slow) model load: a busy port fails at once
        sock = _listen(host, port)
    except OSError as e:
        raise MLMError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    check(backend in BACKENDS, f"--backend {backend!r} is not a backend; use one of {', '.join(BACKENDS)}")
    check(backend != "onnx" or device in ("auto", "cpu"),
          f"--backend onnx runs on the CPU (onnxruntime), not --device {device}; use --backend torch for a GPU")
    device = "cpu" if backend == "onnx" else pick_device(device)
    name = os.path.basename(os.path.normpath(model)) or model
    log.info("loading %s on %s (%s)", model, device, "onnxruntime" if backend == "onnx" else "torch")
    if backend == "onnx":
        masker = OnnxFillMasker(model)
    else:
        loaded, tokenizer = load_model(model)
        masker = FillMasker(loaded.to(device), tokenizer, device)
    masker([masker.tokenizer.mask_token])  # warm up: the first request is not slower than the rest
    app = create_app(masker, model_name=name, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                     max_inputs=max_inputs, max_top_k=max_top_k, examples=examples)
    server = _Server(uvicorn.Config(app, log_level="warning", access_log=access_log, timeout_graceful_shutdown=5,
                                    lifespan="on"))
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    log.info("serving %s on http://%s:%d (page at /, API at /api/fill-mask; Ctrl-C stops)", name, shown, bound_port)
    server.run(sockets=[sock])
    if server.signum is not None:
        _exit(server.signum, "")


def _listen(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP)[0]
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that say TCP;
    # with it on, a keep-alive client waits ~40 ms (delayed ACK) for each response's body
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(2048)
    return sock


def _exit(signum: int, when: str) -> None:
    """End the process with the shell's convention for a signal: 130 for SIGINT, 143 for SIGTERM.

    `os._exit`, after flushing: the requests are answered and there is nothing to save, while the interpreter's
    teardown of torch and transformers takes seconds (2-10 s on a busy 2-core machine) and would keep the port's
    process around that long after a SIGTERM."""
    log.info("stopped by %s%s", signal.Signals(signum).name, when)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def _exit_on_signal(signum, frame) -> None:
    _exit(signum, " while loading")


class _Server(uvicorn.Server):
    """uvicorn's graceful shutdown on SIGINT/SIGTERM, without re-raising the signal afterwards: `serve` exits
    with 128 + the signal's number instead of dying from it (the same code, plus a log line, and fast)."""

    signum: int | None = None

    def handle_exit(self, sig, frame) -> None:
        self.signum = self.signum or sig
        super().handle_exit(sig, frame)

    @contextmanager
    def capture_signals(self):
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
