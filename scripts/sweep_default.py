"""Choose the offline default's recipe by measurement: each setting trains for the same wall time on the
offline default corpus, then all are scored on ONE validation split (the corpus's held-out modules, packed
64-token blocks, token masking, the same seed), in one table.

Equal wall time with a step-based schedule: a short timing probe (a few forward/backward steps of the
setting's model on random tokens) sizes `--trainer.max_steps` to 1.5x what fits the budget, and
`--trainer.max_time` stops every run at the budget, at the same point of its learning-rate decay (on a shared
machine a probe is off by 2x either way, so it cannot size the schedule to end exactly on time).

    python scripts/sweep_default.py                          # every setting, 75 s each
    python scripts/sweep_default.py --seconds 280 --only today,new   # the full five-minute runs
    python scripts/sweep_default.py --list
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mlm_lightning.data import MLMDataModule  # noqa: E402
from mlm_lightning.data.offline import default_corpus_files  # noqa: E402

# today's recipe (configs/default.yaml before the sweep), spelled out so the sweep does not depend on that file
TODAY = {"model.hidden_size": 128, "model.num_hidden_layers": 2, "model.num_attention_heads": 2,
         "model.intermediate_size": 512, "model.dropout": 0.0, "model.learning_rate": 1e-3,
         "model.warmup_steps": 0.06, "data.max_length": 64, "data.batch_size": 16, "data.vocab_size": 8192,
         "data.masking": "token", "trainer.precision": "32-true", "trainer.gradient_clip_val": 1.0,
         "seed_everything": 42}
WIDE = {"model.hidden_size": 256, "model.num_hidden_layers": 4, "model.num_attention_heads": 4,
        "model.intermediate_size": 1024}
SETTINGS = {
    "today": {},
    "4x256": WIDE,
    "4x256-lr5e-4": {**WIDE, "model.learning_rate": 5e-4},
    "len128": {"data.max_length": 128},
    "batch32-lr2e-3": {"data.batch_size": 32, "model.learning_rate": 2e-3},
    "lr3e-3": {"model.learning_rate": 3e-3},
    "whole_word": {"data.masking": "whole_word"},
    "bf16": {"trainer.precision": "bf16-mixed"},
}
COMMON_EVAL = {"data.max_length": 64, "data.masking": "token"}  # the one split every setting is scored on


def flags(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def probe_steps_per_s(cfg: dict, steps: int = 8) -> float:
    """Training steps per second of the setting's model on random tokens (as `arch` builds it: a BERT).

    The median step: on a shared machine one slow step (another process's burst) should not size the run."""
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(
        vocab_size=cfg["data.vocab_size"], hidden_size=cfg["model.hidden_size"],
        num_hidden_layers=cfg["model.num_hidden_layers"], num_attention_heads=cfg["model.num_attention_heads"],
        intermediate_size=cfg["model.intermediate_size"], max_position_embeddings=512,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(5, cfg["data.vocab_size"], (cfg["data.batch_size"], cfg["data.max_length"]))
    masked = torch.rand(ids.shape) < 0.15
    bf16 = cfg["trainer.precision"].startswith("bf16")
    times = []
    for _ in range(steps + 2):  # (the first two warm up allocators and kernels)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = model.bert(input_ids=ids).last_hidden_state[masked]  # the head on masked positions only,
            loss = torch.nn.functional.cross_entropy(model.cls(hidden), ids[masked])  # as `sparse_head` does
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return 1 / statistics.median(times[2:])


def hms(seconds: float) -> str:
    return f"00:00:{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


def mlm(*args: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "mlm_lightning.cli", *args], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def last_val(root: str) -> tuple[float, float]:
    """(val/ppl, val/acc) of the last validation a run logged."""
    rows = []
    for f in sorted(glob.glob(f"{root}/lightning_logs/*/metrics.csv")):
        with open(f) as fh:
            rows += [r for r in csv.DictReader(fh) if r.get("val/ppl")]
    r = rows[-1]
    return float(r["val/ppl"]), float(r["val/acc"])


def run(name: str, cfg: dict, seconds: float, workdir: str, cache: str, env: dict) -> dict:
    rate = probe_steps_per_s(cfg)
    # a shared machine's speed changes under the probe: plan 1.5x the steps it predicts, so every setting is
    # stopped by max_time (equal wall time) at the same point of its schedule (the learning rate still ~1/3 up)
    steps = max(20, int(rate * seconds * 1.5))
    root = os.path.join(workdir, name)
    start = time.perf_counter()
    mlm("fit", *flags(cfg), "--data.cache_dir", cache, "--trainer.accelerator", "cpu",
        "--trainer.max_steps", str(steps), "--trainer.max_time", hms(seconds),
        "--trainer.default_root_dir", root, "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "50", "--export_dir", os.path.join(root, "export"), env=env)
    wall = time.perf_counter() - start
    # scored by `validate` on the common split: a run stopped by max_steps or max_time mid-epoch has not
    # validated at its end, and max_length or masking may differ from the common split's
    config = sorted(glob.glob(f"{root}/lightning_logs/*/config.yaml"))[-1]
    mlm("validate", "--config", config, *flags(COMMON_EVAL), "--ckpt_path", os.path.join(root, "checkpoints",
        "last.ckpt"), "--trainer.default_root_dir", os.path.join(root, "eval"), env=env)
    ppl, acc = last_val(os.path.join(root, "eval"))
    done = int(torch.load(os.path.join(root, "checkpoints", "last.ckpt"), map_location="cpu",
                          weights_only=False)["global_step"])
    return {"setting": name, "steps": done, "planned": steps, "wall_s": wall, "ppl": ppl, "acc": acc}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=75, help="wall time of each fit (max_time)")
    p.add_argument("--only", default=None, help="comma-separated settings (default: all; see --list)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "mlm-sweep-cache"))
    p.add_argument("--workdir", default=None, help="where the runs go (default: a new temporary directory)")
    args = p.parse_args()
    if args.list:
        for name, over in SETTINGS.items():
            print(f"{name:16s} {over or '(configs/default.yaml before the sweep)'}")
        return
    names = args.only.split(",") if args.only else list(SETTINGS)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1"}
    train, val = default_corpus_files(args.cache_dir)
    print(f"corpus: {os.path.getsize(train):,} bytes train, {os.path.getsize(val):,} bytes held out ({val});"
          f" torch {torch.__version__}, {torch.get_num_threads()} threads, {args.seconds:.0f} s a setting",
          flush=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="mlm-sweep-")
    # the vocabulary and the tokenized corpus, once for all settings (max_length and masking apply at load)
    MLMDataModule(cache_dir=args.cache_dir, vocab_size=TODAY["data.vocab_size"]).prepare_data()
    rows = []
    for name in names:
        cfg = {**TODAY, **SETTINGS[name]}
        rows.append(run(name, cfg, args.seconds, workdir, args.cache_dir, env))
        r = rows[-1]
        print(f"  {name}: val/ppl {r['ppl']:.1f}, val/acc {r['acc']:.3f}, {r['steps']} steps in {r['wall_s']:.0f} s",
              flush=True)
    print("\n| setting | steps (planned) | fit wall s | val/ppl | val/acc |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['steps']} ({r['planned']}) | {r['wall_s']:.0f} | {r['ppl']:.1f} |"
              f" {r['acc']:.3f} |")


if __name__ == "__main__":
    main()
