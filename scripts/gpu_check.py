"""The GPU check (`scripts/gpu_check.sh` runs it): one prepared run on one GPU, one summary block, whatever happens.

The lent GPU machine gives a session 15 minutes in all, its start included: a first run that fails or overruns
leaves no time for a second. So the check runs a preflight first, then each stage as a subprocess with its own
budget under one deadline (`--deadline`, seconds from the start; the .sh adds a hard limit): a stage that would
start without its estimated time left is skipped with a line, a stage past its budget or the deadline is stopped
(SIGTERM, then SIGKILL), and every stage's output is streamed to the console (and `$OUT/gpu_check.log` when OUT is
set) as it comes, so a cut stage keeps what it printed. Each stage prints its figures (lines starting
`gpu_check: `) the moment it knows them; the summary (also `$OUT/gpu_check_summary.txt`) is printed from a
`finally`, also when SIGTERM or Ctrl-C ends the run.

Stages, in this order (`--stages`, comma-separated; preflight always runs first). Estimates for bert-base (110M
parameters) at seq 128, batch 128 (16,384 tokens a step) on one H100, from: a step is 6 x 110M x 16,384 ~ 11
TFLOP, at ~40% of the H100's 989 TFLOP/s dense bf16 (~400 TFLOP/s) ~27 ms; torch.compile of the encoder ~60 s
the first time (inductor's on-disk cache makes a later compile of the same graphs in another process cheaper,
not counted here); a process start with torch + lightning + transformers ~10-20 s; a checkpoint (fp32 weights
and AdamW's two moments, 1.3 GB) ~5 s. None of this has been timed on a GPU yet.
  preflight   ~10 s (budget 60): python, torch, CUDA, GPU, lightning and transformers versions; every module the
              stages import. A missing one ends the run with one line naming it and the wheel command.
  bench      ~140 s (budget 220): `scripts/benchmark.py --mode gpu --only loop,ours`: the plain loop, then the
              real fit of configs/bert-base-gpu.yaml, 10 warm-up + 100 timed steps each. Start, corpus,
              tokenizer and model ~20 s; two compiles ~2 x 50 s; 220 steps x 27 ms ~6 s; the fit's validation
              and checkpoint writes ~10 s. Figures: real tokens/s and MFU of both, fit / plain loop.
  sync        ~90 s (budget 150): a 300-step fit of configs/bert-base-gpu.yaml under CUDA's sync debug mode:
              start and model ~20 s, compile ~60 s, 300 x 27 ms ~8 s, the last checkpoint ~5 s. Figure: host
              syncs per step inside training steps between log steps (after the first log interval, where
              torch.compile compiles).
  hf          ~40 s (budget 90): `--only hf`: HF run_mlm + Trainer, uncompiled as run_mlm runs it, 5 + 30 steps
              of ~45 ms (its dense head: ~13 TFLOP a step): start and corpus ~20 s, Trainer setup ~15 s.
              Figure: fit / HF Trainer (the fit's rate from the bench stage).
  families    ~60 s (budget 120): `scripts/benchmark.py --architecture bert,roberta,modernbert` at bert-base's
              shape, seq 512, 1M tokens each, uncompiled: start ~15 s, per family a tokenizer and cache ~8 s
              and 1M tokens at >= 200k tokens/s ~5 s. Figures: real tokens/s and the attention each ran.
  fsdp        ~50 s (budget 100): FSDP with one process, sharded state dict only: fit 10 steps, resume to 20
              (`--ckpt_path last`), export, exported weights compared with the checkpoint's; uncompiled. Two
              fits ~2 x 15 s, two sharded saves ~10 s, export ~10 s.
Sum of estimates ~390 s (6.5 min); the deadline is 460 s and the .sh's hard limit 480 s (8 min).

Targets (judged on a GPU only; `--cpu` checks the plumbing and never the timing: a few steps of a tiny model on a
shared CPU are noise): MFU >= 45%, fit >= 0.95x the plain loop, fit >= 2x HF Trainer, 0 host syncs per step
between log steps. A missed target says MISSED in the summary and makes the exit status 1; so does a stage that
failed, was cut or was skipped. Exit 2: the preflight failed (nothing ran).
`--cpu`: the same stages tiny on a CPU (bench `--tiny`, a 2-layer model, FSDP skipped: Lightning refuses it
without a GPU), so the script itself is tested where there is no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "bert-base-gpu.yaml"
SHARED_CORPUS = ROOT.parent / "shared" / "data" / "meditations.txt"
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=30522)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
PREFIX = "gpu_check: "  # a stage's figure lines: the parent collects them for the summary as they stream past
TARGETS = {"mfu": 0.45, "loop": 0.95, "hf": 2.0}
WHEELS = ("here: bash scripts/gpu_wheels.sh .whl, carry .whl; there: python3 -m pip install -q --no-index --no-deps"
          " --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site")


@dataclass
class Stage:
    estimate: float  # seconds it should take (GPU / --cpu): it does not start with less than this left
    budget: float  # seconds after which it is stopped
    cpu_estimate: float
    cpu_budget: float


# (--cpu figures: this repository's 2-core CI machine, several jobs at once)
STAGES = {
    "preflight": Stage(10, 60, 10, 120),
    "bench": Stage(140, 220, 60, 300),
    "sync": Stage(90, 150, 40, 300),
    "hf": Stage(40, 90, 40, 240),
    "families": Stage(60, 120, 60, 300),
    "fsdp": Stage(50, 100, 1, 60),
}
ORDER = ["bench", "sync", "hf", "families", "fsdp"]


# == the parent: deadline, streaming, summary ====================================================================
class Stopped(Exception):
    """SIGTERM or SIGINT reached the parent: stop the running stage and print the summary."""


class Console:
    """Everything the run prints goes to stdout and, when OUT is set, is appended to $OUT/gpu_check.log at once."""

    def __init__(self, out: str | None):
        self.log = open(os.path.join(out, "gpu_check.log"), "ab") if out else None  # noqa: SIM115
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            if self.log:
                self.log.write(data)
                self.log.flush()

    def line(self, text: str) -> None:
        self.write((text + "\n").encode())


def run_stage(cmd: list[str], timeout: float, console: Console, state: dict) -> tuple[int | None, list[str]]:
    """Run a stage's command in its own process group, its output streamed as it comes; return its exit code
    (None: stopped at `timeout`) and the figure lines it printed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    state["proc"] = proc
    figures: list[str] = []

    def pump():  # raw chunks, not lines: progress bars (\r) and a half-written line reach the console at once
        pending = b""
        while chunk := os.read(proc.stdout.fileno(), 65536):
            console.write(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            figures.extend(x.decode(errors="replace")[len(PREFIX):].rstrip("\r") for x in lines
                           if x.startswith(PREFIX.encode()))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        stop(proc)
        code = None
    # (a signal raised in wait() leaves state["proc"] set: the handler's caller stops it)
    state["proc"] = None
    reader.join(timeout=5)
    return code, figures


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM to the stage's process group (its loader workers too), SIGKILL after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            return


def judge(fig: dict, cpu: bool) -> tuple[list[str], bool]:
    """The target lines of the summary and whether one was missed. On a CPU the figures are printed but never
    judged: a few steps of a tiny model on shared cores differ several-fold between two runs of one set-up."""
    lines, missed = [], False
    checks = [("MFU of the fit", fig.get("fit_mfu"), TARGETS["mfu"], "{:.1%}", ">= 45% (H100, bf16)"),
              ("fit / plain loop", ratio(fig, "fit_tps", "loop_tps"), TARGETS["loop"], "{:.2f}x", ">= 0.95x"),
              ("fit / HF Trainer", ratio(fig, "fit_tps", "hf_tps"), TARGETS["hf"], "{:.2f}x", ">= 2x"),
              ("host syncs per step between log steps", fig.get("syncs_per_step"), 0, "{:.2f}", "0")]
    for label, value, target, fmt, wanted in checks:
        if value is None:
            lines.append(f"target {label} {wanted}: not measured")
        elif cpu:
            lines.append(f"target {label} {wanted}: {fmt.format(value)} (not judged on a CPU: plumbing only)")
        else:
            ok = value <= target if label.startswith("host") else value >= target
            missed |= not ok
            lines.append(f"target {label} {wanted}: {fmt.format(value)} {'met' if ok else 'MISSED'}")
    return lines, missed


def ratio(fig: dict, a: str, b: str) -> float | None:
    return fig[a] / fig[b] if fig.get(a) and fig.get(b) else None


def summarize(summary: list[str], fig: dict, args, start: float, problems: int, console: Console) -> int:
    targets, missed = judge(fig, args.cpu)
    code = 1 if problems or missed else 0
    block = ["======== gpu_check summary ========", *summary, *targets,
             f"(total {time.monotonic() - start:.0f} s of a {args.deadline:.0f} s deadline;"
             f" {'--cpu: plumbing only, no GPU figures; ' if args.cpu else ''}exit {code})",
             "==================================="]
    console.line("\n" + "\n".join(block))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check_summary.txt").write_text("\n".join(block) + "\n")
    return code


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.worker:
        return worker(args)
    start = time.monotonic()
    deadline = start + args.deadline
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
    console = Console(out)
    state: dict = {"proc": None}

    def on_signal(signum, frame):
        signal.signal(signum, signal.SIG_IGN)  # the hard limit's SIGKILL follows in 10 s: no second round
        raise Stopped(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    budgets = dict(x.split("=") for x in args.budgets.split(",") if x) if args.budgets else {}
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES or s == "preflight"]
    if unknown:
        console.line(f"gpu_check: unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(ORDER)}")
        return 2
    # a worker gets the options that shape its work; the parent keeps the deadline to itself
    passed = ["--tmp", "", "--stages", ",".join(stages), *(["--cpu"] if args.cpu else []),
              "--bench_steps", str(args.bench_steps), "--hf_steps", str(args.hf_steps),
              "--sync_steps", str(args.sync_steps), "--fsdp_steps", str(args.fsdp_steps)]
    summary: list[str] = []
    fig: dict = {}
    problems = 0
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        passed[1] = tmp
        try:
            for name in ["preflight", *stages]:
                spec = STAGES[name]
                estimate, budget = (spec.cpu_estimate, spec.cpu_budget) if args.cpu else (spec.estimate, spec.budget)
                if name in budgets:
                    budget = float(budgets[name])
                    estimate = min(estimate, budget)
                left = deadline - time.monotonic()
                if left < estimate:
                    line = f"{name}: SKIPPED ({left:.0f} s left before the deadline, it needs ~{estimate:.0f} s)"
                    summary.append(line)
                    console.line(PREFIX + line)
                    problems += 1
                    continue
                timeout = min(budget, left)
                console.line(f"\n{PREFIX}stage {name}: starting (estimate {estimate:.0f} s, stopped after"
                             f" {timeout:.0f} s; {left:.0f} s left before the deadline)")
                began = time.monotonic()
                state["stage"] = name
                cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--worker", name, *passed]
                code, streamed = run_stage(cmd, timeout, console, state)
                lines = list(streamed)
                took = time.monotonic() - began
                with contextlib.suppress(OSError, ValueError):
                    fig.update(json.loads(Path(tmp, f"{name}.json").read_text()))
                if name == "preflight" and code == 2:  # the run ends on one line: a missing module, or no GPU
                    state["one_line"] = fig.get("one_line", "preflight: FAILED (exit 2)")
                    return 2
                if code is None:
                    why = "its budget" if timeout < left else "the deadline"
                    lines.append(f"{name}: CUT after {took:.0f} s ({why}); its figures so far are above")
                elif code:
                    lines.append(f"{name}: FAILED (exit {code}) after {took:.0f} s; its output is above")
                problems += code != 0
                for line in lines[len(streamed) :]:  # the parent's own verdict on the stage (its figures streamed)
                    console.line(PREFIX + line)
                summary += lines or [f"{name}: no figures"]
                console.line(f"{PREFIX}stage {name}: done in {took:.0f} s (estimate {estimate:.0f} s)")
        except (Stopped, KeyboardInterrupt) as e:
            if state.get("proc") is not None:
                stop(state["proc"], grace=3.0)
            summary.append(f"{state.get('stage', 'start')}: CUT by {e or 'SIGINT'} (the hard limit or a person);"
                           " later stages did not run")
            problems += 1
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):  # a signal now would cut the summary short
                signal.signal(sig, signal.SIG_IGN)
            if "one_line" in state:  # its summary is that line, last on the console, nothing after it
                console.line(PREFIX + state["one_line"])
                if out:
                    Path(out, "gpu_check_summary.txt").write_text(state["one_line"] + "\n")
            else:
                code = summarize(summary, fig, args, start, problems, console)
    return code


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny, on a CPU: checks the script, says nothing of a GPU")
    p.add_argument("--stages", default=",".join(ORDER), help="comma-separated, in this order: " + ",".join(ORDER))
    p.add_argument("--deadline", type=float, default=460, help="seconds from the start for all stages")
    p.add_argument("--budgets", default="", help="e.g. sync=60,fsdp=40: a stage's own limit in seconds")
    p.add_argument("--bench_steps", type=int, default=100)
    p.add_argument("--hf_steps", type=int, default=30)
    p.add_argument("--sync_steps", type=int, default=300)
    p.add_argument("--fsdp_steps", type=int, default=10)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # run one stage (the parent starts these)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# == the workers: one stage each, in its own process ==============================================================
