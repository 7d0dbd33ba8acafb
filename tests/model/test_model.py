"""The LightningModule: parameter groups, sparse head == dense head, learning."""

import warnings
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlm_lightning.data.masking import MaskingCollator
from mlm_lightning.data.seeds import mask_seed
from tests.support.models import module
from tests.support.text import sentences


def batch_of(tokenizer, n=8, seed=0, padded=True):
    texts = sentences(n, seed=seed)
    exs = []
    for i, t in enumerate(texts):
        ids = tokenizer(t)["input_ids"]
        if not padded:
            ids = (ids * 4)[:16]
        exs.append({"input_ids": np.array(ids), "mask_seed": mask_seed(seed, 0, i)})
    return MaskingCollator(tokenizer, mlm_probability=0.3)(exs)


def test_no_weight_decay_on_bias_and_layernorm(tokenizer):
    m = module(tokenizer)
    m._trainer = SimpleNamespace(estimated_stepping_batches=100)
    opt = m.configure_optimizers()["optimizer"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in m.model.named_parameters()}
    assert all(n.endswith("bias") or "LayerNorm" in n for n in (names[id(p)] for p in no_decay["params"]))
    assert all(p.ndim == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.model.parameters()))


@pytest.mark.parametrize("padded", [True, False])
def test_sparse_loss_and_grads_equal_dense(tokenizer, padded):
    batch = batch_of(tokenizer, padded=padded)
    assert ("attention_mask" in batch) == padded
    losses, grads = [], []
    for sparse in (True, False):
        m = module(tokenizer, sparse_head=sparse)
        logits, labels = m(batch)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=-100)
        loss.backward()
        losses.append(loss)
        grads.append({n: p.grad.clone() for n, p in m.model.named_parameters()})
    hf = module(tokenizer).model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                 labels=batch["labels"]).loss
    assert torch.allclose(losses[0], losses[1], atol=1e-5) and torch.allclose(losses[0], hf, atol=1e-5)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_tiny_bert_overfits_one_batch(tokenizer):
    m = module(tokenizer)
    batch = batch_of(tokenizer, n=16)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(80):
        logits, labels = m(batch)
        loss = F.cross_entropy(logits, labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.2, (first, loss.item())


def test_the_deepspeed_clipping_notice_is_silenced_once_a_run_sets_up(tokenizer):
    # the module leaves DeepSpeed's own clipping alone, so Lightning's "will not actually clip" notice is wrong
    m = module(tokenizer)
    m.trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    notice = "Since DeepSpeed handles gradient clipping internally, the default hook will not actually clip gradients."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.setup("fit")
        warnings.warn(notice, UserWarning, stacklevel=1)
        warnings.warn("another warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another warning"]
