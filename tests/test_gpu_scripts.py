"""The GPU benchmark and check scripts run their CPU smoke modes (what they measure needs a GPU)."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def test_benchmark_gpu_mode_times_the_real_fit_beside_the_loop_on_a_cpu():
    done = subprocess.run([sys.executable, "scripts/benchmark.py", "--mode", "gpu", "--tiny", "--steps", "2",
                           "--warmup", "1", "--precision", "32-true", "--only", "loop,ours"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "(b) plain loop" in out and "(c) ours, Lightning fit" in out and "(c)/(b) = " in out
    assert "(c) at the config's intervals: a validation" in out  # the real fit validated and saved
    assert "no MFU" in out  # a CPU has no peak in the table


def test_gpu_check_runs_its_stages_and_prints_one_summary_on_a_cpu():
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", "--stages", "sync,fsdp,families"], cwd=ROOT,
                          env={**ENV, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.split("======== gpu_check summary ========")[1]
    assert "sync fit: configs/bert-base-gpu.yaml, 30 steps" in summary and "exit 0" in summary
    assert "fsdp: skipped" in summary
    rates = [line for line in summary.splitlines() if "real tokens/s" in line]
    assert [line.split()[0] for line in rates] == ["bert", "roberta", "modernbert"]
    assert all("attention sdpa" in line for line in rates)  # no flash-attn here: `auto` is SDPA
