#!/usr/bin/env bash
# Set up, train the offline default (a small BERT from scratch on CPython's bundled language reference,
# with a WordPiece vocabulary trained on it), then fill in masked words with the exported model.
# Extra arguments go to `mlm-lightning fit`, e.g. `bash scripts/demo.sh --trainer.max_epochs 2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
mlm-lightning fit --trainer.default_root_dir runs/demo "$@"
mlm-lightning fill-mask --model runs/demo/export \
  "the [MASK] statement is used to leave a loop." \
  "a function is defined with the [MASK] keyword." \
  "if the condition is true, the [MASK] clause is skipped."
