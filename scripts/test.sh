#!/usr/bin/env bash
# Set up, then run the whole test suite (the fast tests and the @slow ones: resume, interrupts, DDP).
# Pass pytest arguments through, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
python -m pytest "$@"
