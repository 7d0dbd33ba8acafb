"""Reading what a fit left behind: its logged metrics, the steps each fit logged at (resumes), its checkpoints, and
JSONL records written by test callbacks."""

from __future__ import annotations

import csv
import glob
import json
import os

import torch


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


def column(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


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


def state(root, name: str = "last.ckpt") -> dict:
    return torch.load(f"{root}/checkpoints/{name}", weights_only=True)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
