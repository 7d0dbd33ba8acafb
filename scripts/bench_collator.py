"""Time the masking collator on 32 packed blocks of 128 tokens, for each masking strategy.

    python scripts/bench_collator.py [--reference OLD_COLLATOR.py] [--repeats 300]

`--reference` loads another version of `mlm_lightning/collator.py` (e.g. `git show REV:mlm_lightning/collator.py >
/tmp/old_collator.py`) and prints every time as a ratio to that version's token masking (else to this one's),
from the same run.
Runs single-threaded (as in DataLoader workers) so that other load on the machine disturbs it less.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time

import numpy as np
import torch

from mlm_lightning.data.masking import MaskingCollator
from mlm_lightning.data.seeds import mask_seed
from mlm_lightning.data.tokenizer import train_wordpiece


def examples(tokenizer, rows=32, length=128, lines_per_block=6, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(rows):
        ids = rng.integers(len(tokenizer.all_special_ids), len(tokenizer), size=length)
        ids[0] = tokenizer.cls_token_id
        ids[rng.integers(1, length, size=lines_per_block)] = tokenizer.sep_token_id
        word_starts = rng.random(length) < 0.7  # ~1.4 pieces per word
        out.append({"input_ids": ids, "mask_seed": mask_seed(1, 0, i), "word_starts": word_starts})
    return out


def timed(collate, batch, repeats: int) -> float:
    for _ in range(20):
        collate(batch)
    start = time.perf_counter()
    for _ in range(repeats):
        collate(batch)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", help="another collator.py to time (token masking) for comparison")
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    words = [f"w{i} x{i % 7}y z{i % 13}" for i in range(3000)]
    tokenizer = train_wordpiece(words, tempfile.mkdtemp() + "/wp", 500, 128)
    batch = examples(tokenizer)
    results = {}
    if args.reference:
        spec = importlib.util.spec_from_file_location("reference_collator", args.reference)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        results["reference token"] = timed(module.MaskingCollator(tokenizer), batch, args.repeats)
    for masking in ("token", "whole_word", "span"):
        results[masking] = timed(MaskingCollator(tokenizer, masking=masking), batch, args.repeats)
    base = results.get("reference token", results["token"])
    for name, ms in results.items():
        print(f"{name:16s} {ms:7.3f} ms per 32x128 batch   x{ms / base:.2f}")


if __name__ == "__main__":
    main()
