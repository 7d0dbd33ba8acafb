"""What the tests share: tiny models and corpora, the fit-argument builder, metric readers, a server process, and
test-only callbacks importable by class path from the CLI (`--trainer.callbacks+=tests.helpers.X`).

Test modules import from here (and fixtures come from conftest.py); no test module imports another.
"""

from __future__ import annotations

import csv
import ctypes
import glob
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mlm_lightning.cli.main import main
from mlm_lightning.data import shards
from mlm_lightning.data.tokenizer import SPECIAL_TOKENS, train_wordpiece
from mlm_lightning.export import save_hf
from mlm_lightning.model import MLMModule, arch

ROOT = Path(__file__).resolve().parents[1]

# a tiny BERT that trains in seconds on 2 CPU cores; with dropout, so exact-resume tests cover its RNG
TINY_MODEL = [
    "--model.hidden_size", "32", "--model.num_hidden_layers", "2", "--model.num_attention_heads", "2",
    "--model.intermediate_size", "64", "--model.max_position_embeddings", "64", "--model.dropout", "0.1",
]
TINY_DATA = ["--data.max_length", "32", "--data.batch_size", "8", "--data.vocab_size", "300"]

SUBJECTS = ["the cat", "the dog", "a bird", "my friend", "the teacher", "our neighbour"]
VERBS = ["sees", "likes", "finds", "follows", "helps", "calls"]
OBJECTS = ["the ball", "a tree", "the river", "a small house", "the old car", "the red door"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} ." for _ in range(n)]


# -- running the CLI -------------------------------------------------------------------------------------------
def run_cli(*args: str) -> int:
    """Run `mlm-lightning ARGS` in this process; returns the exit code."""
    try:
        main(list(args))
    except SystemExit as e:
        return 0 if e.code is None else int(e.code)
    return 0


# the sizes of `module`'s tiny BERT (no dropout: unit tests compare exact values)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, dropout=0.0)