def say(line: str) -> None:
    print(PREFIX + line, flush=True)


def worker(args) -> int:
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    figures: dict = {}
    try:
        code = WORKERS[args.worker](args, figures)
    finally:
        Path(args.tmp, f"{args.worker}.json").write_text(json.dumps(figures))
    return code or 0


# -- preflight --------------------------------------------------------------------------------------------------
# What each stage imports, beyond torch/lightning/transformers: the modules first (a missing one is named as it is
# imported), then the project's own entry points, whose imports pull in the rest.
NEEDS = {
    "all": ["torch", "lightning", "transformers", "tokenizers", "torchmetrics", "safetensors", "numpy", "yaml",
            "filelock", "fsspec", "tqdm", "jsonargparse", "docstring_parser", "typeshed_client", "matplotlib",
            "mlm_lightning.cli.main", "mlm_lightning.cli.lightning", "mlm_lightning.data", "mlm_lightning.model",
            "mlm_lightning.training.callbacks", "mlm_lightning.training.plot"],
    "bench": ["benchmark_gpu"],
    "sync": [],
    "hf": ["benchmark_gpu", "accelerate"],
    "families": ["benchmark"],
    "fsdp": ["mlm_lightning.export", "mlm_lightning.model.checkpoint", "torch.distributed.checkpoint"],
}


