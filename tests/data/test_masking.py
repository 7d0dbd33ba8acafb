"""Statistics and determinism of the masking collator."""

import numpy as np
import pytest
import torch

from mlm_lightning.data.masking import MaskingCollator
from mlm_lightning.data.seeds import mask_seed
from mlm_lightning.data.tokenizer import train_wordpiece
from tests.support.text import sentences


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_wordpiece(sentences(300), str(tmp_path_factory.mktemp("tok") / "wp"), 200, 64)


def examples(tokenizer, n, epoch=0, seed=1, lengths=None):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        length = lengths[i % len(lengths)] if lengths else 30
        body = rng.integers(5, len(tokenizer), size=length - 2)
        ids = [tokenizer.cls_token_id, *body, tokenizer.sep_token_id]
        out.append({"input_ids": np.array(ids), "mask_seed": mask_seed(seed, epoch, i)})
    return out


def test_masked_share_ratios_and_labels(tokenizer):
    collate = MaskingCollator(tokenizer)
    special = torch.tensor(tokenizer.all_special_ids)
    masked = maskable = as_mask = as_random = kept = 0
    for epoch in range(20):
        exs = examples(tokenizer, 64, epoch, lengths=[10, 30, 64, 17])
        batch = collate(exs)
        original = torch.full_like(batch["input_ids"], tokenizer.pad_token_id)
        for row, e in enumerate(exs):
            original[row, : len(e["input_ids"])] = torch.as_tensor(e["input_ids"])
        is_masked = batch["labels"] != -100
        # never special tokens or padding
        assert not torch.isin(original[is_masked], special).any()
        # labels hold the original token exactly where masked, -100 elsewhere
        assert torch.equal(batch["labels"][is_masked], original[is_masked])
        assert torch.equal(batch["input_ids"][~is_masked], original[~is_masked])
        assert torch.equal(batch["masked_labels"], batch["labels"].view(-1)[batch["masked_positions"]])
        masked += int(is_masked.sum())
        maskable += int((~torch.isin(original, special)).sum())
        as_mask += int((batch["input_ids"][is_masked] == tokenizer.mask_token_id).sum())
        kept += int((batch["input_ids"][is_masked] == original[is_masked]).sum())
        replaced = batch["input_ids"][is_masked]
        as_random += int(((replaced != tokenizer.mask_token_id) & (replaced != original[is_masked])).sum())
        assert not torch.isin(replaced[replaced != tokenizer.mask_token_id], special).any()
    assert abs(masked / maskable - 0.15) < 0.01
    assert abs(as_mask / masked - 0.8) < 0.03
    assert abs(as_random / masked - 0.1) < 0.03  # random draws can hit the original token (rarely)
    assert abs(kept / masked - 0.1) < 0.03


def test_padding_and_attention_mask(tokenizer):
    batch = MaskingCollator(tokenizer)(examples(tokenizer, 4, lengths=[5, 11]))
    assert batch["input_ids"].shape[1] == 16  # longest 11, padded to a multiple of 8
    assert batch["attention_mask"].sum().item() == 5 + 11 + 5 + 11 == batch["num_real_tokens"]
    same = MaskingCollator(tokenizer)(examples(tokenizer, 4, lengths=[12]))
    assert "attention_mask" not in same and same["input_ids"].shape[1] == 12  # no padding: no mask at all


def test_same_seed_same_masks_new_epoch_new_masks(tokenizer):
    collate = MaskingCollator(tokenizer)
    a = collate(examples(tokenizer, 16, epoch=0))
    b = MaskingCollator(tokenizer)(examples(tokenizer, 16, epoch=0))
    c = collate(examples(tokenizer, 16, epoch=1))
    d = collate(examples(tokenizer, 16, epoch=0, seed=2))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], c["labels"])
    assert not torch.equal(a["labels"], d["labels"])
    # an example's mask does not depend on its batch
    e = collate(examples(tokenizer, 16, epoch=0)[3:5])
    assert torch.equal(e["labels"][0], a["labels"][3])


@pytest.mark.parametrize("words", [1, 2, 3])
def test_masked_share_is_mlm_probability_on_short_lines(tokenizer, words):
    # each token independently: a 1-token line is masked with p, not always (an "at least one prediction per
    # example" rule would give 100% / ~51% / ~35% here)
    n = 6000 // words
    batch = MaskingCollator(tokenizer)(examples(tokenizer, n, lengths=[words + 2]))
    share = (batch["labels"] != -100).sum().item() / (n * words)
    assert abs(share - 0.15) < 0.015, share
    # so some examples have nothing to predict at all (the model step then adds a zero loss)
    assert ((batch["labels"] != -100).sum(dim=1) == 0).any()


def test_nothing_maskable_masks_nothing(tokenizer):
    unk = [{"input_ids": np.array([tokenizer.cls_token_id] + [tokenizer.unk_token_id] * 5 + [tokenizer.sep_token_id]),
            "mask_seed": mask_seed(0, 0, i)} for i in range(4)]
    batch = MaskingCollator(tokenizer)(unk)
    assert batch["masked_positions"].numel() == 0 and (batch["labels"] == -100).all()
    assert torch.equal(batch["input_ids"], torch.as_tensor(np.stack([e["input_ids"] for e in unk])))


def test_configurable_ratios(tokenizer):
    batch = MaskingCollator(tokenizer, 0.5, mask_replace_prob=1.0, random_replace_prob=0.0)(examples(tokenizer, 32))
    is_masked = batch["labels"] != -100
    assert (batch["input_ids"][is_masked] == tokenizer.mask_token_id).all()
