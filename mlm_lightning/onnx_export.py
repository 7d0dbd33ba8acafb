"""A masked LM as `model.onnx` beside its Hugging Face files: what ONNX Runtime, optimum's `ORTModelForMaskedLM`
and `mlm-lightning serve --backend onnx` load.

Inputs `input_ids` and `attention_mask` (and `token_type_ids` for a family with more than one segment type, as
optimum exports them), output `logits` (batch, sequence, vocabulary); batch and sequence are dynamic axes. The
graph comes from torch's own exporter (`torch.onnx.export(dynamo=True)`, the torch.export-based one: the
TorchScript exporter is deprecated), opset 18.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

import torch

from mlm_lightning.errors import MLMError, check
from mlm_lightning.model import arch

log = logging.getLogger("mlm_lightning")

ONNX_FILE = "model.onnx"
OPSET = 18
PROTOBUF_LIMIT = 2 << 30  # an ONNX file holds at most 2 GB: larger weights go to `model.onnx.data` beside it


def input_names(config) -> list[str]:
    names = ["input_ids", "attention_mask"]
    if getattr(config, "type_vocab_size", 1) > 1:
        names.append("token_type_ids")
    return names


class _Logits(torch.nn.Module):
    """The model's MLM logits as the one output (transformers' forward returns a ModelOutput)."""

    def __init__(self, model, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def check_onnx_available() -> None:
    """Before any work: the exporter's packages (the `onnx` extra)."""
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError:
            raise MLMError(f"--format onnx needs the {package!r} package: pip install 'mlm-lightning[onnx]'") \
                from None


def save_onnx(model, directory: str) -> str:
    """Write `model` (a `*ForMaskedLM` of `arch.FAMILIES`) as `directory/model.onnx`; one line if it cannot be."""
    check_onnx_available()
    family = model.config.model_type
    check(family in arch.FAMILIES, f"a {family!r} model cannot be exported to ONNX; supported:"
                                   f" {', '.join(arch.FAMILIES)}")
    names = input_names(model.config)
    # an example of 2 x 16 tokens: the dynamic axes make any batch and length work (up to the position limit)
    ids = torch.full((2, 16), model.config.pad_token_id or 0, dtype=torch.long)
    ids[:, 1:15] = min(5, model.config.vocab_size - 1)
    example = (ids, torch.ones_like(ids), torch.zeros_like(ids))[: len(names)]
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {name: {0: batch, 1: sequence} for name in names}
    path = os.path.join(directory, ONNX_FILE)
    large = sum(p.numel() * p.element_size() for p in model.parameters()) >= PROTOBUF_LIMIT
    wrapper = _Logits(model.float().eval(), names).eval()
    try:
        with _quiet_exporter():
            torch.onnx.export(wrapper, example, path, input_names=names, output_names=["logits"],
                              dynamic_shapes=shapes, opset_version=OPSET, dynamo=True, external_data=large)
    except MLMError:
        raise
    except Exception as e:  # the exporter's own errors are long and many-typed: its first line says what failed
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MLMError(f"the {family} model cannot be exported to ONNX by torch {torch.__version__} ({first});"
                       " export it with --format hf") from None
    return path


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints its progress on stdout (`[torch.onnx] ...`) and a warning for each optional operator
    library it misses (torchvision); export's own output is the path it wrote."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