def preflight(args, figures: dict) -> int:
    import importlib
    import importlib.util

    for module in dict.fromkeys(NEEDS["all"] + [m for s in args.stages.split(",") for m in NEEDS.get(s, [])]):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            missing = e.name or module
            by = "" if missing == module else f" (imported by {module})"
            return fail(figures, f"preflight: FAILED: module {missing!r} is missing{by}; {WHEELS}")
    from lightning.pytorch.cli import _JSONARGPARSE_SIGNATURES_AVAILABLE as signatures

    if not signatures:  # LightningCLI checks the distributions' metadata, not only the imports
        return fail(figures, f"preflight: FAILED: LightningCLI refuses jsonargparse: {str(signatures)[:200]}; {WHEELS}")
    import jsonargparse
    import lightning
    import torch
    import transformers

    from mlm_lightning.training.callbacks import peak_flops

    if torch.cuda.is_available():
        dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(dev)
        peak = peak_flops(dev, torch.bfloat16)
        gpu = (f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, dense bf16 peak"
               f" {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown: no MFU'})")
    elif args.cpu:
        gpu = "none (--cpu)"
    else:
        return fail(figures, "preflight: FAILED: torch sees no CUDA device (torch.cuda.is_available() is False); run"
                    " on the GPU machine, or add --cpu for the dry run")
    flash = importlib.util.find_spec("flash_attn") is not None
    say(f"preflight: python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda},"
        f" cuDNN {torch.backends.cudnn.version()}); GPU {gpu}; lightning {lightning.__version__}; transformers"
        f" {transformers.__version__}; jsonargparse {jsonargparse.__version__}"
        f" ({Path(jsonargparse.__file__).parents[1]}); flash-attn {'installed' if flash else 'not installed'}")
    below = unmet_requirements()
    if below:
        say("preflight: below pyproject.toml's requirements (each may still work): " + "; ".join(below))
    return 0