def error_line(err: str) -> str:
    """The one error line a refused command printed on stderr (asserts there is exactly one, and no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("mlm-lightning: error")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def fit_args(corpus: str, root, *extra: str) -> list[str]:
    """`fit` of the tiny model on `corpus` into `root` on the CPU, logging every step, no bar or summary."""
    return ["fit", "--data.train_files", corpus, *TINY_MODEL, *TINY_DATA, "--trainer.accelerator", "cpu",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1", *extra]


def cli(*args: str) -> list[str]:
    """The command line of `mlm-lightning ARGS` in a new process."""
    return [sys.executable, "-m", "mlm_lightning.cli", *args]


def two_nodes(tmp_path, fit_argv) -> list[str]:
    """Run `fit_argv(node)` (a fit's arguments) as two simulated nodes of one process each (torchrun on 127.0.0.1,
    gloo), with node-local caches `tmp_path/cache0` and `cache1`; asserts both exit 0 and returns their logs."""
    port, procs, logs = free_port(), [], []
    for node in (0, 1):
        env = {**os.environ, "MLM_LIGHTNING_CACHE": str(tmp_path / f"cache{node}"), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
               "--module", "mlm_lightning.cli", *fit_argv(node), "--trainer.num_nodes", "2", "--trainer.devices",
               "1", "--trainer.strategy", "ddp"]
        logs.append(open(tmp_path / f"node{node}.log", "w+"))  # files, not pipes: a full pipe blocks a node
        procs.append(subprocess.Popen(cmd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT, text=True))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    outs = [open(log.name).read() for log in logs]
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    return outs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- reading a run ---------------------------------------------------------------------------------------------
def metric_rows(root) -> list[dict]:
    """Every row of every `metrics.csv` under `root/lightning_logs`, in version order."""
    rows = []
    for f in sorted(glob.glob(f"{root}/lightning_logs/*/metrics.csv")):
        with open(f) as fh:
            rows += list(csv.DictReader(fh))
    return rows


def metric(root, key: str) -> dict[int, float]:
    """{step: value} of one logged metric (e.g. `train/loss`)."""
    return {int(r["step"]): float(r[key]) for r in metric_rows(root) if r.get(key)}


def run_steps(root, key: str = "train/loss") -> list[list[int]]:
    """The steps at which each fit into `root` logged `key`: one list per `lightning_logs/version_N`, in order.

    A resumed fit logs from the step it resumed at: its list starts there, not at 0 (a fit that silently started
    from scratch instead would log from 0, and a seeded retrain can end with the very same weights)."""
    out = []
    files = glob.glob(f"{root}/lightning_logs/version_*/metrics.csv")
    for f in sorted(files, key=lambda p: int(p.split("version_")[-1].split(os.sep)[0])):
        with open(f) as fh:
            out.append(sorted({int(r["step"]) for r in csv.DictReader(fh) if r.get(key)}))
    return out


def assert_resumed_at(root, step: int) -> None:
    """The last fit into `root` resumed at optimizer step `step` (its first logged training step)."""
    runs = run_steps(root)
    assert len(runs) >= 2 and runs[-1] and runs[-1][0] == step, runs


def column(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def state(root, name: str = "last.ckpt") -> dict:
    return torch.load(f"{root}/checkpoints/{name}", weights_only=True)


# -- tiny models -----------------------------------------------------------------------------------------------
def module(tokenizer, **kw):
    """A tiny `MLMModule` built on `tokenizer`, its weights seeded (unit tests of the LightningModule)."""
    torch.manual_seed(0)
    m = MLMModule(**{**TINY, **kw})
    m.tokenizer = tokenizer
    m.configure_model()
    return m


def tiny_model(tmp: Path, mask_token: str | None = None) -> str:
    """A random tiny BERT (vocab ~200, 24-token tokenizer limit) exported in Hugging Face format."""
    tok = train_wordpiece(sentences(300), str(tmp / "tok"), 200, 24)
    if mask_token:  # a tokenizer whose own mask token is not [MASK] (like RoBERTa's <mask>)
        tok.add_special_tokens({"mask_token": mask_token})
    m = MLMModule(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64)
    m.tokenizer = tok
    torch.manual_seed(0)
    m.configure_model()
    with torch.no_grad():  # random weights that propose whole words: tests read its fills back as words
        bias = dict(m.model.named_parameters())[arch.FAMILIES["bert"].output_bias]
        bias[[i for t, i in tok.get_vocab().items() if t.startswith("##")]] = -10.0
    return save_hf(m.model.eval(), tok, str(tmp / "export"))


class Server:
    """`mlm-lightning serve --port 0 ...` in its own process, started in `cwd`; stderr is collected."""

    def __init__(self, model: str, cwd: Path, *args: str):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlm_lightning.cli", "serve", "--model", model, "--port", "0", *args],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()  # drain stderr so the server never blocks on it
        if not self.ready.wait(120) or self.proc.poll() is not None:
            self.proc.kill()
            raise RuntimeError("the server did not start:\n" + self.log)
        self.url = re.search(r"http://[^ ]+", next(x for x in self.lines if "serving" in x)).group(0)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "serving" in line:
                self.ready.set()
        self.ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10) -> tuple[int, float]:
        """Send `signum`; (exit code, seconds until the process was gone)."""
        start = time.monotonic()
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return code, time.monotonic() - start


def post(url: str, body, path: str = "/api/fill-mask", raw: bool = False) -> tuple[int, object]:
    """POST JSON (or raw bytes) -> (status, decoded JSON body)."""
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url + path, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def assert_same_candidates(ours: list[dict], expected: list[dict], tol: float = 1e-4) -> None:
    """One mask's candidates: the same scores (within `tol`), keys, tokens and sequences, rank by rank.

    Two candidates whose scores are within float noise (a random model has near ties) may come in either order,
    depending on the shapes of the matmuls; they are compared as a set."""
    assert len(ours) == len(expected)
    assert all(set(c) == {"score", "token", "token_str", "sequence"} for c in ours)
    for a, b in zip(ours, expected, strict=True):
        assert abs(a["score"] - b["score"]) < tol, (a, b)
    def key(c):
        return (c["token"], c["token_str"], c["sequence"])

    rank = 0
    while rank < len(ours):  # group ranks whose expected scores tie within 1e-6
        end = rank + 1
        while end < len(ours) and abs(expected[end]["score"] - expected[end - 1]["score"]) < 1e-6:
            end += 1
        assert sorted(map(key, ours[rank:end])) == sorted(map(key, expected[rank:end])), (ours, expected)
        rank = end


def assert_same_answer(ours, expected) -> None:
    """A pipeline answer for one text: a list of candidates (one mask) or a list of those (several)."""
    if expected and isinstance(expected[0], list):
        assert isinstance(ours[0], list) and len(ours) == len(expected)
        for a, b in zip(ours, expected, strict=True):
            assert_same_candidates(a, b)
    else:
        assert_same_candidates(ours, expected)


def bpe_tokenizer(texts) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (no `##` pieces) with BERT's special tokens, trained on `texts`."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


# -- test-only callbacks ---------------------------------------------------------------------------------------
class SignalAt(Callback):
    """Send this process a signal after optimizer step `step` (simulates a preemption or Ctrl-C)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class NanAt(Callback):
    """Poison the MLM head before step `step` so that step's loss is NaN (on process `rank` only, if given)."""

    def __init__(self, step: int, rank: int | None = None):
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step and self.rank in (None, trainer.global_rank):
            with torch.no_grad():
                arch.head_module(pl_module.model).weight.fill_(float("nan"))



