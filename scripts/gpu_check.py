"""The GPU check (`scripts/gpu_check.sh` runs it): one prepared run, under 8 minutes on one GPU, one summary block.

Stages (`--stages`, comma-separated; all by default):
  bench  `scripts/benchmark.py --mode gpu`: the real fit of configs/bert-base-gpu.yaml beside the plain loop and
         HF Trainer, real tokens/s, MFU with the GPU's dense peak, the validation and checkpoint share;
  sync   a 300-step fit of configs/bert-base-gpu.yaml (a model dir at bert-base's shape, built from a BertConfig
         unless bert-base-uncased is in the Hugging Face cache) with `torch.cuda.set_sync_debug_mode("warn")`:
         every host sync is recorded with the step it happened in; none may fall inside a training step between
         log steps (after the first log interval, where torch.compile compiles);
  fsdp   FSDP with one process, full and sharded state dicts: fit, resume (`--ckpt_path last`) and export; the
         exported weights must equal the checkpoint's;
  families  `scripts/benchmark.py --architecture bert,roberta,modernbert --accelerator gpu` at bert-base's shape:
         real tokens/s per family and the attention each ran (ModernBERT: flash_attention_2 where flash-attn is
         installed, `pip install '.[flash]'`; SDPA otherwise).
`--cpu`: the same plumbing on a CPU, tiny (bench `--tiny`, a 2-layer model, FSDP skipped: Lightning refuses it
without a GPU), so the script itself is tested where there is no GPU.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "bert-base-gpu.yaml"
SHARED_CORPUS = ROOT.parent / "shared" / "data" / "meditations.txt"
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=30522)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


class SyncRecorder(L.Callback):
    """Given to the sync fit by class path: where in the fit each host-sync warning is raised."""

    where = "setup"
    step = 0
    log_step = False
    records: list[tuple[str, int, bool, str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from mlm_lightning.model.module import is_log_step

        cls = SyncRecorder
        cls.where, cls.step, cls.log_step = "train", trainer.global_step + 1, is_log_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        SyncRecorder.where = "between batches"  # after the step's hooks: loop, checkpoints, data fetch

    def on_validation_start(self, trainer, pl_module):
        SyncRecorder.where = "validation"

    def on_validation_end(self, trainer, pl_module):
        SyncRecorder.where = "after validation"


def record_syncs() -> None:
    """Every CUDA sync warning (set_sync_debug_mode), not just the first per call site, goes to SyncRecorder."""
    import torch

    torch.cuda.set_sync_debug_mode("warn")
    warnings.simplefilter("always")
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-2] if "warnings.py" not in f.filename][-4:]
        at = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(frames))
        r = SyncRecorder
        r.records.append((r.where, r.step, r.log_step, at))

    warnings.showwarning = showwarning


def corpus(tmp: str, tokens: int) -> str:
    """The shared corpus (or the offline one) repeated to about `tokens` tokens: one epoch holds the run."""
    from mlm_lightning.data.corpus import default_corpus, iter_texts

    source = str(SHARED_CORPUS) if SHARED_CORPUS.exists() else default_corpus(os.path.join(tmp, "cache"))
    lines = list(iter_texts([source]))
    words = sum(len(x.split()) for x in lines) * 1.3  # ~ WordPiece tokens
    path = os.path.join(tmp, "train.txt")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(max(1, math.ceil(tokens / words))):
            f.writelines(line + "\n" for line in lines)
    return path


def model_dir(tmp: str, train_file: str, cpu: bool) -> tuple[str, str]:
    """bert-base-uncased from the Hugging Face cache, else a random model at its shape (a tiny one with --cpu)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from mlm_lightning.data.corpus import iter_texts
    from mlm_lightning.data.tokenizer import train_wordpiece

    if not cpu:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache("bert-base-uncased", "model.safetensors"), str):
            return "bert-base-uncased", "bert-base-uncased (the cached weights)"
    out = os.path.join(tmp, "model")
    tokenizer = train_wordpiece(iter_texts([train_file]), os.path.join(tmp, "tokenizer"), 8192, 512)
    sizes = TINY if cpu else BERT_BASE
    torch.manual_seed(0)
    config = BertConfig(**{"vocab_size": len(tokenizer), **sizes}, pad_token_id=tokenizer.pad_token_id)
    BertForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    shape = f"{config.num_hidden_layers}x{config.hidden_size}, vocab {config.vocab_size}"
    return out, f"random weights at {'a tiny' if cpu else 'bert-base'} shape ({shape}), from a BertConfig"


