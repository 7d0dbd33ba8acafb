#!/usr/bin/env bash
# Create .venv (if needed) and install mlm-lightning into it. Safe to run again: it only installs what is missing.
#
# torch: a plain `pip install torch` on Linux pulls the CUDA build (several GB). Without a GPU set
# TORCH_SPEC to a CPU wheel, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu";
# on the project's CI machines `torch==2.13.0` resolves to a CPU wheel that lies on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  python -m pip install -q $TORCH_SPEC
fi
if ! python -c "import mlm_lightning, lightning, transformers, pytest" 2>/dev/null || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setup: installing mlm-lightning and its dependencies"
  python -m pip install -q -e ".[dev]"
  touch .venv/.installed
fi
