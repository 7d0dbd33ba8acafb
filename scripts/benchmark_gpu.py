"""`python scripts/benchmark.py --mode gpu`: bert-base on one GPU, three ways, in one run.

  (b) loop: a plain PyTorch loop over our data pipeline (packed blocks, fresh masks, sparse head)
  (c) ours: the real `mlm-lightning fit --config configs/bert-base-gpu.yaml` (in this process), with its
      progress bar, logging, checkpoints and validation; the validation and checkpoint writes that follow the
      timed steps are timed on their own, and their share at the config's intervals is reported
  (d) hf:   Hugging Face's run_mlm recipe: group_texts blocks, DataCollatorForLanguageModeling, Trainer

All three start from one model directory: bert-base's shape (12 layers x 768, 12 heads, intermediate 3072, vocab
30,522) built from a `BertConfig` (or `--model DIR`), seq 128, bf16-mixed; (b) and (c) compiled as the config says
(`--no-compile` to turn it off), (d) as run_mlm runs it (`--hf_compile`); `--tiny`: 2 x 128 with the trained
tokenizer's vocabulary, a smoke run on a CPU.
Each recipe runs `--warmup` untimed steps, then `--steps` timed ones; the device is synchronized before the clock
is read at both ends (and never in between).
Prints real tokens/s, MFU (FLOPs from `train_flops`: the matmuls each recipe runs, i.e. the head at masked
positions for (b)/(c) and at every position for (d); peak from `callbacks.peak_flops` (a table of dense peaks; an
unknown GPU gets no MFU) or `--peak_tflops`), the ratios (c)/(b), (c)/(d) and the targets.

    python scripts/benchmark.py --mode gpu                       # on a GPU
    python scripts/benchmark.py --mode gpu --batch_size 256
    python scripts/benchmark.py --mode gpu --tiny --steps 20     # smoke run, CPU ok
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlm_lightning.cli.main import main as cli_main  # noqa: E402
from mlm_lightning.data import MLMDataModule  # noqa: E402
from mlm_lightning.data.corpus import iter_texts  # noqa: E402
from mlm_lightning.data.offline import default_corpus  # noqa: E402
from mlm_lightning.data.tokenizer import train_wordpiece  # noqa: E402
from mlm_lightning.errors import check  # noqa: E402
from mlm_lightning.model import MLMModule  # noqa: E402
from mlm_lightning.model.arch import train_flops  # noqa: E402
from mlm_lightning.training.callbacks import peak_flops  # noqa: E402

SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "meditations.txt"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "bert-base-gpu.yaml"
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
TARGETS = {"loop": 0.95, "hf": 2.0, "mfu": 0.45}  # the goals: fit >= 0.95x loop, >= 2x HF, MFU >= 45% on H100


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepMeter:
    """Real tokens and FLOPs of the `steps` steps after `warmup`, timed between two device syncs."""

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.step, self.tokens, self.flops, self.start, self.seconds = 0, 0, 0, None, None

    def update(self, real_tokens: int, flops: int) -> bool:
        """Count one finished step (Python ints only: no sync); True after the last timed step."""
        self.step += 1
        if self.step > self.warmup:
            self.tokens += real_tokens
            self.flops += flops
        if self.step == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()
        elif self.step == self.warmup + self.steps:
            sync(self.device)
            self.seconds = time.perf_counter() - self.start
        return self.seconds is not None


def batch_flops(config, batch: dict) -> int:
    """FLOPs of one step of our pipeline (sparse head): shapes only, no device sync."""
    return train_flops(config, batch["input_ids"].shape[1], batch["num_tokens"], batch["masked_positions"].numel())


def build(args, tokenizer, compile: bool) -> MLMModule:
    torch.manual_seed(0)
    module = MLMModule(model_name_or_path=args.model_dir, compile=compile)
    module.tokenizer = tokenizer
    module.configure_model()
    return module


def model_dir(args, tmp: str) -> str:
    """The model all recipes start from: `--model`, or a random one of `args.shape` saved with the tokenizer."""
    if args.model:
        return args.model
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=args.vocab_size or len(tokenizer), max_position_embeddings=512,
                        pad_token_id=tokenizer.pad_token_id, **args.shape)
    out = os.path.join(tmp, "model")
    BertForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def datamodule(args) -> MLMDataModule:
    dm = MLMDataModule(train_files=args.train_file, tokenizer=args.model_dir, max_length=args.seq_len,
                       batch_size=args.batch_size, num_workers=args.num_workers, cache_dir=args.cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# -- (b) a plain loop over our pipeline ---------------------------------------------------------------------
def run_loop(args):
    from transformers import get_linear_schedule_with_warmup

    dm = datamodule(args)
    module = build(args, dm.tokenizer, args.compile).to(args.device).train()
    decay = [p for n, p in module.model.named_parameters() if p.ndim >= 2 and "LayerNorm" not in n]
    rest = [p for n, p in module.model.named_parameters() if not (p.ndim >= 2 and "LayerNorm" not in n)]
    cuda = args.device.type == "cuda"
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=cuda or None)
    sched = get_linear_schedule_with_warmup(opt, 10, args.warmup + args.steps)
    ours = dm.train_dataloader()
    # the same dataset, batch plan and collator as (c), with pinned memory for non-blocking copies
    loader = torch.utils.data.DataLoader(ours.dataset, batch_sampler=ours.batch_sampler, collate_fn=ours.collate_fn,
                                         num_workers=args.num_workers, pin_memory=cuda)
    meter = StepMeter(args.warmup, args.steps, args.device)
    config = module.model.config
    for batch in loader:
        batch = {k: v.to(args.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(args.device.type, dtype=args.dtype, enabled=args.dtype != torch.float32):
            logits, labels = module(batch)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if meter.update(batch["num_real_tokens"], batch_flops(config, batch)):
            return meter, {}
    raise SystemExit(f"(b) ran out of data after {meter.step} steps; lower --steps")


# -- (c) ours: the real fit ---------------------------------------------------------------------------------
class FitTimer(L.Callback):
    """(c)'s clocks, given to the fit by class path (`benchmark_gpu.FitTimer`): the `StepMeter` over the training
    steps, and on their own the validations and the checkpoint saves (training-thread time, between syncs)."""

    meter: StepMeter | None = None
    validations: list[float] = []
    saves: list[float] = []

    def on_train_start(self, trainer, pl_module):
        device, save = pl_module.device, trainer.save_checkpoint

        def timed_save(*args, **kwargs):
            sync(device)
            start = time.perf_counter()
            save(*args, **kwargs)
            sync(device)
            FitTimer.saves.append(time.perf_counter() - start)

        trainer.save_checkpoint = timed_save

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        FitTimer.meter.update(batch["num_real_tokens"], batch_flops(pl_module.model.config, batch))

    def on_validation_start(self, trainer, pl_module):
        sync(pl_module.device)
        self.start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            sync(pl_module.device)
            FitTimer.validations.append(time.perf_counter() - self.start)


def run_ours(args):
    total = args.warmup + args.steps
    FitTimer.meter, FitTimer.validations, FitTimer.saves = StepMeter(args.warmup, args.steps, args.device), [], []
    with tempfile.TemporaryDirectory() as root:
        argv = ["fit", "--config", str(CONFIG), "--model.model_name_or_path", args.model_dir,
                "--data.train_files", args.train_file, "--data.max_length", str(args.seq_len),
                "--data.batch_size", str(args.batch_size), "--data.num_workers", str(args.num_workers),
                "--data.cache_dir", args.cache_dir, "--model.compile", str(args.compile).lower(),
                "--trainer.precision", args.precision, "--trainer.max_steps", str(total),
                # one validation, right after the timed steps (the config's own interval is longer than this run)
                "--trainer.val_check_interval", str(total), "--trainer.default_root_dir", root,
                "--trainer.callbacks+=benchmark_gpu.FitTimer"]
        if args.device.type != "cuda":
            argv += ["--trainer.accelerator", "cpu"]
        try:
            cli_main(argv)
        except SystemExit as e:
            check(not e.code, f"(c) mlm-lightning fit failed (exit {e.code})")
    meter = FitTimer.meter
    check(meter.seconds is not None, f"(c) ran out of data after {meter.step} steps; lower --steps")
    return meter, {"validation_s": FitTimer.validations, "save_s": FitTimer.saves}


def shipped_overhead(meter: StepMeter, extra: dict) -> str | None:
    """What the validations and checkpoint saves cost at the config's intervals, from the ones (c) timed."""
    trainer = yaml.safe_load(CONFIG.read_text())["trainer"]
    every = trainer.get("val_check_interval")
    if not extra.get("validation_s") or not isinstance(every, int):
        return None
    step = meter.seconds / meter.steps
    val, saves = extra["validation_s"][-1], sum(extra["save_s"])  # the final validation and its saves
    share = (val + saves) / (every * step + val + saves)
    return (f"(c) at the config's intervals: a validation ({val:.2f} s) and {len(extra['save_s'])} checkpoint"
            f" write(s) ({saves:.2f} s on the training thread) every {every} steps of {step * 1000:.1f} ms:"
            f" {share:.1%} of the fit's time (validation {val / (every * step + val + saves):.1%},"
            f" checkpoints {saves / (every * step + val + saves):.1%})")


