"""Throughput (and time-to-quality) of four ways to train the same BERT MLM, measured in one process.

  (a) seed: the seed notebook's recipe: every line padded to 512, masks drawn once for all epochs,
      batch 2, plain loop, dense head (labels on every position, as in the notebook), fp32
  (b) loop: a plain PyTorch loop over our data pipeline (packed blocks, fresh masks, sparse head)
  (c) ours: `MLMModule` + `MLMDataModule` under the Lightning Trainer (the same work as (b))
  (d) hf:   Hugging Face's run_mlm recipe: group_texts blocks, DataCollatorForLanguageModeling, Trainer

Each runs until it has seen about `--tokens` real (non-pad) tokens after `--warmup` steps, then the
script prints real tokens/s, the ratios (c)/(a), (c)/(b), (c)/(d) and the peak RSS.
`--mode quality`: wall time (evaluation excluded) for (a) and (c) to reach the same validation loss.
`--mode gpu`: bert-base on one GPU for (b), (c), (d) with MFU (`scripts/benchmark_gpu.py`; `--mode gpu --help`).
`--architecture bert,roberta,modernbert`: (c) for each model family at the same width and depth, side by side
(each with its own kind of tokenizer trained on the corpus), with the attention each ran (`--accelerator gpu`
with flash-attn installed: ModernBERT's flash_attention_2).

    python scripts/benchmark.py                         # ../shared/data/meditations.txt if present
    python scripts/benchmark.py --precision 32-true --only seed,ours
    python scripts/benchmark.py --mode quality --quality_seconds 120
    python scripts/benchmark.py --architecture bert,roberta,modernbert
    python scripts/benchmark.py --mode gpu                # on a GPU; --tiny --steps 20 for a CPU smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlm_lightning.data import MLMDataModule  # noqa: E402
from mlm_lightning.data.corpus import iter_texts  # noqa: E402
from mlm_lightning.data.offline import default_corpus  # noqa: E402
from mlm_lightning.hub import quiet_transformers  # noqa: E402
from mlm_lightning.model import MLMModule  # noqa: E402
from mlm_lightning.model.arch import FAMILIES  # noqa: E402

SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "meditations.txt"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Meter:
    """Real tokens/s between the end of step `warmup` and the last step."""

    def __init__(self, warmup: int, target_tokens: int):
        self.warmup, self.target, self.step, self.tokens, self.start = warmup, target_tokens, 0, 0, None

    def update(self, real_tokens: int) -> bool:
        """Count one finished step; True when enough tokens were measured."""
        self.step += 1
        if self.step == self.warmup:
            self.start = time.perf_counter()
        elif self.step > self.warmup:
            self.tokens += real_tokens
        return self.tokens >= self.target

    @property
    def rate(self) -> float:
        return self.tokens / (time.perf_counter() - self.start)


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.startswith("bf16"))


def build(args, tokenizer, architecture: str = "bert"):
    torch.manual_seed(0)
    module = MLMModule(architecture=architecture, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads,
                       intermediate_size=args.intermediate, max_position_embeddings=512, dropout=0.1)
    module.tokenizer = tokenizer
    module.configure_model()
    if args.vocab_size > len(tokenizer):  # e.g. 30522: the head costs what it costs with bert-base's vocabulary
        from torchmetrics.classification import MulticlassAccuracy

        module.model.resize_token_embeddings(args.vocab_size)
        module.val_acc = MulticlassAccuracy(num_classes=args.vocab_size, average="micro", ignore_index=-100)
    return module


def datamodule(args, train: str, val: str | None = None, tokenizer_kind: str = "bert") -> MLMDataModule:
    dm = MLMDataModule(train_files=train, val_files=val, max_length=args.seq_len, batch_size=args.batch_size,
                       vocab_size=args.tokenizer_vocab, cache_dir=args.cache_dir, tokenizer_kind=tokenizer_kind)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# -- (a) the seed's recipe ----------------------------------------------------------------------------------
def seed_batches(tokenizer, lines: list[str]):
    enc = tokenizer(lines, return_tensors="pt", max_length=512, truncation=True, padding="max_length")
    labels = enc["input_ids"].clone()  # the notebook's labels: every position, padding included
    special = torch.isin(enc["input_ids"], torch.tensor(tokenizer.all_special_ids))
    mask = (torch.rand(labels.shape) < 0.15) & ~special  # drawn once, reused every epoch
    enc["input_ids"][mask] = tokenizer.mask_token_id
    ds = torch.utils.data.TensorDataset(enc["input_ids"], enc["attention_mask"], labels)
    return torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True)


def run_seed(args, tokenizer, lines, until=None, evaluate=None):
    module = build(args, tokenizer)
    model = module.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    loader = seed_batches(tokenizer, lines)
    meter = Meter(args.warmup, args.tokens)
    while True:
        for ids, attn, labels in loader:
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if until is not None:
                if until(model, meter):
                    return meter
                meter.step += 1
            elif meter.update(int(attn.sum())):
                return meter


# -- (b) a plain loop over our pipeline ---------------------------------------------------------------------
def run_loop(args, dm):
    module = build(args, dm.tokenizer)
    module.train()
    decay = [p for n, p in module.model.named_parameters() if p.ndim >= 2 and "LayerNorm" not in n]
    rest = [p for n, p in module.model.named_parameters() if not (p.ndim >= 2 and "LayerNorm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    meter = Meter(args.warmup, args.tokens)
    epoch = 0
    while True:
        loader = dm.train_dataloader()
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            with autocast(args.precision):
                logits, labels = module(batch)
            loss = F.cross_entropy(logits.float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            if meter.update(batch["num_real_tokens"]):
                return meter
        epoch += 1


# -- (c) ours, under Lightning ------------------------------------------------------------------------------
def run_ours(args, dm, max_steps: int, extra_callbacks=(), val_every: int | None = None, architecture: str = "bert"):
    import lightning as L

    from mlm_lightning.training.callbacks import ThroughputLogger

    class Timing(L.Callback):
        def __init__(self):
            self.meter = Meter(args.warmup, args.tokens)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.meter.update(batch["num_real_tokens"]) and val_every is None:
                trainer.should_stop = True

    module = build(args, dm.tokenizer, architecture)
    timing = Timing()
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, precision=args.precision, max_steps=max_steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=1.0, use_distributed_sampler=False, log_every_n_steps=10,
        limit_val_batches=1.0 if val_every else 0, val_check_interval=val_every, check_val_every_n_epoch=None,
        callbacks=[timing, ThroughputLogger(), *extra_callbacks], num_sanity_val_steps=0,
    )
    dm.trainer = None
    trainer.fit(module, datamodule=dm)
    timing.meter.attention = module.model.config._attn_implementation  # (`auto` resolved: flash or sdpa)
    return timing.meter


# -- (d) Hugging Face's run_mlm recipe ----------------------------------------------------------------------
def run_hf(args, tokenizer, lines):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    ids = tokenizer(lines)["input_ids"]  # run_mlm: tokenize with special tokens, concatenate, cut into blocks
    flat = [t for x in ids for t in x]
    n = len(flat) // args.seq_len * args.seq_len
    blocks = [{"input_ids": flat[i : i + args.seq_len]} for i in range(0, n, args.seq_len)]
    meter = Meter(args.warmup, args.tokens)

    class Timing(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if meter.update(args.batch_size * args.seq_len):
                control.should_training_stop = True

    model = build(args, tokenizer).model
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=10**6, learning_rate=5e-5,
            bf16=args.precision.startswith("bf16"), use_cpu=True, report_to=[], save_strategy="no",
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        )
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
        Trainer(model=model, args=targs, train_dataset=blocks, data_collator=collator,
                callbacks=[Timing()]).train()
    return meter


def evaluator(dm):
    """Mean masked-token loss on the validation split (fixed masks), as `val/loss` computes it."""

    @torch.no_grad()
    def evaluate(model) -> float:
        model.eval()
        total, count = 0.0, 0
        for batch in dm.val_dataloader():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
            total, count = total + loss.item(), count + int((batch["labels"] != -100).sum())
        model.train()
        return total / count

    return evaluate


def quality(args, tokenizer_dm, lines, train_file, val_file):
    """Train (a) for --quality_seconds; then time (c) to the best validation loss (a) reached."""
    import lightning as L

    dm = datamodule(args, train_file, val_file)
    evaluate = evaluator(dm)
    state = {"train_time": 0.0, "t0": time.perf_counter(), "best": math.inf}

    def until(model, meter):
        if meter.step % args.eval_every == 0:
            state["train_time"] += time.perf_counter() - state["t0"]
            state["best"] = min(state["best"], evaluate(model))
            print(f"  seed  step {meter.step:5d}  train {state['train_time']:7.1f} s  val loss {state['best']:.3f}")
            state["t0"] = time.perf_counter()
        return state["train_time"] >= args.quality_seconds

    run_seed(args, dm.tokenizer, lines, until=until)
    target, seed_time = state["best"], state["train_time"]

    class ToTarget(L.Callback):
        def __init__(self):
            self.train_time, self.t0, self.reached = 0.0, None, None

        def on_train_batch_start(self, trainer, *a):
            self.t0 = self.t0 or time.perf_counter()

        def on_validation_start(self, trainer, pl_module):
            self.train_time += time.perf_counter() - self.t0

        def on_validation_end(self, trainer, pl_module):
            loss = float(trainer.callback_metrics["val/loss"])
            print(f"  ours  step {trainer.global_step:5d}  train {self.train_time:7.1f} s  val loss {loss:.3f}")
            if loss <= target:
                self.reached, trainer.should_stop = self.train_time, True
            self.t0 = time.perf_counter()

    to_target = ToTarget()
    # a real step budget: the warmup/decay schedule is a share of max_steps
    run_ours(args, dm, max_steps=args.max_steps_ours, extra_callbacks=[to_target], val_every=args.eval_every_ours)
    print(f"\ntarget val loss {target:.3f} (best of the seed recipe in {seed_time:.0f} s of training)")
    if to_target.reached is None:
        print("ours did not reach it")
    else:
        print(f"seed recipe: {seed_time:.1f} s   ours: {to_target.reached:.1f} s   "
              f"speed-up to the same loss: {seed_time / to_target.reached:.1f}x")


def families(args, corpus: str) -> dict[str, tuple[float, str]]:
    """(c) for each family of --architecture at the same width, depth and vocabulary size: {family: (real
    tokens/s, the attention it ran)} (scripts/gpu_check.py's families stage reads it)."""
    rates, attention = {}, {}
    for name in args.architecture.split(","):
        if name not in FAMILIES or FAMILIES[name].scratch is None:
            sys.exit(f"--architecture {name!r}: not one of {', '.join(n for n, f in FAMILIES.items() if f.scratch)}")
        dm = datamodule(args, corpus, tokenizer_kind=FAMILIES[name].tokenizer)
        meter = run_ours(args, dm, max_steps=10**6, architecture=name)
        rates[name] = meter.rate
        attention[name] = meter.attention
        print(f"{name:12s} {rates[name]:9.0f} real tokens/s   attention {meter.attention}   (peak RSS so far"
              f" {peak_rss_mb():.0f} MB)")
    first = next(iter(rates))
    print("relative to " + first + ": " + ", ".join(f"{n} {r / rates[first]:.2f}x" for n, r in rates.items()))
    return {name: (rate, attention[name]) for name, rate in rates.items()}


def main():
    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--mode")
    if mode.parse_known_args()[0].mode == "gpu":  # its own options and defaults (bert-base, --steps, --tiny)
        import benchmark_gpu

        return benchmark_gpu.main(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", help="text file (default: ../shared/data/meditations.txt, else the offline corpus)")
    p.add_argument("--mode", choices=["throughput", "quality", "gpu"], default="throughput",
                   help="gpu: see --mode gpu --help")
    p.add_argument("--only", default="seed,loop,ours,hf", help="comma-separated subset of seed,loop,ours,hf")
    p.add_argument("--tokens", type=int, default=30_000, help="real tokens measured per recipe")
    p.add_argument("--warmup", type=int, default=3, help="steps before measuring")
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--vocab_size", type=int, default=30522, help="model vocabulary (bert-base-uncased: 30522)")
    p.add_argument("--tokenizer_vocab", type=int, default=8192, help="WordPiece trained on the corpus")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--precision", default="bf16-mixed", help="for (b), (c), (d); the seed recipe stays fp32")
    p.add_argument("--quality_seconds", type=float, default=120)
    p.add_argument("--eval_every", type=int, default=100, help="quality: seed-recipe steps between evaluations")
    p.add_argument("--eval_every_ours", type=int, default=20, help="quality: our steps between evaluations")
    p.add_argument("--max_steps_ours", type=int, default=600, help="quality: our schedule's length in steps")
    p.add_argument("--architecture", default=None,
                   help="comma-separated model families (e.g. bert,roberta,modernbert): (c) for each, side by side")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--accelerator", default="cpu", help="for (c): cpu, or gpu (the GPU check's family stage)")
    args = p.parse_args()
    quiet_transformers()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="mlm-bench-")
    corpus = args.corpus or (str(SHARED_CORPUS) if SHARED_CORPUS.exists() else default_corpus(args.cache_dir))
    lines = list(iter_texts([corpus]))
    print(f"corpus {corpus}: {len(lines)} lines; model {args.layers}x{args.hidden_size}, vocab {args.vocab_size},"
          f" seq {args.seq_len}, batch {args.batch_size}, precision {args.precision} (seed recipe: fp32),"
          f" torch threads {torch.get_num_threads()}")
    if args.mode == "quality":
        with tempfile.TemporaryDirectory() as tmp:
            cut = max(1, len(lines) // 20)
            train_file, val_file = os.path.join(tmp, "train.txt"), os.path.join(tmp, "val.txt")
            Path(train_file).write_text("\n".join(lines[cut:]) + "\n")
            Path(val_file).write_text("\n".join(lines[:cut]) + "\n")
            quality(args, None, lines[cut:], train_file, val_file)
        return
    if args.architecture:
        return families(args, corpus)
    dm = datamodule(args, corpus)
    rates = {}
    runs = {
        "seed": lambda: run_seed(args, dm.tokenizer, lines),
        "loop": lambda: run_loop(args, dm),
        "ours": lambda: run_ours(args, dm, max_steps=10**6),
        "hf": lambda: run_hf(args, dm.tokenizer, lines),
    }
    labels = {"seed": "(a) seed recipe", "loop": "(b) plain loop, our pipeline", "ours": "(c) ours, Lightning fit",
              "hf": "(d) HF run_mlm + Trainer"}
    for name in args.only.split(","):
        try:
            meter = runs[name]()
        except ImportError as e:
            print(f"{labels[name]:32s} skipped: {e} (pip install -e '.[bench]')")
            continue
        rates[name] = meter.rate
        print(f"{labels[name]:32s} {meter.rate:9.0f} real tokens/s   ({meter.tokens} tokens after {args.warmup}"
              f" warm-up steps; peak RSS so far {peak_rss_mb():.0f} MB)")
    if "ours" in rates:
        for other, label in (("seed", "(c)/(a)"), ("loop", "(c)/(b)"), ("hf", "(c)/(d)")):
            if other in rates:
                print(f"{label} = {rates['ours'] / rates[other]:.2f}")


if __name__ == "__main__":
    main()