def fail(figures: dict, line: str) -> int:
    """The preflight's one line: the parent prints it last, and nothing else runs."""
    figures["one_line"] = line
    return 2


def unmet_requirements() -> list[str]:
    """Installed versions that pyproject.toml's runtime requirements exclude (the GPU machine's own packages are
    not chosen by us)."""
    import importlib.metadata as md

    try:
        import tomllib  # Python 3.11+
        from packaging.requirements import Requirement
    except ImportError:
        return []

    out = []
    for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate():
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            out.append(f"{req.name} not installed ({req.specifier})")
            continue
        if not req.specifier.contains(have, prereleases=True):
            out.append(f"{req.name} {have} ({req.specifier})")
    return out


# -- bench and hf: scripts/benchmark.py --mode gpu -------------------------------------------------------------
def benchmark_options(args, only: str, steps: int, warmup: int) -> list[str]:
    options = ["--mode", "gpu", "--only", only]
    if args.cpu:
        return options + ["--tiny", "--steps", "3", "--warmup", "1", "--precision", "32-true"]
    return options + ["--steps", str(steps), "--warmup", str(warmup)]


def stage_bench(args, figures: dict) -> int:
    import benchmark_gpu

    results = benchmark_gpu.main(benchmark_options(args, "loop,ours", args.bench_steps, 10))
    rates, mfus = results["rates"], results["mfus"]
    figures.update(fit_tps=rates.get("ours"), loop_tps=rates.get("loop"), fit_mfu=mfus.get("ours"))

    def mfu(key):
        return f", MFU {mfus[key]:.1%}" if mfus.get(key) is not None else ", no MFU (no GPU peak known)"

    for key, label in (("ours", "fit (real mlm-lightning fit)"), ("loop", "plain loop")):
        if key in rates:
            say(f"bench: {label}: {rates[key]:,.0f} real tokens/s{mfu(key)}, {results['ms_per_step'][key]:.1f}"
                " ms/step")
    if results.get("overhead"):
        say("bench: " + results["overhead"])
    return 0 if {"ours", "loop"} <= set(rates) else 1


