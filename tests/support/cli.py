"""Running the CLI: `mlm-lightning ARGS` in this process or in a new one, a tiny `fit` on the CPU, two simulated
nodes, and the one error line a refused command prints."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from mlm_lightning.cli.main import main

# a tiny BERT that trains in seconds on 2 CPU cores; with dropout, so exact-resume tests cover its RNG
TINY_MODEL = [
    "--model.hidden_size", "32", "--model.num_hidden_layers", "2", "--model.num_attention_heads", "2",
    "--model.intermediate_size", "64", "--model.max_position_embeddings", "64", "--model.dropout", "0.1",
]
TINY_DATA = ["--data.max_length", "32", "--data.batch_size", "8", "--data.vocab_size", "300"]


def run_cli(*args: str) -> int:
    """Run `mlm-lightning ARGS` in this process; returns the exit code."""
    try:
        main(list(args))
    except SystemExit as e:
        return 0 if e.code is None else int(e.code)
    return 0


def cli(*args: str) -> list[str]:
    """The command line of `mlm-lightning ARGS` in a new process."""
    return [sys.executable, "-m", "mlm_lightning.cli", *args]


def fit_args(corpus: str, root, *extra: str) -> list[str]:
    """`fit` of the tiny model on `corpus` into `root` on the CPU, logging every step, no bar or summary."""
    return ["fit", "--data.train_files", corpus, *TINY_MODEL, *TINY_DATA, "--trainer.accelerator", "cpu",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1", *extra]


def error_line(err: str) -> str:
    """The one error line a refused command printed on stderr (asserts there is exactly one, and no traceback)."""
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("mlm-lightning: error")]


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