# -- (d) Hugging Face's run_mlm recipe ----------------------------------------------------------------------
def run_hf(args):
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    # run_mlm: tokenize with special tokens, concatenate everything, cut into blocks (the repeated corpus is
    # the original one N times: tokenize it once)
    ids = tokenizer(args.lines)["input_ids"]
    flat = list(itertools.chain.from_iterable(ids)) * args.repeats
    n = len(flat) // args.seq_len * args.seq_len
    blocks = [{"input_ids": flat[i : i + args.seq_len]} for i in range(0, n, args.seq_len)]
    model = build(args, tokenizer, compile=False).model
    meter = StepMeter(args.warmup, args.steps, args.device)
    # the dense head: BertForMaskedLM(labels=...) computes logits at every position
    step_flops = train_flops(model.config, args.seq_len, args.batch_size * args.seq_len, args.batch_size * args.seq_len)

    class Timing(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if meter.update(args.batch_size * args.seq_len, step_flops):
                control.should_training_stop = True

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
            learning_rate=1e-4, bf16=args.dtype == torch.bfloat16, fp16=args.dtype == torch.float16,
            use_cpu=args.device.type != "cuda", report_to=[], save_strategy="no", disable_tqdm=True,
            dataloader_num_workers=args.num_workers, torch_compile=args.hf_compile, logging_steps=50,
        )
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
        Trainer(model=model, args=targs, train_dataset=blocks, data_collator=collator, callbacks=[Timing()]).train()
    check(meter.seconds is not None, f"(d) ran out of data after {meter.step} steps; lower --steps")
    return meter, {}