def stage_hf(args, figures: dict) -> int:
    import benchmark_gpu

    results = benchmark_gpu.main(benchmark_options(args, "hf", args.hf_steps, 5))
    if "hf" not in results["rates"]:
        say("hf: HF Trainer did not run (accelerate missing?)")
        return 1
    figures["hf_tps"] = results["rates"]["hf"]
    say(f"hf: HF run_mlm + Trainer: {figures['hf_tps']:,.0f} real tokens/s, {results['ms_per_step']['hf']:.1f}"
        " ms/step (uncompiled, dense head)")
    return 0


# -- families: scripts/benchmark.py --architecture ---------------------------------------------------------------
def stage_families(args, figures: dict) -> int:
    import benchmark

    options = (["--tokens", "3000", "--warmup", "1", "--hidden_size", "64", "--layers", "2", "--heads", "2",
                "--intermediate", "128", "--precision", "32-true"] if args.cpu
               else ["--accelerator", "gpu", "--tokens", "1000000", "--warmup", "10", "--hidden_size", "768",
                     "--layers", "12", "--heads", "12", "--intermediate", "3072", "--seq_len", "512",
                     "--batch_size", "32"])
    sys.argv = ["benchmark.py", "--architecture", "bert,roberta,modernbert", "--cache_dir",
                os.path.join(args.tmp, "families-cache"), *options]
    rates = benchmark.main()
    for name, (rate, attention) in rates.items():
        say(f"families: {name} {rate:,.0f} real tokens/s, attention {attention}")
    figures["families"] = {name: rate for name, (rate, _) in rates.items()}
    return 0


