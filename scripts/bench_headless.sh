#!/bin/bash
# A headless encoder continued on domain text (issue 16 item 5): its new MLM head at --model.head_learning_rate
# 1e-3 (the default) and at 5e-5 (the encoder's rate: the old behaviour), and a model from scratch, the same steps
# and size each. Without a hub download the encoder is pre-trained here, on another domain (the offline corpus),
# and stripped of its head.   usage: scripts/bench_headless.sh DOMAIN_TEXT OUT_DIR [PRE_STEPS] [STEPS]
set -e
D=${1:?domain text file} H=${2:?output dir} PRE=${3:-80} T=${4:-35}
ML="python -m mlm_lightning.cli"
SIZE="--model.hidden_size 256 --model.num_hidden_layers 4 --model.num_attention_heads 4 --model.intermediate_size 1024"
COMMON="--trainer.accelerator cpu --trainer.enable_progress_bar false --data.max_length 128 --data.batch_size 16"
EVAL="--trainer.max_steps $T --trainer.check_val_every_n_epoch null --trainer.val_check_interval $T"
$ML fit $SIZE $COMMON --trainer.max_steps "$PRE" --trainer.default_root_dir "$H/pre"
python -c "
from transformers import AutoModelForMaskedLM, AutoTokenizer
AutoModelForMaskedLM.from_pretrained('$H/pre/export').bert.save_pretrained('$H/encoder')
AutoTokenizer.from_pretrained('$H/pre/export').save_pretrained('$H/encoder')"
$ML fit --model.model_name_or_path "$H/encoder" $COMMON $EVAL --data.train_files "$D" --trainer.default_root_dir "$H/head-1e-3"
$ML fit --model.model_name_or_path "$H/encoder" $COMMON $EVAL --data.train_files "$D" --model.head_learning_rate 5e-5 \
  --trainer.default_root_dir "$H/head-5e-5"
$ML fit $SIZE $COMMON $EVAL --data.train_files "$D" --trainer.default_root_dir "$H/scratch"
for r in head-1e-3 head-5e-5 scratch; do
  python -c "
import csv, glob
rows = [r for f in sorted(glob.glob('$H/$r/lightning_logs/*/metrics.csv')) for r in csv.DictReader(open(f)) if r.get('val/acc')]
print('$r', 'step', rows[-1]['step'], 'held-out top-1', rows[-1]['val/acc'], 'val/ppl', rows[-1]['val/ppl'])"
done
