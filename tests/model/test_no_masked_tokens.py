"""A batch with nothing masked (all [UNK], or an unlucky draw) adds a zero loss: never NaN, no polluted metrics."""

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mlm_lightning.data.masking import MaskingCollator
from mlm_lightning.data.seeds import mask_seed
from tests.support.models import module
from tests.support.text import sentences


def unk_batch(tokenizer, n=4):
    ids = [tokenizer.cls_token_id] + [tokenizer.unk_token_id] * 6 + [tokenizer.sep_token_id]
    return MaskingCollator(tokenizer)([{"input_ids": np.array(ids), "mask_seed": mask_seed(0, 0, i)} for i in range(n)])


def text_batch(tokenizer, n=8, seed=0):
    exs = [{"input_ids": np.array(tokenizer(t)["input_ids"]), "mask_seed": mask_seed(seed, 0, i)}
           for i, t in enumerate(sentences(n, seed=seed))]
    return MaskingCollator(tokenizer, mlm_probability=0.3)(exs)


@pytest.mark.parametrize("sparse", [True, False])
def test_all_unk_batch_gives_a_zero_loss_with_every_parameter_in_the_graph(tokenizer, sparse):
    batch = unk_batch(tokenizer)
    assert batch["masked_positions"].numel() == 0
    m = module(tokenizer, sparse_head=sparse)
    m.log = lambda *a, **k: None  # no trainer here
    loss = m._shared_step(batch, "train")
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    # every parameter gets a (zero) gradient, none is None: DDP needs no find_unused_parameters
    grads = {n: p.grad for n, p in m.model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(not g.any() for g in grads.values())


def loader(batches):
    return DataLoader(batches, batch_size=None, collate_fn=lambda x: x)


def test_training_and_validation_with_empty_batches(tokenizer):
    empty, full = unk_batch(tokenizer), text_batch(tokenizer)
    m = module(tokenizer)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    # training: the empty batches pass (no NonFiniteLossError), the text batches still train the model
    trainer.fit(m, loader([empty, full, empty, full]), loader([empty, full, empty]))
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    assert trainer.global_step == 4 and all(np.isfinite(v) for v in metrics.values()), metrics
    assert any(not torch.equal(p, q) for p, q in zip(m.parameters(), module(tokenizer).parameters(), strict=True))
    # validation: empty batches neither add a 0 to val/loss nor touch val/ppl and val/acc
    reference = trainer.validate(m, loader([full]), verbose=False)[0]
    for key in ("val/loss", "val/ppl", "val/acc"):
        assert metrics[key] == pytest.approx(reference[key], rel=1e-6), key