# -- sync: host syncs of the real fit ------------------------------------------------------------------------------
def sync_recorder():
    """The callback given to the sync fit by class path (`gpu_check.SyncRecorder`): where in the fit each
    host-sync warning is raised. Defined here, in the worker, so that the parent never imports lightning."""
    import lightning as L

    class SyncRecorder(L.Callback):
        where = "setup"
        step = 0
        log_step = False
        records: list[tuple[str, int, bool, str]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            from mlm_lightning.metrics import is_log_step

            cls = SyncRecorder
            cls.where, cls.step, cls.log_step = "train", trainer.global_step + 1, is_log_step(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            SyncRecorder.where = "between batches"  # after the step's hooks: loop, checkpoints, data fetch

        def on_validation_start(self, trainer, pl_module):
            SyncRecorder.where = "validation"

        def on_validation_end(self, trainer, pl_module):
            SyncRecorder.where = "after validation"

    return SyncRecorder


def record_syncs(recorder) -> None:
    """Every CUDA sync warning (set_sync_debug_mode), not just the first per call site, goes to the recorder."""
    import torch

    torch.cuda.set_sync_debug_mode("warn")
    warnings.simplefilter("always")
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-2] if "warnings.py" not in f.filename][-4:]
        at = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(frames))
        recorder.records.append((recorder.where, recorder.step, recorder.log_step, at))

    warnings.showwarning = showwarning