def fit_argv(args, model: str, train_file: str, root: str, steps: int, *extra: str) -> list[str]:
    argv = ["fit", "--config", str(CONFIG), "--model.model_name_or_path", model, "--data.train_files", train_file,
            "--trainer.max_steps", str(steps), "--trainer.default_root_dir", root,
            "--data.cache_dir", os.path.join(os.path.dirname(root), "cache"), *extra]
    if args.cpu:
        argv += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.compile", "false",
                 "--data.num_workers", "0", "--data.batch_size", "16", "--trainer.log_every_n_steps", "10"]
    return argv


def run_cli(argv: list[str]) -> int:
    from mlm_lightning.cli.main import main

    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


# -- stages -----------------------------------------------------------------------------------------------------
def run_benchmark(args, name: str, options: list[str], keep) -> list[str]:
    """`scripts/benchmark.py OPTIONS`: its output printed, the summary lines `keep(line)` picks returned."""
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), *options]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.bench_timeout)
    print(done.stdout[-6000:], done.stderr[-3000:] if done.returncode else "", sep="\n", flush=True)
    lines = [line for line in done.stdout.splitlines() if keep(line) and "mlm-lightning" not in line]
    return lines + ([f"{name} FAILED (exit {done.returncode})"] if done.returncode else [])


def stage_bench(args, tmp: str) -> list[str]:
    options = (["--tiny", "--steps", "3", "--warmup", "1", "--precision", "32-true", "--only", "loop,ours"]
               if args.cpu else ["--steps", str(args.bench_steps), "--warmup", "10"])
    return run_benchmark(args, "benchmark", ["--mode", "gpu", *options],
                         lambda line: re.match(r"(device |\([bcd]\)|MFU |\(c\)/)", line))


def stage_families(args, tmp: str) -> list[str]:
    options = (["--tokens", "3000", "--warmup", "1", "--hidden_size", "64", "--layers", "2", "--heads", "2",
                "--intermediate", "128", "--precision", "32-true"] if args.cpu
               else ["--accelerator", "gpu", "--tokens", "1500000", "--warmup", "10", "--hidden_size", "768",
                     "--layers", "12", "--heads", "12", "--intermediate", "3072", "--seq_len", "512",
                     "--batch_size", "32"])
    return run_benchmark(args, "families", ["--architecture", "bert,roberta,modernbert", "--cache_dir",
                                            os.path.join(tmp, "families-cache"), *options],
                         lambda line: "real tokens/s" in line or line.startswith("relative"))


def stage_sync(args, tmp: str) -> list[str]:
    steps = 30 if args.cpu else args.sync_steps
    train = corpus(tmp, steps * (16 if args.cpu else 128) * 128 * 1.1)
    model, what = model_dir(tmp, train, args.cpu)
    root = os.path.join(tmp, "sync")
    if not args.cpu:
        record_syncs()
    start = time.perf_counter()
    code = run_cli(fit_argv(args, model, train, root, steps, "--trainer.callbacks+=gpu_check.SyncRecorder"))
    took = time.perf_counter() - start
    lines = [f"sync fit: configs/bert-base-gpu.yaml, {steps} steps, model {what}: exit {code}, {took:.0f} s"]
    if args.cpu:
        return lines + ["sync fit: no CUDA sync debug mode on a CPU (tests/training/test_host_syncs.py counts there)"]
    import torch

    torch.cuda.set_sync_debug_mode("default")
    every = 50  # the config's log_every_n_steps
    records = SyncRecorder.records
    inside = [r for r in records if r[0] == "train" and not r[2] and r[1] > every]
    warm = [r for r in records if r[0] == "train" and r[1] <= every]
    at_log = [r for r in records if r[0] == "train" and r[2] and r[1] > every]
    other = [r for r in records if r[0] != "train"]
    lines.append(f"host syncs inside training steps between log steps (after step {every}): {len(inside)}"
                 f" (target 0){'' if not inside else ' MISSED: ' + '; '.join(sorted({r[3] for r in inside})[:3])}")
    lines.append(f"host syncs at log steps: {len(at_log)} ({len(at_log) / max(1, steps // every - 1):.1f} per log"
                 f" step); in the first {every} steps (compilation): {len(warm)}; outside training steps"
                 f" (validation, checkpoints, loop): {len(other)}")
    rows = metric_rows(root)
    tps = [float(r["perf/tokens_per_s"]) for r in rows if r.get("perf/tokens_per_s")]
    mfu = [float(r["perf/mfu"]) for r in rows if r.get("perf/mfu")]
    if tps:
        lines.append(f"sync fit, last logged: {tps[-1]:,.0f} real tokens/s" + (f", MFU {mfu[-1]:.1%}" if mfu else "")
                     + " (with sync debug mode on)")
    return lines