class SignalDuringValidation(Callback):
    """Send this process a signal in the middle of the first validation after step `step`."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.global_step >= self.step and not trainer.sanity_checking:
            os.environ["MLM_TEST_SIGNAL_SENT"] = repr(time.time())  # for tests that time the reaction
            os.kill(os.getpid(), self.signum)
            self.step = 10**9


class SlowValidation(Callback):
    """Make every validation batch after `after_step` take `seconds`: a long validation."""

    def __init__(self, seconds: float = 5.0, after_step: int = 0):
        self.seconds, self.after_step = seconds, after_step

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and trainer.global_step >= self.after_step:
            time.sleep(self.seconds)


class SignalAtBatch(Callback):
    """Send a signal after the `batch`-th training batch (counted from 1 over the whole fit)."""

    def __init__(self, batch: int, signum: int = int(signal.SIGTERM), times: int = 1):
        self.batch, self.signum, self.times = batch, signum, times

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx + 1 == self.batch:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def write_sharded_checkpoint(rank: int, world: int, ckpt_path: str, out_dir: str, port: int) -> None:
    """(torch.multiprocessing.spawn target) Write `ckpt_path` as a sharded `torch.distributed.checkpoint`
    directory from `world` gloo processes, laid out as Lightning's FSDP strategy does ("model" + meta.pt)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = torch.load(ckpt_path, weights_only=True)
        model = {
            k: distribute_tensor(v, mesh, [Shard(0)] if v.dim() and v.shape[0] >= world else [Replicate()])
            for k, v in full["state_dict"].items()
        }
        dcp.save({"model": model}, checkpoint_id=out_dir)
        if rank == 0:
            rest = {k: v for k, v in full.items() if k not in ("state_dict", "optimizer_states")}
            torch.save(rest, os.path.join(out_dir, "meta.pt"))
    finally:
        dist.destroy_process_group()


class SlowTokenization(Callback):
    """Make tokenizing the corpus take `seconds` longer (patched when the callback is made: before data setup)."""

    def __init__(self, seconds: float = 10.0):
        real = shards.tokenize_phase

        def slow(*args, **kwargs):
            time.sleep(seconds)
            return real(*args, **kwargs)

        shards.tokenize_phase = slow


class SignalInSanityCheck(Callback):
    """Send this process a signal during the sanity check (before any training step)."""

    def __init__(self, signum: int = int(signal.SIGTERM)):
        self.signum = signum

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking:
            os.kill(os.getpid(), self.signum)


class ExpectMasking(Callback):
    """Fail the fit unless the data module's collator masks with `masking` and `mean_span_length`: the options
    given on the command line reached it."""

    def __init__(self, masking: str, mean_span_length: float):
        self.masking, self.mean_span_length = masking, mean_span_length

    def on_train_start(self, trainer, pl_module):
        strategy = trainer.datamodule.collator.strategy
        if (strategy.name, strategy.mean_span_length) != (self.masking, self.mean_span_length):
            raise RuntimeError(f"the collator masks with {strategy.name}/{strategy.mean_span_length}")


