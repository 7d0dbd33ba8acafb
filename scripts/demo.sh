#!/usr/bin/env bash
# Set up, train the offline default (a small ModernBERT from scratch on CPython's language reference and the
# standard library's docstrings, with a byte-level BPE vocabulary trained on them), then fill in masked words with
# the exported model, in sentences of the held-out modules (text the model never trained on; picked by a rule,
# not by hand).
# The recipe is mlm_lightning/configs/default.yaml's (configs/ links to it), what a bare `mlm-lightning fit` runs.
# Extra arguments go to `mlm-lightning fit`, e.g. `bash scripts/demo.sh --trainer.max_steps 500`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# a second run resumes the first (or, when it is finished, says there is nothing to train) instead of being
# refused for overwriting its checkpoints; a first run starts fresh (no --ckpt_path: Lightning would warn that
# there is nothing to resume)
RESUME=()
[ -e runs/demo/checkpoints/last.ckpt ] && RESUME=(--ckpt_path last)
mlm-lightning fit --config configs/default.yaml --trainer.default_root_dir runs/demo "${RESUME[@]}" "$@" || {
  rc=$?
  [ ${#RESUME[@]} -eq 0 ] || echo "scripts/demo.sh: runs/demo holds an earlier run, which the line above refuses to" \
    "resume (a run of an earlier version's recipe?): move it away (mv runs/demo runs/demo.old) and run again" >&2
  exit $rc
}
# the first held-out lines of 8-20 words, each with its first common word masked (mlm_lightning/data/offline.py)
mapfile -t SENTENCES < <(python -m mlm_lightning.data.offline 4)
mlm-lightning fill-mask --model runs/demo/export "${SENTENCES[@]}"