def stage_fsdp(args, tmp: str) -> list[str]:
    import torch

    if args.cpu or not torch.cuda.is_available():
        return ["fsdp: skipped (Lightning runs FSDP on GPUs only)"]
    from mlm_lightning.model.checkpoint import load_checkpoint

    train = corpus(tmp, 3 * args.fsdp_steps * 128 * 128)
    model, _ = model_dir(tmp, train, cpu=False)
    lines = []
    for kind in ("full", "sharded"):
        root = os.path.join(tmp, f"fsdp-{kind}")
        fsdp = '{"class_path": "lightning.pytorch.strategies.FSDPStrategy", "init_args": {"state_dict_type": "%s"}}'
        strategy = ["--trainer.strategy", fsdp % kind, "--model.compile", "false"]
        n = args.fsdp_steps
        start = time.perf_counter()
        first = run_cli(fit_argv(args, model, train, root, n, *strategy))
        resumed = run_cli(fit_argv(args, model, train, root, 2 * n, *strategy, "--ckpt_path", "last"))
        last = os.path.join(root, "checkpoints", "last.ckpt")
        out = os.path.join(root, "exported")
        exported = run_cli(["export", "--ckpt_path", last, "--export_dir", out])
        same = "not compared"
        if exported == 0:
            from transformers import AutoModelForMaskedLM

            ours, _ = load_checkpoint(last)
            theirs = AutoModelForMaskedLM.from_pretrained(out)
            a, b = ours.state_dict(), theirs.state_dict()
            same = "equal" if all(torch.equal(a[k].float(), b[k].float()) for k in a if k in b) else "DIFFERENT"
        losses = [float(r["train/loss"]) for r in metric_rows(root) if r.get("train/loss")]
        steps = [int(r["step"]) for r in metric_rows(root) if r.get("train/loss")]
        lines.append(f"fsdp ({kind} state dict, 1 process): fit exit {first}, resume exit {resumed} (last logged"
                     f" step {max(steps, default=-1) + 1}, loss {losses[-1] if losses else float('nan'):.3f}),"
                     f" export exit {exported}, exported weights {same} to the checkpoint's;"
                     f" {time.perf_counter() - start:.0f} s")
    return lines


def metric_rows(root: str) -> list[dict]:
    import csv

    rows = []
    for f in sorted(glob.glob(f"{root}/lightning_logs/*/metrics.csv")):
        with open(f) as fh:
            rows += list(csv.DictReader(fh))
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny, on a CPU: checks the script, says nothing of a GPU")
    p.add_argument("--stages", default="bench,sync,fsdp,families")
    p.add_argument("--bench_steps", type=int, default=50)
    p.add_argument("--bench_timeout", type=int, default=240)
    p.add_argument("--sync_steps", type=int, default=300)
    p.add_argument("--fsdp_steps", type=int, default=20)
    args = p.parse_args(argv)
    sys.modules.setdefault("gpu_check", sys.modules[__name__])  # the fit finds SyncRecorder by this name
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stages = {"bench": stage_bench, "sync": stage_sync, "fsdp": stage_fsdp, "families": stage_families}
    summary, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name in args.stages.split(","):
            t = time.perf_counter()
            try:
                lines = stages[name](args, tmp)
            except Exception as e:  # noqa: BLE001 - one stage failing must not hide the others' results
                lines = [f"{name}: FAILED ({type(e).__name__}: {str(e)[:300]})"]
            summary += lines
            print("\n".join(f"gpu_check: {line}" for line in lines), flush=True)  # (kept if a later stage hangs)
            print(f"gpu_check: stage {name} done in {time.perf_counter() - t:.0f} s", flush=True)
    print("\n======== gpu_check summary ========")
    print("\n".join(summary))
    print(f"(total {time.perf_counter() - start:.0f} s)")
    print("===================================")
    return 1 if any("FAILED" in line or "MISSED" in line for line in summary) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
