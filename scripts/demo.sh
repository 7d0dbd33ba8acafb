#!/usr/bin/env bash
# Set up, train the offline default (a small BERT from scratch on CPython's bundled language reference,
# with a WordPiece vocabulary trained on it), then fill in masked words with the exported model.
# Extra arguments go to `mlm-lightning fit`, e.g. `bash scripts/demo.sh --trainer.max_epochs 2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# --ckpt_path last: a second run resumes (or, when finished, re-exports) the first instead of being refused
# for overwriting its checkpoints
mlm-lightning fit --config configs/default.yaml --trainer.default_root_dir runs/demo --ckpt_path last "$@"
mlm-lightning fill-mask --model runs/demo/export \
  "break may only occur syntactically nested in a for or [MASK] loop." \
  "a class definition defines a [MASK] object." \
  "the [MASK] statement is used to leave a loop." \
  "if the condition is false, the [MASK] clause is executed."
