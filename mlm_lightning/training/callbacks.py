"""Callbacks that make runs observable (checkpoints: `checkpointing.py`; signals: `stopping.py`).

- `ThroughputLogger`: real tokens/s, padding share and (on GPU) MFU with Lightning's `Throughput`; FLOPs from
  the module's `train_flops` (the model's real config).
- `JSONLPredictionWriter`: `predict` output in input order.
"""

from __future__ import annotations

import json
import os
import time

import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import BasePredictionWriter, Callback

from mlm_lightning.errors import check
from mlm_lightning.files import atomic_file
from mlm_lightning.metrics import MFU, PAD_SHARE, TOKENS_PER_S

# Dense (no-sparsity) tensor-core peaks from NVIDIA's datasheets, TFLOP/s: (16-bit, tf32, fp32). Lightning's own
# table misses the H200 and gives the H100 NVL its with-sparsity figure, which halves the MFU shown.
# Matched on the lower-case device name, most specific first ("h100 nvl" before "h100").
DENSE_PEAK_TFLOPS = {
    "h200 nvl": (835.5, 417.5, 60.0),
    "h200": (989.4, 494.7, 66.9),
    "h100 nvl": (835.5, 417.5, 60.0),
    "h100 pcie": (756.5, 378.0, 51.2),
    "h100": (989.4, 494.7, 66.9),  # SXM ("NVIDIA H100 80GB HBM3")
    "a100": (312.0, 156.0, 19.5),
    "l40s": (362.1, 183.0, 91.6),
    "l4": (121.0, 60.0, 30.3),
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of this GPU for `dtype` (`DENSE_PEAK_TFLOPS`); None off GPU or for a GPU not in the
    table (the caller says so: no MFU rather than a wrong one)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    words = name.replace("-", " ").split()
    for key, peaks in DENSE_PEAK_TFLOPS.items():
        if all(part in words for part in key.split()):
            if dtype in (torch.bfloat16, torch.float16):
                return peaks[0] * 1e12
            tf32 = torch.get_float32_matmul_precision() != "highest"
            return (peaks[1] if tf32 else peaks[2]) * 1e12
    return None


def _precision_dtype(precision: str) -> torch.dtype:
    if "bf16" in precision:
        return torch.bfloat16
    return torch.float16 if "16" in precision else torch.float32


class ThroughputLogger(Callback):
    """Logs `perf/tokens_per_s` (real, non-pad tokens), `perf/pad_share` and, on GPU, `perf/mfu`.

    Nothing here waits for the GPU at ordinary steps: the counts come from the collator as Python ints and
    the FLOPs from the batch shapes. Only a measuring step synchronizes the device (so the clock reads the
    time the GPU really took); on GPU those are at least `gpu_interval` steps apart. MFU counts the FLOPs of
    the batches as run (padding included: `perf/pad_share` says how much of them was padding).
    """

    def __init__(self, window: int = 20, gpu_interval: int = 50):
        """Args:
        window: Steps the rates are averaged over (at least one measuring interval).
        gpu_interval: On GPU, measure at most every this many steps (rounded up to a multiple of
            `log_every_n_steps`): each measurement waits for the device.
        """
        self.window, self.gpu_interval = window, gpu_interval

    def on_train_start(self, trainer, pl_module) -> None:
        self.cuda = pl_module.device.type == "cuda"
        every = trainer.log_every_n_steps
        # a multiple of log_every_n_steps: values logged at other steps would never reach the logger
        self.interval = every * -(-self.gpu_interval // every) if self.cuda and every else every
        dtype = _precision_dtype(str(trainer.precision))
        available = peak_flops(pl_module.device, dtype)
        points = max(2, -(-self.window // max(1, self.interval)) + 1)  # Throughput rates span points - 1 gaps
        self.throughput = Throughput(available_flops=available, world_size=trainer.world_size, window_size=points)
        self.sparse_head = bool(getattr(pl_module.hparams, "sparse_head", True))
        self.start = time.perf_counter()
        # ints, or device tensors summed on the device if a collator ever returns tensors (read at a measurement)
        self.totals = dict(batches=0, samples=0, lengths=0, padded=0)
        self.flops = 0  # since the last measurement (Throughput wants per-update increments)
        self.latest: dict[str, float] = {}  # the last values logged, as Python floats (the progress bar reads them)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        t = self.totals
        batch_size, seq_len = batch["input_ids"].shape
        n_tokens = batch["num_tokens"]
        head_rows = batch["masked_positions"].numel() if self.sparse_head else n_tokens  # a shape: no sync
        t["batches"] += 1
        t["samples"] += batch_size
        t["lengths"] += batch["num_real_tokens"]
        t["padded"] += n_tokens
        self.flops += pl_module.train_flops(seq_len, n_tokens, head_rows)  # `MLMModule.train_flops`
        # Lightning's own logging step (what `should_update_logs` tests; LearningRateMonitor reads it too)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
        if not self.interval or step % self.interval:
            return
        if self.cuda:
            torch.cuda.synchronize(pl_module.device)
        counts = {k: int(v) for k, v in t.items()}
        self.throughput.update(
            time=time.perf_counter() - self.start, batches=counts["batches"], samples=counts["samples"],
            lengths=counts["lengths"], flops=int(self.flops),
        )
        self.flops = 0
        metrics = self.throughput.compute()
        out = {PAD_SHARE: 1.0 - counts["lengths"] / max(1, counts["padded"])}
        if "device/items_per_sec" in metrics:
            out[TOKENS_PER_S] = metrics["device/items_per_sec"] * trainer.world_size
        if "device/mfu" in metrics:
            out[MFU] = metrics["device/mfu"]
        self.latest = out
        pl_module.log_dict(out, batch_size=1)


class JSONLPredictionWriter(BasePredictionWriter):
    """`predict` writes one JSON object per input line, in input order, whatever the number of processes.

    Each process keeps its own records; at the end they are gathered through the process group (not through
    files, which a node-local directory would hide from rank 0) and rank 0 writes the file atomically."""

    def __init__(self, output: str | None = None):
        """Args:
        output: The JSONL file to write (default: <trainer.default_root_dir>/predictions.jsonl).
        """
        super().__init__(write_interval="batch")
        self.output = output

    def on_predict_start(self, trainer, pl_module) -> None:
        self.output = self.output or os.path.join(trainer.default_root_dir, "predictions.jsonl")
        self._records: list[dict] = []
        # never replace a file predict did not write: decided on rank 0 (the one that writes) for all processes,
        # before any prediction is made
        problem = self._foreign_file() if trainer.is_global_zero else None
        if trainer.world_size > 1:
            problem = trainer.strategy.broadcast(problem, src=0)
        check(problem is None, problem or "")

    def _foreign_file(self) -> str | None:
        """Why `output` must not be replaced (a user's file is in the way), or None (absent, or a previous output:
        a JSONL whose first record has the keys this writer writes)."""
        if not os.path.lexists(self.output):
            return None
        try:
            with open(self.output, encoding="utf-8") as f:
                first = json.loads(f.readline())
            if isinstance(first, dict) and {"index", "text", "predictions"} <= set(first) and os.path.isfile(
                    self.output) and not os.path.islink(self.output):
                return None
        except (OSError, ValueError, UnicodeDecodeError):
            pass
        return (f"--prediction_writer.output {self.output!r} exists and is not a file that predict wrote; predict"
                " replaces only its own output: pick another path")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self._records += prediction

    def on_predict_end(self, trainer, pl_module) -> None:
        records = self._records
        if trainer.world_size > 1:
            import torch.distributed as dist

            parts = [None] * trainer.world_size
            dist.all_gather_object(parts, records)
            records = [r for part in parts for r in part]
        if trainer.is_global_zero:
            records.sort(key=lambda r: r["index"])
            with atomic_file(self.output) as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            print(f"mlm-lightning: wrote {len(records)} predictions to {self.output}")
