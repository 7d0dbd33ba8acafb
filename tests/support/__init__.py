"""Code the tests share, one module per role (fixtures live in tests/conftest.py; no test module imports another):

- `cli`: running `mlm-lightning` (in this process, in a new one, as two nodes), the tiny fit arguments, error lines.
- `text`: the sentences tiny corpora are made of, and datasets written to disk.
- `models`: tiny models, tokenizers and model directories built offline.
- `runs`: reading what a fit left behind (logged metrics, resume steps, checkpoints, JSONL records).
- `server`: a `serve` process and its HTTP client, and comparisons of fill-mask answers.
- `callbacks`: test-only Lightning callbacks, given to the CLI by class path
  (`--trainer.callbacks+=tests.support.callbacks.SignalAt`).
- `faults`: damaged checkpoints, full or read-only mounts, file permissions that apply even to root.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