# -- setup and report ---------------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmark.py --mode gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["gpu"], default="gpu")
    p.add_argument("--corpus", help="text file (default: ../shared/data/meditations.txt, else the offline corpus),"
                   " repeated until one epoch holds every step")
    p.add_argument("--only", default="loop,ours,hf", help="comma-separated subset of loop,ours,hf")
    p.add_argument("--steps", type=int, default=100, help="timed steps per recipe")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, allocator, workers)")
    p.add_argument("--batch_size", type=int, default=None, help="default: 128 (--tiny: 8)")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "16-mixed", "32-true"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile: the encoder in (b)/(c), HF's torch_compile (default: as the config says;"
                   " off with --tiny)")
    p.add_argument("--hf_compile", action="store_true",
                   help="(d) with torch_compile too (run_mlm's recipe does not compile by default)")
    p.add_argument("--model", default=None, help="a local model dir to start from (default: a random bert-base)")
    p.add_argument("--tiny", action="store_true", help="2 layers x 128, the trained tokenizer's vocabulary: CPU ok")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="peak dense TFLOP/s of the device for MFU (default: callbacks.peak_flops's table)")
    p.add_argument("--num_workers", type=int, default=None, help="loader workers, all recipes (default: GPU 4, CPU 0)")
    p.add_argument("--tokenizer_vocab", type=int, default=8192, help="WordPiece trained on the corpus")
    p.add_argument("--cache_dir", default=None, help="tokenized corpus cache (default: a temporary directory)")
    args = p.parse_args(argv)
    check(args.warmup >= 1 and args.steps >= 1, "--warmup and --steps must be at least 1")
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check(args.tiny or args.device.type == "cuda",
          "no GPU here: --mode gpu needs one for bert-base; add --tiny for a smoke run on CPU")
    args.shape = TINY if args.tiny else BERT_BASE
    args.vocab_size = None if args.tiny else 30522
    args.batch_size = args.batch_size or (8 if args.tiny else 128)
    args.num_workers = args.num_workers if args.num_workers is not None else (4 if args.device.type == "cuda" else 0)
    if args.compile is None:
        args.compile = not args.tiny and bool(yaml.safe_load(CONFIG.read_text())["model"].get("compile"))
    args.dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision, torch.float32)
    return args


def prepare_corpus(args, tmp: str) -> None:
    """Train the tokenizer once, then repeat the corpus until one epoch covers every step of a recipe (an epoch
    boundary costs Lightning more than a plain loop; a real corpus has few of them)."""
    corpus = args.corpus or (str(SHARED_CORPUS) if SHARED_CORPUS.exists() else default_corpus(args.cache_dir))
    args.lines = list(iter_texts([corpus]))
    args.tokenizer_dir = os.path.join(tmp, "tokenizer")
    tokenizer = train_wordpiece(iter(args.lines), args.tokenizer_dir, args.tokenizer_vocab, args.seq_len)
    tokens = sum(len(x) + 1 for x in tokenizer(args.lines, add_special_tokens=False)["input_ids"])
    needed = (args.warmup + args.steps + 2) * args.batch_size * args.seq_len / 0.95 * 1.1  # 5% validation split
    args.repeats = max(1, math.ceil(needed / tokens))
    args.train_file = os.path.join(tmp, "train.txt")
    with open(args.train_file, "w", encoding="utf-8") as f:
        for _ in range(args.repeats):
            f.writelines(line + "\n" for line in args.lines)
    print(f"corpus {corpus}: {len(args.lines)} lines, {tokens} tokens, repeated {args.repeats}x")


