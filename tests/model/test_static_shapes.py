"""Under torch.compile every validation batch reaches the encoder with one shape (no third graph)."""

import torch

from mlm_lightning.model import arch
from tests.support.models import module


def batch(rows: int, length: int, seed: int, padded: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (rows, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, ::4] = ids[:, ::4]
    positions = (labels.view(-1) != -100).nonzero().squeeze(1)
    out = {"input_ids": ids, "labels": labels, "masked_positions": positions,
           "masked_labels": labels.view(-1)[positions], "num_tokens": ids.numel(), "num_real_tokens": ids.numel()}
    if padded:
        out["attention_mask"] = torch.ones_like(ids)
    return out


def test_validation_batches_under_compile_keep_one_shape_and_the_same_loss(tokenizer, monkeypatch):
    monkeypatch.setattr(arch, "compile_encoder", lambda model: None)  # the shapes are the point, not inductor
    compiled, plain = module(tokenizer, compile=True).eval(), module(tokenizer).eval()
    shapes, real = [], arch.encode
    monkeypatch.setattr(arch, "encode", lambda m, ids, mask=None: shapes.append((ids.shape, mask is None))
                        or real(m, ids, mask))
    batches = [batch(8, 16, 0), batch(8, 16, 1, padded=True), batch(3, 16, 2)]  # the last one short
    with torch.no_grad():
        losses = [compiled.validation_step(b, i) for i, b in enumerate(batches)]
        shapes_compiled, shapes[:] = list(shapes), []
        expected = [plain.validation_step(b, i) for i, b in enumerate(batches)]
    assert set(shapes_compiled) == {(torch.Size([8, 16]), False)}
    assert len(set(shapes)) == 3  # without compile: as they come
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(losses, expected, strict=True))