def corpus(tmp: str, tokens: float) -> str:
    """The shared corpus (or the offline one) repeated to about `tokens` tokens: one epoch holds the run."""
    from mlm_lightning.data.corpus import iter_texts
    from mlm_lightning.data.offline import default_corpus

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
    from mlm_lightning.cli.main import main as cli_main

    try:
        cli_main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def stage_sync(args, figures: dict) -> int:
    tmp = os.path.join(args.tmp, "sync")
    os.makedirs(tmp, exist_ok=True)
    steps = 30 if args.cpu else args.sync_steps
    train = corpus(tmp, steps * (16 if args.cpu else 128) * 128 * 1.1)
    model, what = model_dir(tmp, train, args.cpu)
    root = os.path.join(tmp, "run")
    recorder = sync_recorder()
    sys.modules.setdefault("gpu_check", sys.modules[__name__])  # the fit finds the callback by this name
    sys.modules["gpu_check"].SyncRecorder = recorder
    if not args.cpu:
        record_syncs(recorder)
    start = time.perf_counter()
    code = run_cli(fit_argv(args, model, train, root, steps, "--trainer.callbacks+=gpu_check.SyncRecorder"))
    say(f"sync: fit of configs/bert-base-gpu.yaml, {steps} steps, model {what}: exit {code},"
        f" {time.perf_counter() - start:.0f} s")
    if args.cpu:
        say("sync: no CUDA sync debug mode on a CPU (tests/training/test_host_syncs.py counts there)")
        return code
    import torch

    torch.cuda.set_sync_debug_mode("default")
    every = 50  # the config's log_every_n_steps
    records = recorder.records
    inside = [r for r in records if r[0] == "train" and not r[2] and r[1] > every]
    warm = [r for r in records if r[0] == "train" and r[1] <= every]
    at_log = [r for r in records if r[0] == "train" and r[2] and r[1] > every]
    other = [r for r in records if r[0] != "train"]
    measured = max(0, steps - every - (steps - every) // every)  # the steps after the first interval, less log steps
    if code == 0 and measured:
        figures["syncs_per_step"] = len(inside) / measured
    where = "" if not inside else "; at " + "; ".join(sorted({r[3] for r in inside})[:3])
    say(f"sync: host syncs inside training steps between log steps (after step {every}): {len(inside)} in"
        f" {measured} steps{where}")
    say(f"sync: host syncs at log steps: {len(at_log)} ({len(at_log) / max(1, steps // every - 1):.1f} per log"
        f" step); in the first {every} steps (compilation): {len(warm)}; outside training steps (validation,"
        f" checkpoints, loop): {len(other)}")
    rows = metric_rows(root)
    tps = [float(r["perf/tokens_per_s"]) for r in rows if r.get("perf/tokens_per_s")]
    mfu = [float(r["perf/mfu"]) for r in rows if r.get("perf/mfu")]
    if tps:
        say(f"sync: fit, last logged: {tps[-1]:,.0f} real tokens/s" + (f", MFU {mfu[-1]:.1%}" if mfu else "")
            + " (with sync debug mode on)")
    return code


# -- fsdp: sharded fit, resume, export ------------------------------------------------------------------------------
def stage_fsdp(args, figures: dict) -> int:
    import torch

    if args.cpu or not torch.cuda.is_available():
        say("fsdp: skipped (Lightning runs FSDP on GPUs only)")
        return 0
    from mlm_lightning.model.checkpoint import load_checkpoint

    tmp = os.path.join(args.tmp, "fsdp")
    os.makedirs(tmp, exist_ok=True)
    n = args.fsdp_steps
    train = corpus(tmp, 3 * n * 128 * 128)
    model, _ = model_dir(tmp, train, cpu=False)
    root = os.path.join(tmp, "run")
    fsdp = '{"class_path": "lightning.pytorch.strategies.FSDPStrategy", "init_args": {"state_dict_type": "sharded"}}'
    strategy = ["--trainer.strategy", fsdp, "--model.compile", "false"]
    first = run_cli(fit_argv(args, model, train, root, n, *strategy))
    say(f"fsdp: fit ({n} steps, sharded state dict, 1 process): exit {first}")
    resumed = run_cli(fit_argv(args, model, train, root, 2 * n, *strategy, "--ckpt_path", "last"))
    rows = [r for r in metric_rows(root) if r.get("train/loss")]
    last_step = max((int(r["step"]) for r in rows), default=-1) + 1
    say(f"fsdp: resume to step {2 * n}: exit {resumed} (last logged step {last_step},"
        f" loss {float(rows[-1]['train/loss']) if rows else float('nan'):.3f})")
    last = os.path.join(root, "checkpoints", "last.ckpt")
    out = os.path.join(tmp, "exported")
    exported = run_cli(["export", "--ckpt_path", last, "--export_dir", out])
    same = "not compared"
    if exported == 0:
        from transformers import AutoModelForMaskedLM

        ours, _ = load_checkpoint(last)
        theirs = AutoModelForMaskedLM.from_pretrained(out)
        a, b = ours.state_dict(), theirs.state_dict()
        same = "equal" if all(torch.equal(a[k].float(), b[k].float()) for k in a if k in b) else "DIFFERENT"
    say(f"fsdp: export: exit {exported}, exported weights {same} to the checkpoint's")
    return 0 if (first, resumed, exported, same) == (0, 0, 0, "equal") else 1


def metric_rows(root: str) -> list[dict]:
    import csv

    rows = []
    for f in sorted(glob.glob(f"{root}/lightning_logs/*/metrics.csv")):
        with open(f) as fh:
            rows += list(csv.DictReader(fh))
    return rows


WORKERS = {"preflight": preflight, "bench": stage_bench, "sync": stage_sync, "hf": stage_hf,
           "families": stage_families, "fsdp": stage_fsdp}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