def save_to_disk(directory, texts: list[str], shards: int = 2) -> None:
    """What `datasets`' `Dataset.save_to_disk` writes (without needing `datasets`): data-0000i-of-0000n.arrow
    (Arrow IPC streams, columns id and text), state.json listing them, and dataset_info.json."""
    import numpy as np
    import pyarrow as pa

    directory.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(texts)), shards)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    for name, rows in zip(names, chunks, strict=True):
        table = pa.table({"id": rows.tolist(), "text": [texts[i] for i in rows]})
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=50)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "f", "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (directory / "state.json").write_text(json.dumps(state))
    features = {"id": {"dtype": "int64", "_type": "Value"}, "text": {"dtype": "string", "_type": "Value"}}
    (directory / "dataset_info.json").write_text(json.dumps({"features": features}))


class CountHostSyncs(Callback):
    """Record every `Tensor.item`/`.tolist`/`.cpu()` and `torch.tensor(<number>, device=...)` call made during
    training (steps and hooks), with the step counter Lightning logs by (`_batches_that_stepped`), in `calls`.

    Left out: torch's own optimizer internals (a CPU-only optimizer reads its step counts) and data loading (on a GPU
    it runs in loader workers)."""

    calls: list[tuple[int, str, str]] = []

    def on_train_start(self, trainer, pl_module):
        loop = trainer.fit_loop.epoch_loop
        optim, data = f"{os.sep}torch{os.sep}optim{os.sep}", f"{os.sep}torch{os.sep}utils{os.sep}data{os.sep}"
        self._saved = []

        def wrap(owner, attr, name, counts=lambda a, k: True):
            real = getattr(owner, attr)

            def counted(*a, **k):
                if counts(a, k):
                    stack = traceback.extract_stack()[:-1]
                    if optim not in stack[-1].filename and not any(data in f.filename for f in stack):
                        where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in stack[::-1][:6])
                        CountHostSyncs.calls.append((loop._batches_that_stepped, name, where))
                return real(*a, **k)

            self._saved.append((owner, attr, real))
            setattr(owner, attr, counted)

        wrap(torch.Tensor, "item", "item")
        wrap(torch.Tensor, "tolist", "tolist")
        wrap(torch.Tensor, "cpu", "cpu")
        wrap(torch, "tensor", "tensor(number, device)",
             lambda a, k: k.get("device") is not None and bool(a) and isinstance(a[0], (int, float, bool)))

    def on_train_end(self, trainer, pl_module):
        for owner, attr, real in reversed(self._saved):
            setattr(owner, attr, real)


class RecordSaves(Callback):
    """Skew this process's clock (`time.monotonic` runs `factor` times faster on global rank `rank`) and write the
    steps at which this process saved a checkpoint to `<out>/saves-<rank>.json` at the end."""

    def __init__(self, out: str, rank: int = 1, factor: float = 1000.0):
        self.out, self.rank, self.factor, self.steps = out, rank, factor, []

    def setup(self, trainer, pl_module, stage):
        if trainer.global_rank == self.rank:
            real = time.monotonic
            time.monotonic = lambda: real() * self.factor

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.steps.append(trainer.global_step)

    def teardown(self, trainer, pl_module, stage):
        with open(os.path.join(self.out, f"saves-{trainer.global_rank}.json"), "w") as f:
            json.dump(self.steps, f)


class NanOnce(Callback):
    """Make the loss of step `step` NaN (a NaN weight in the MLM head for that step only, restored after it)."""

    def __init__(self, step: int):
        self.step, self.saved = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            weight = arch.head_module(pl_module.model).weight
            self.saved = weight.detach().clone()
            with torch.no_grad():
                weight.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.saved is not None:
            with torch.no_grad():
                arch.head_module(pl_module.model).weight.copy_(self.saved)
            self.saved = None