def quiet() -> None:
    import logging
    import warnings

    from mlm_lightning.hub import quiet_transformers

    quiet_transformers()
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str]) -> dict:
    args = parse(argv)
    print("$ python " + shlex.join(["scripts/benchmark.py", *argv]))
    quiet()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(args.device, args.dtype)
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    shape = args.shape
    print(f"device {name}; peak {peak / 1e12 if peak else float('nan'):.1f} TFLOP/s ({args.precision}); torch"
          f" {torch.__version__}; model {shape['num_hidden_layers']}x{shape['hidden_size']}, heads"
          f" {shape['num_attention_heads']}, intermediate {shape['intermediate_size']}, vocab"
          f" {args.vocab_size or 'of the trained tokenizer'}; seq {args.seq_len}, batch {args.batch_size},"
          " packed blocks;"
          f" compile {args.compile}; {args.warmup} warm-up + {args.steps} timed steps; workers {args.num_workers}")
    if peak is None:
        print("peak FLOP/s unknown for this device: no MFU (pass --peak_tflops, the dense peak for this precision)")
    labels = {"loop": "(b) plain loop, our pipeline", "ours": "(c) ours, Lightning fit",
              "hf": "(d) HF run_mlm + Trainer"}
    runs = {"loop": run_loop, "ours": run_ours, "hf": run_hf}
    rates, mfus, ms_per_step, overhead = {}, {}, {}, None
    with tempfile.TemporaryDirectory(prefix="mlm-bench-") as tmp:
        args.cache_dir = args.cache_dir or os.path.join(tmp, "cache")
        prepare_corpus(args, tmp)
        args.model_dir = model_dir(args, tmp)
        for key in args.only.split(","):
            check(key in runs, f"--only takes loop, ours, hf; got {key!r}")
            if args.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(args.device)
            try:
                meter, reported = runs[key](args)
            except ImportError as e:
                print(f"{labels[key]:30s} skipped: {e} (pip install -e '.[bench]')")
                continue
            rates[key] = meter.tokens / meter.seconds
            mfus[key] = meter.flops / meter.seconds / peak if peak else None
            mem = (f", peak GPU memory {torch.cuda.max_memory_allocated(args.device) / 2**30:.1f} GiB"
                   if args.device.type == "cuda" else "")
            mfu = f"{mfus[key]:6.1%}" if mfus[key] is not None else "   n/a"
            ms_per_step[key] = meter.seconds / meter.steps * 1000
            print(f"{labels[key]:30s} {rates[key]:10.0f} real tokens/s  MFU {mfu}  "
                  f"({ms_per_step[key]:.1f} ms/step{mem})")
            if reported:
                overhead = shipped_overhead(meter, reported) or "(c) no validation ran: its share is not known"
                print(overhead)
            if args.compile:  # compiled graphs hold the last recipe's model, and count against recompile limits
                torch._dynamo.reset()
            gc.collect()
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
    report(rates, mfus, on_gpu=args.device.type == "cuda")
    # for scripts/gpu_check.py, which judges the targets itself (and never on a CPU)
    return {"rates": rates, "mfus": mfus, "ms_per_step": ms_per_step, "overhead": overhead}


def report(rates: dict, mfus: dict, on_gpu: bool) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    if not on_gpu:
        print("(a smoke run off GPU: these figures say nothing about the GPU targets)")
    if "ours" in rates:
        for other, label in (("loop", "(c)/(b)"), ("hf", "(c)/(d)")):
            if other in rates:
                ratio = rates["ours"] / rates[other]
                judged = verdict(ratio >= TARGETS[other]) if on_gpu else "no verdict off GPU (CPU steps are noise)"
                print(f"{label} = {ratio:.2f}x   target >= {TARGETS[other]}x: {judged}")
    for key, mfu in mfus.items():
        if mfu is not None:
            target = f"   target >= {TARGETS['mfu']:.0%} on H100"
            target += f": {verdict(mfu >= TARGETS['mfu'])}" if on_gpu else " (no verdict off GPU)"
            print(f"MFU {key} = {mfu:.1%}{target if key == 'ours' else ''}")
