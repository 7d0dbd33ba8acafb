"""Training throughput alone and beside one competing busy process, per thread setting: the share a fit keeps.

    python scripts/bench_threads.py [--seconds 20] [--repeats 2] [--variants default,passive,one-thread,chosen]

Each measurement is a fresh process (OpenMP reads its environment once, at start) that trains the offline default's
model (configs/default.yaml: a 2 x 128 ModernBERT, 4,096-token vocabulary, batches of 16 x 64 tokens, 30% masked,
AdamW) on random tokens for `--seconds` after a warm-up, and reports optimizer steps per second. "busy" runs one
competing process beside it: a Python busy loop, which takes one core whole. Each variant runs alone then busy,
back to back, `--repeats` times; the last column is busy over alone (1.0: the competitor costs nothing; a fair
share of 2 cores against one single-threaded job is ~0.5 and more).

Variants (the measuring process's thread settings):
- default: torch's own (intra-op threads = the cores torch sees; libgomp spins waiting threads ~0.3 ms);
- passive: OMP_WAIT_POLICY=PASSIVE (waiting threads sleep at once instead of spinning);
- one-thread: torch.set_num_threads(1);
- chosen: what every `mlm-lightning` command applies (`mlm_lightning.cli.main.openmp_defaults`).
The machine's load (`os.getloadavg`) is printed before and after: other jobs distort both columns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "default": ({}, 0),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0),
    "one-thread": ({}, 1),
    "chosen": ({}, -1),  # (its environment is set inside the measuring process, as main() does)
}


def measure(threads: int, seconds: float) -> dict:
    """Steps/s of the default model's training loop in this process (`threads`: 0 torch's default, -1 ours)."""
    if threads == -1:  # (before torch is imported: OpenMP reads its environment once)
        from mlm_lightning.cli.main import openmp_defaults

        openmp_defaults()
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from mlm_lightning.model import arch

    class Vocabulary:  # what new_model reads of a tokenizer
        pad_token_id, cls_token_id, sep_token_id = 0, 1, 2

        def __len__(self):
            return 4096

    torch.manual_seed(0)
    model = arch.new_model("modernbert", Vocabulary(), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=512, max_position_embeddings=64, dropout=0.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(5, 4096, (16, 64))
    labels = torch.where(torch.rand(16, 64) < 0.3, ids, torch.full_like(ids, -100))

    def step():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    end = time.perf_counter() + 3  # warm-up: allocator, first-call dispatch
    while time.perf_counter() < end:
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return {"steps_per_s": steps / (time.perf_counter() - start), "threads": torch.get_num_threads()}


def child(variant: str, seconds: float, busy: bool) -> dict:
    env_extra, threads = VARIANTS[variant]
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "KMP_", "MKL_"))}  # (a clean start)
    env = {**inherited, "PYTHONPATH": ROOT, **env_extra}
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, __file__, "--child", str(threads), "--seconds", str(seconds)], env=env,
                             capture_output=True, text=True, check=True).stdout
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured training seconds per run")
    parser.add_argument("--repeats", type=int, default=2, help="alone/busy pairs per variant, back to back")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.seconds)))
        return
    print(f"cores: {os.cpu_count()}, load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'variant':<11} {'threads':>7} {'alone steps/s':>13} {'busy steps/s':>12} {'busy/alone':>10}")
    for variant in args.variants.split(","):
        for _ in range(args.repeats):
            alone = child(variant, args.seconds, busy=False)
            busy = child(variant, args.seconds, busy=True)
            print(f"{variant:<11} {alone['threads']:>3}/{busy['threads']:<3} {alone['steps_per_s']:>13.2f}"
                  f" {busy['steps_per_s']:>12.2f} {busy['steps_per_s'] / alone['steps_per_s']:>10.2f}", flush=True)
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