def bert_dir(tmp: Path, positions: int = 512, **sizes) -> str:
    """A local pretrained-model directory (as `save_pretrained` writes) of a small random BERT with a WordPiece
    tokenizer: stands in for bert-base-uncased offline (`sizes`: BertConfig fields, e.g. bert-base's own)."""
    from transformers import BertConfig, BertForMaskedLM

    out = str(tmp / "bert")
    tok = train_wordpiece(sentences(300), str(tmp / "bert-tok"), 200, positions)
    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), max_position_embeddings=positions,
                                       pad_token_id=tok.pad_token_id, **{**config, **sizes}))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# -- model families (tests/model/test_families.py, tests/serve/test_targets.py) ---------------------------------
def family_tokenizer(tmp: Path, architecture: str, vocab: int = 400):
    """The tokenizer a new `architecture` model gets (its family's kind), trained on a few hundred sentences."""
    from mlm_lightning.data.tokenizer import train_tokenizer

    kind = arch.FAMILIES[architecture].tokenizer
    return train_tokenizer(kind, sentences(300), str(tmp / f"tok-{architecture}"), vocab, 64)


def family_export(tmp: Path, architecture: str) -> tuple[str, object]:
    """(export dir, model) of a random tiny `architecture` model with its family's tokenizer."""
    tok = family_tokenizer(tmp, architecture)
    m = module(tok, architecture=architecture)
    return save_hf(m.model.eval(), tok, str(tmp / f"export-{architecture}")), m.model.eval()


class RecordLR(Callback):
    """Append {step, lr, progress, elapsed} at each training batch start to the JSONL file `path`: the LR the
    coming step uses, the run progress its schedule computed it from, and the Timer's elapsed training time."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from lightning.pytorch.callbacks import Timer

        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        row = {"step": trainer.global_step, "lr": trainer.optimizers[0].param_groups[0]["lr"],
               "progress": trainer.lr_scheduler_configs[0].scheduler.progress,
               "elapsed": timer.time_elapsed("train") if timer else None}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# -- faults: damaged files, full disks, read-only mounts, permissions ----------------------------------------------
def damage(src, dst, how: str) -> None:
    """Write a damaged copy of the checkpoint `src` as `dst`: truncated, empty, random, corrupted (a byte of the
    largest tensor flipped: torch.load would not notice) or foreign (another tool's Lightning checkpoint)."""
    import zipfile

    data = bytearray(Path(src).read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    elif how == "random":
        data = bytearray(random.Random(0).randbytes(4096))
    elif how == "corrupted":
        with zipfile.ZipFile(src) as archive:
            info = max(archive.infolist(), key=lambda i: i.file_size)
        with open(src, "rb") as f:  # the data starts after the local header (30 bytes, the name, the extra field)
            f.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + name_len + extra_len
        data[start + info.file_size // 2] ^= 0xFF
    elif how == "foreign":
        torch.save({"state_dict": {"encoder.weight": torch.zeros(2, 2)}, "epoch": 0, "global_step": 3,
                    "pytorch-lightning_version": "2.6.0"}, dst)
        return
    else:
        raise ValueError(how)
    Path(dst).write_bytes(bytes(data))


def mount_tmpfs(path, options: str) -> bool:
    """Mount a tmpfs at `path` with `options` (e.g. "size=64k", "ro"); False where this process may not mount."""
    os.makedirs(path, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    except FileNotFoundError:
        return False
    return done.returncode == 0


def unmount(path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class permissions_apply:
    """Within: file permissions apply to this thread even as root (CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH are
    dropped from its effective capabilities, and restored after). `possible` is False where they cannot be."""

    _DAC = (1 << 1) | (1 << 2)

    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.possible = os.geteuid() != 0 or self._caps() is not None

    def _caps(self):
        header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
        return (header, data) if self.libc.capget(ctypes.byref(header), data) == 0 else None

    def __enter__(self):
        self.saved = None
        if os.geteuid() == 0:
            header, data = self._caps()
            self.saved = data[0].effective
            data[0].effective &= ~self._DAC
            assert self.libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            header, data = self._caps()
            data[0].effective = self.saved
            self.libc.capset(ctypes.byref(header), data)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("mlm-lightning: error")]
