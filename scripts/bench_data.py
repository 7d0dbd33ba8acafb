"""Data-path benchmark: tokenizing a corpus with mlm-lightning vs the Hugging Face `datasets` recipe.

Both use the same fast tokenizer (the project's own WordPiece, trained once on a sample of the corpus
before timing, or `--tokenizer DIR`). Each side runs in a fresh subprocess; the parent samples the summed
anonymous resident memory (RssAnon) of that subprocess and all its children every 0.2 s and prints,
from one run: wall time, MB/s, peak summed memory and the ratios.

  (ours) MLMDataModule(train_files=corpus, tokenizer=DIR).prepare_data()  (shards + join)
  (hf)   load_dataset("text", data_files=corpus) + map(tokenize, batched=True, num_proc=2)

    python scripts/bench_data.py --corpus_mb 300          # builds a varied 300 MB corpus once
    python scripts/bench_data.py --corpus my.txt --only ours

  (s3)   the same as (ours), reading s3://... as a stream: `--s3_server` starts a local S3-compatible server
         (moto, on 127.0.0.1, in this parent process), uploads the corpus and times ours beside s3 in one run;
         `--corpus s3://bucket/key --storage_options '{...}'` reads a real store instead (then --only s3).

    python scripts/bench_data.py --corpus_mb 100 --s3_server --only ours,s3

The HF side needs `pip install -e '.[bench]'` (datasets, psutil); `--s3_server` needs `.[dev]` (moto, s3fs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_corpus(path: Path, mb: float, seed: int = 0) -> None:
    """Varied text: a Zipf-distributed vocabulary of ~60k made-up words, sentences of 5-40 words, numbers,
    commas, capitals and mixed end marks: a tokenizer does real work on it (no tiny repeated vocabulary)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = np.array([12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 5.9, 4.3, 4, 2.8, 2.8, 2.4, 2.4, 2.2, 2, 2, 1.9, 1.5, 1, 0.8,
                     0.2, 0.2, 0.1, 0.1])
    vocab = np.array(sorted({"".join(rng.choice(letters, rng.integers(1, 13), p=freq / freq.sum()))
                             for _ in range(70_000)}))
    rng.shuffle(vocab)
    zipf = 1 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    target, written = int(mb * 2**20), 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            lengths = rng.integers(5, 41, size=5000)
            words = vocab[rng.choice(len(vocab), size=int(lengths.sum()), p=zipf)].astype(object)
            numbers = rng.random(len(words)) < 0.02
            words[numbers] = rng.integers(0, 100_000, size=int(numbers.sum())).astype(str)
            commas = rng.random(len(words)) < 0.04
            words[commas] = words[commas] + ","
            ends = np.cumsum(lengths)
            starts = ends - lengths
            caps = rng.random(len(lengths)) < 0.5
            words[starts[caps]] = [w.capitalize() for w in words[starts[caps]]]
            marks = rng.choice([".", ".", ".", "?", "!", ";"], size=len(lengths))
            lines = [" ".join(words[a:b]) + m for a, b, m in zip(starts, ends, marks, strict=True)]
            text = "\n".join(lines) + "\n"
            f.write(text)
            written += len(text.encode())
    os.replace(tmp, path)


def sampled_peak_mb(cmd: list[str], env: dict) -> tuple[float, float, int]:
    """Run `cmd`; return (wall seconds, peak summed RssAnon MB of the process tree, exit code)."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    with open(f"/proc/{p.pid}/status") as f:
                        for line in f:
                            if line.startswith("RssAnon:"):
                                total += int(line.split()[1]) * 1024
                except OSError:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.2)
    return time.perf_counter() - start, peak / 2**20, proc.returncode


def run_ours(corpus: str, tokenizer: str, cache: str) -> None:
    sys.path.insert(0, str(ROOT))
    from mlm_lightning.data import MLMDataModule

    options = json.loads(os.environ.get("BENCH_STORAGE_OPTIONS") or "null")
    MLMDataModule(train_files=corpus, tokenizer=tokenizer, cache_dir=cache, storage_options=options).prepare_data()


def start_s3(corpus: str) -> tuple[object, str, dict]:
    """A moto S3 server on 127.0.0.1 holding `corpus` as s3://bench/<name>: (server, URL, storage options)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # (one log line per request otherwise)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(k, "bench")  # (moto accepts any; the child processes inherit them)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="bench")
    client.upload_file(corpus, "bench", os.path.basename(corpus))
    return server, f"s3://bench/{os.path.basename(corpus)}", {"client_kwargs": {"endpoint_url": endpoint}}


