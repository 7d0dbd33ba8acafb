#!/usr/bin/env bash
# The GPU check: benchmark (real fit vs plain loop vs HF Trainer, MFU), a 300-step fit of configs/bert-base-gpu.yaml
# with CUDA's sync debug mode, FSDP (one process) fit + resume + export, BERT/RoBERTa/ModernBERT tokens/s (with
# the attention each ran); one summary block at the end. Under 9 minutes on one H100/H200. `--cpu` runs the same
# plumbing tiny on a CPU (no GPU figures).
#   bash scripts/gpu_check.sh            # on a GPU machine, from the repository root
#   bash scripts/gpu_check.sh --cpu      # anywhere
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
exec timeout 560 "$PYTHON" scripts/gpu_check.py "$@"
