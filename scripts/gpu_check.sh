#!/usr/bin/env bash
# The GPU check, one prepared run on the lent GPU machine: preflight, then the fit's tokens/s and MFU beside the
# plain loop, host syncs per step, HF Trainer, the model families and FSDP (sharded) fit + resume + export, each
# stage under its own budget and one deadline; one summary block, printed whatever happens (scripts/gpu_check.py
# says what each stage does and how long it should take: ~6.5 minutes on one H100).
#   bash scripts/gpu_check.sh            # on a GPU machine, from anywhere; OUT=DIR keeps the log and the summary
#   bash scripts/gpu_check.sh --cpu      # the same plumbing, tiny, on a CPU (no GPU figures, no timing verdicts);
#                                        # scripts/gpu_dry_run.sh runs it in a venv like the GPU machine's
# Its Python is $PYTHON, else python3 (the GPU machine's Python; it has no `python`). Missing packages there:
# scripts/gpu_wheels.sh and the README's install line.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
# The hard limit: gpu_check.py stops its stages at its deadline, 20 s before this; if it hangs anyway, SIGTERM
# makes it stop the running stage and print the summary, and SIGKILL follows 10 s later (-k): a SIGTERM alone is
# caught by a fit's graceful stop, which would let it go on. --cpu on a shared 2-core machine gets longer.
LIMIT=${GPU_CHECK_LIMIT:-480}
for arg in "$@"; do
  if [ "$arg" = --cpu ]; then LIMIT=${GPU_CHECK_LIMIT:-1500}; fi
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
# (a --deadline given on the command line comes later and wins)
exec timeout -k 10 "$LIMIT" "$PYTHON" scripts/gpu_check.py --deadline $((LIMIT - 20)) "$@"