def run_hf(corpus: str, tokenizer: str, cache: str) -> None:
    from datasets import disable_caching, load_dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    ds = load_dataset("text", data_files=corpus, split="train", cache_dir=cache)
    disable_caching()  # the map result still goes to Arrow files in a temp dir, as in run_mlm

    def tokenize(batch):
        return tok(batch["text"], add_special_tokens=False, return_attention_mask=False)

    out = ds.map(tokenize, batched=True, num_proc=2, remove_columns=["text"])
    print(f"hf: {sum(len(x) for x in out[:1000]['input_ids'])} tokens in the first 1000 lines", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", help="a text file (default: build one of --corpus_mb)")
    p.add_argument("--corpus_mb", type=float, default=300)
    p.add_argument("--tokenizer", help="tokenizer dir (default: our WordPiece, 8192, trained on a 100 MB sample)")
    p.add_argument("--workdir", default=None, help="where the corpus, tokenizer and caches go (default: a temp dir)")
    p.add_argument("--only", default="ours,hf", help="sides to time: ours, hf, s3")
    p.add_argument("--s3_server", action="store_true", help="serve the corpus from a local S3 server for the s3 side")
    p.add_argument("--storage_options", default=None, help="fsspec options (JSON) for a --corpus URL")
    p.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        side, corpus, tokenizer = args._child
        cache = tempfile.mkdtemp(dir=os.environ["BENCH_WORK"], prefix=f"cache-{side}-")
        (run_hf if side == "hf" else run_ours)(corpus, tokenizer, cache)
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus
    if corpus is None:
        corpus = str(work / f"corpus-{args.corpus_mb:g}mb.txt")
        if not os.path.exists(corpus):
            print(f"building a {args.corpus_mb:g} MB corpus at {corpus}", flush=True)
            build_corpus(Path(corpus), args.corpus_mb)
    url, options, server = None, json.loads(args.storage_options or "null"), None
    if "://" in corpus:  # a real store: only the s3 side can read it (the tokenizer must be given)
        url, corpus = corpus, None
        assert args.tokenizer, "--tokenizer DIR is needed with a --corpus URL"
        sys.path.insert(0, str(ROOT))
        from mlm_lightning.data import corpus as corpora

        size_mb = corpora.file_size(url, options) / 2**20
    else:
        size_mb = os.path.getsize(corpus) / 2**20
    if args.s3_server:
        server, url, options = start_s3(corpus)
        print(f"serving the corpus as {url} from a local S3 server ({options['client_kwargs']['endpoint_url']})")
    tokenizer = args.tokenizer
    if tokenizer is None:
        sys.path.insert(0, str(ROOT))
        from mlm_lightning.data import MLMDataModule

        dm = MLMDataModule(train_files=corpus, cache_dir=str(work / "tok-cache"), vocab_size=8192)
        t = time.perf_counter()
        tok = dm.load_tokenizer(train_if_missing=True)
        tokenizer = dm._tokenizer_dir()
        print(f"tokenizer: WordPiece {len(tok)} tokens trained on a 100 MB sample in "
              f"{time.perf_counter() - t:.0f} s (not timed below): {tokenizer}", flush=True)
    env = dict(os.environ, BENCH_WORK=str(work), TOKENIZERS_PARALLELISM="true", HF_DATASETS_OFFLINE="1",
               BENCH_STORAGE_OPTIONS=json.dumps(options))
    results = {}
    for side in args.only.split(","):
        cmd = [sys.executable, __file__, "--_child", side, url if side == "s3" else corpus, tokenizer]
        wall, peak, code = sampled_peak_mb(cmd, env)
        if code != 0:
            print(f"{side}: failed with exit code {code}")
            continue
        results[side] = (wall, peak)
        print(f"{side:>4}: {wall:7.1f} s  {size_mb / wall:6.2f} MB/s  peak summed RssAnon {peak:7.0f} MB", flush=True)
    for other in ("hf", "s3"):
        if "ours" in results and other in results:
            (w0, m0), (w1, m1) = results["ours"], results[other]
            ratio = f"{other}/ours: wall {w1 / w0:.2f}x, memory {m1 / m0:.2f}x" if other == "s3" else \
                f"ours/hf: wall {w0 / w1:.2f}x, memory {m0 / m1:.2f}x"
            print(f"{ratio}  ({size_mb:.0f} MB corpus, {os.cpu_count()} CPUs)")
    if server is not None:
        server.stop()
    print(json.dumps({"corpus_mb": round(size_mb, 1), **{k: {"wall_s": round(v[0], 1), "peak_mb": round(v[1])}
                                                         for k, v in results.items()}}))


if __name__ == "__main__":
    main()
