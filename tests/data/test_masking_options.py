"""Masking options reach the collator through the data module, and whole words stay whole with a BPE tokenizer."""

import random

import torch

from mlm_lightning.data import MLMDataModule
from tests.support.models import bpe_tokenizer

WORDS = ["masking", "tokenizer", "boundaries", "lightning", "pieces", "whole", "words", "stay", "together",
         "model", "learns", "context", "from", "neighbours", "and", "the", "a", "of"]


def lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + " ." for _ in range(n)]


def broken_words(dm: MLMDataModule, tokenizer) -> tuple[int, int]:
    """(masked words checked, words only partly masked) over the training batches."""
    special = set(tokenizer.all_special_ids)
    checked = broken = 0
    for batch in dm.train_dataloader():
        masked = batch["labels"] != -100
        original = torch.where(masked, batch["labels"], batch["input_ids"])  # unmasked tokens are unchanged
        for row, row_masked in zip(original.tolist(), masked.tolist(), strict=True):
            pieces = tokenizer.convert_ids_to_tokens(row)
            for j in range(1, len(row)):
                continuation = not pieces[j].startswith("Ġ") and row[j] not in special and row[j - 1] not in special
                if continuation and (row_masked[j] or row_masked[j - 1]):
                    checked += 1
                    broken += row_masked[j] != row_masked[j - 1]
    return checked, broken


def data_module(tmp_path, masking: str, **kw) -> tuple[MLMDataModule, object]:
    texts = lines(400)
    tok = bpe_tokenizer(texts)
    tok.save_pretrained(tmp_path / "bpe")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(texts) + "\n")
    dm = MLMDataModule(train_files=str(corpus), tokenizer=str(tmp_path / "bpe"), masking=masking, line_by_line=True,
                       max_length=64, batch_size=16, mlm_probability=0.3, cache_dir=str(tmp_path / "cache"), **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm, dm.load_tokenizer()


def test_whole_word_masking_with_a_bpe_tokenizer_end_to_end(tmp_path):
    dm, tok = data_module(tmp_path, "whole_word")
    assert dm.collator.strategy.name == "whole_word"
    checked, broken = broken_words(dm, tok)
    assert checked > 200 and broken == 0
    token_dm, _ = data_module(tmp_path / "token", "token")  # the check can fail: token masking splits words
    assert broken_words(token_dm, tok)[1] > 50


def test_span_options_reach_the_collator(tmp_path):
    dm, _ = data_module(tmp_path, "span", mean_span_length=2.0)
    assert (dm.collator.strategy.name, dm.collator.strategy.mean_span_length) == ("span", 2.0)
