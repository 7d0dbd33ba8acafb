"""Callbacks that make runs observable (checkpoints: `checkpointing.py`; signals: `stopping.py`).

- `ThroughputLogger`: real tokens/s, padding share and (on GPU) MFU with Lightning's `Throughput`.
- `JSONLPredictionWriter`: `predict` output in input order.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import BasePredictionWriter, Callback


class ThroughputLogger(Callback):
    """Logs `perf/tokens_per_s` (real, non-pad tokens), `perf/pad_share` and, on GPU, `perf/mfu`."""

    def __init__(self, window: int = 20):
        self.window = window

    def on_train_start(self, trainer, pl_module) -> None:
        config = pl_module.model.config
        precision = str(trainer.precision)
        dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
        available = get_available_flops(pl_module.device, dtype) if pl_module.device.type == "cuda" else None
        self.throughput = Throughput(available_flops=available, world_size=trainer.world_size, window_size=self.window)
        n_layers, width = config.num_hidden_layers, config.hidden_size
        # training FLOPs = 6 x (matmul params) per token + attention scores, plus the head at masked tokens
        self.flops_per_token = 6 * 12 * n_layers * width * width
        self.attn_flops_per_token_per_len = 6 * 2 * n_layers * width
        self.head_flops_per_masked = 6 * (width * width + width * config.vocab_size)
        self.dense_head = not pl_module.hparams.sparse_head
        self.start = time.perf_counter()
        self.totals = dict(batches=0, samples=0, lengths=0, padded=0, flops=0.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        t = self.totals
        n_tokens, real = batch["num_tokens"], batch["num_real_tokens"]
        batch_size, seq_len = batch["input_ids"].shape
        n_head = n_tokens if self.dense_head else batch["masked_positions"].numel()
        t["batches"] += 1
        t["samples"] += batch_size
        t["lengths"] += real
        t["padded"] += n_tokens
        t["flops"] += (self.flops_per_token + self.attn_flops_per_token_per_len * seq_len) * n_tokens
        t["flops"] += self.head_flops_per_masked * n_head
        if trainer.global_step % trainer.log_every_n_steps:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.throughput.update(
            time=time.perf_counter() - self.start, batches=t["batches"], samples=t["samples"],
            lengths=t["lengths"], flops=t["flops"],
        )
        metrics = self.throughput.compute()
        out = {"perf/pad_share": 1.0 - t["lengths"] / max(1, t["padded"])}
        if "device/items_per_sec" in metrics:
            out["perf/tokens_per_s"] = metrics["device/items_per_sec"] * trainer.world_size
        if "device/mfu" in metrics:
            out["perf/mfu"] = metrics["device/mfu"]
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
            directory = os.path.dirname(os.path.abspath(self.output))
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".predictions-", suffix=".tmp", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                os.replace(tmp, self.output)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            print(f"mlm-lightning: wrote {len(records)} predictions to {self.output}")
