"""Load test for `mlm-lightning serve`: N concurrent clients for T seconds on localhost, vs the offline batch path.

Prints requests/s, p50/p99 latency and the server's mean batch size for each concurrency, then the rate of the
same sentences through `FillMasker` in batches (what `mlm-lightning fill-mask` does), and the ratio.
Each request is one sentence with one [MASK], top_k 5, `POST /api/fill-mask`, on a keep-alive connection.

    python scripts/bench_serve.py                                  # demo-shaped random model, 16 clients, 20 s
    python scripts/bench_serve.py --model runs/demo/export --concurrency 1,4,16 --seconds 30
    python scripts/bench_serve.py --model DIR --backend onnx       # DIR from `mlm-lightning export --format onnx`

Without --model it builds a model of the shape `mlm-lightning fit` trains by default (the recipe of
mlm_lightning/configs/default.yaml: its architecture, sizes and vocabulary, the tokenizer its architecture takes,
trained on the default corpus) with random weights: the same compute.
The clients (asyncio, one process) and the server share the machine's cores, as they would on one host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def demo_shaped_model(tmp: str, fmt: str = "hf") -> str:
    import torch

    from mlm_lightning.cli.defaults import demo_recipe
    from mlm_lightning.data.offline import default_corpus
    from mlm_lightning.data.tokenizer import train_tokenizer
    from mlm_lightning.export import save_hf
    from mlm_lightning.model import MLMModule
    from mlm_lightning.model.arch import FAMILIES

    recipe = demo_recipe()
    model = {k.split(".", 1)[1]: v for k, v in recipe.items() if k.startswith("model.")}
    module = MLMModule(**model)
    with open(default_corpus(tmp), encoding="utf-8") as f:
        texts = f.read().splitlines()
    tokenizer = train_tokenizer(FAMILIES[module.hparams.architecture].tokenizer, texts, os.path.join(tmp, "tok"),
                                recipe["data.vocab_size"], module.hparams.max_position_embeddings)
    module.tokenizer = tokenizer
    torch.manual_seed(0)
    module.configure_model()
    return save_hf(module.model.eval(), tokenizer, os.path.join(tmp, "model"), fmt=fmt)


def demo_shape() -> str:
    from mlm_lightning.cli.defaults import demo_recipe

    recipe = demo_recipe()
    return (f"{recipe['model.architecture']} {recipe['model.num_hidden_layers']} x {recipe['model.hidden_size']},"
            f" vocabulary {recipe['data.vocab_size']}")


def masked_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` sentences of 8-30 words from the default corpus (CPython's language reference), one word masked."""
    from mlm_lightning.data.offline import default_corpus

    with tempfile.TemporaryDirectory() as tmp, open(default_corpus(tmp), encoding="utf-8") as f:
        candidates = [s.strip() for line in f for s in re.split(r"(?<=\.) ", line) if 8 <= len(s.split()) <= 30]
    rng = random.Random(seed)
    out = []
    for s in rng.sample(candidates, n):
        words = s.split()
        words[rng.randrange(len(words))] = "[MASK]"
        out.append(" ".join(words))
    return out


def offline_rate(model: str, texts: list[str], seconds: float, backend: str = "torch") -> float:
    """Sentences/s through FillMasker in batches of 64 (the `fill-mask` command's path and default)."""
    from mlm_lightning.model.checkpoint import load_model
    from mlm_lightning.model.fill_mask import FillMasker

    if backend == "onnx":
        from mlm_lightning.serve.onnx_backend import OnnxFillMasker

        masker = OnnxFillMasker(model, top_k=5, batch_size=64)
    else:
        masker = FillMasker(*load_model(model), top_k=5, batch_size=64)
    masker(texts)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        masker(texts)
        done += len(texts)
    return done / (time.perf_counter() - start)


async def client(host: str, port: int, bodies: list[bytes], stop: float, warm: float, latencies: list[float]):
    reader, writer = await asyncio.open_connection(host, port)
    i = random.randrange(len(bodies))
    while True:
        body = bodies[i % len(bodies)]
        i += 1
        start = time.perf_counter()
        if start >= stop:
            break
        writer.write(b"POST /api/fill-mask HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        payload = await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"the server answered {head.splitlines()[0]!r}: {payload[:200]!r}")
        if start >= warm:
            latencies.append(time.perf_counter() - start)
    writer.close()


async def load(url: str, texts: list[str], concurrency: int, seconds: float, warmup: float) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    bodies = [json.dumps({"inputs": t, "parameters": {"top_k": 5}}).encode() for t in texts]
    latencies: list[float] = []
    before = json.loads(urllib.request.urlopen(url + "/health").read())
    now = time.perf_counter()
    warm, stop = now + warmup, now + warmup + seconds
    await asyncio.gather(*(client(host, int(port), bodies, stop, warm, latencies) for _ in range(concurrency)))
    after = json.loads(urllib.request.urlopen(url + "/health").read())
    latencies.sort()
    batches = after["batches"] - before["batches"]
    return {
        "rps": len(latencies) / seconds,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "mean_batch": (after["requests"] - before["requests"]) / max(batches, 1),
    }


def start_server(model: str, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "mlm_lightning.cli", "serve", "--model", model, "--port", "0",
           "--max_batch_size", str(args.max_batch_size), "--max_wait_ms", str(args.max_wait_ms),
           "--backend", args.backend]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        if "serving" in line:
            return proc, re.search(r"http://[^ ]+", line).group(0)
    raise RuntimeError("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model dir or .ckpt (default: a demo-shaped random model)")
    parser.add_argument("--concurrency", default="16", help="comma-separated client counts, e.g. 1,4,16")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per concurrency")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--max_wait_ms", type=float, default=2.0)
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                        help="the server's and the offline path's backend (onnx: the model dir needs model.onnx)")
    parser.add_argument("--threads", type=int, help="torch threads, offline and in the server (default: torch's)")
    args = parser.parse_args()
    if args.threads:  # the server process reads OMP_NUM_THREADS when torch starts; this process sets it directly
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    from mlm_lightning.hub import quiet_transformers

    quiet_transformers()
    logging.getLogger("mlm_lightning").setLevel(logging.ERROR)  # FillMasker's note on truncated long sentences
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MLM_LIGHTNING_CACHE", os.path.join(tmp, "cache"))
        model = args.model or demo_shaped_model(tmp, "onnx" if args.backend == "onnx" else "hf")
        texts = masked_sentences(args.sentences)
        before = offline_rate(model, texts, args.seconds, args.backend)
        proc, url = start_server(model, args)
        try:
            results = [(n, asyncio.run(load(url, texts, n, args.seconds, args.warmup)))
                       for n in map(int, args.concurrency.split(","))]
        finally:
            proc.terminate()
            proc.wait(30)
        # before and after: a shared machine's load drifts
        after = offline_rate(model, texts, args.seconds, args.backend)
    offline = (before + after) / 2
    print(f"model: {args.model or f'demo-shaped ({demo_shape()}), random weights'}; {len(texts)} sentences;"
          f" {os.cpu_count()} CPU cores, torch threads {args.threads or 'default'}; max_batch_size"
          f" {args.max_batch_size}, max_wait_ms {args.max_wait_ms}; backend {args.backend}")
    print(f"offline FillMasker (batches of 64): {offline:.0f} sentences/s (before {before:.0f}, after {after:.0f})")
    for n, r in results:
        print(f"serve, {n:3d} clients: {r['rps']:6.0f} req/s  p50 {r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms"
              f"  mean batch {r['mean_batch']:4.1f}  = {r['rps'] / offline:.0%} of offline")


if __name__ == "__main__":
    main()
