"""`serve --backend onnx`: fill-mask on ONNX Runtime (CPU) from the `model.onnx` that `export --format onnx`
writes beside the Hugging Face files. Everything but the forward pass (tokenizing, masks, top-k, the answers'
text) is `FillMasker`'s, so both backends answer alike."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import torch
from transformers import AutoTokenizer

from mlm_lightning.data.tokenizer import drop_saved_padding
from mlm_lightning.errors import MLMError, check
from mlm_lightning.hub import load_pretrained
from mlm_lightning.model.arch import check_fits, pretrained_config
from mlm_lightning.model.checkpoint import check_model_dir
from mlm_lightning.model.fill_mask import FillMasker
from mlm_lightning.onnx_export import ONNX_FILE

BACKENDS = ("torch", "onnx", "auto")


def onnx_path(model: str) -> str | None:
    """The `model.onnx` of a model directory, if it has one."""
    path = os.path.join(model, ONNX_FILE)
    return path if os.path.isdir(model) and os.path.isfile(path) else None


class _Graph:
    """What `FillMasker` reads of a model besides running it: its config, and its embedding rows (check_fits)."""

    def __init__(self, config):
        self.config = config

    def get_input_embeddings(self):
        return SimpleNamespace(num_embeddings=self.config.vocab_size)


class OnnxFillMasker(FillMasker):
    def __init__(self, model_dir: str, **kwargs):
        try:
            import onnxruntime
        except ImportError:
            raise MLMError("--backend onnx needs onnxruntime: pip install 'mlm-lightning[onnx]'") from None
        path = onnx_path(model_dir)
        check(path is not None, f"--model {model_dir!r} has no {ONNX_FILE}: export it with mlm-lightning export"
                                " --format onnx, or serve it with --backend torch")
        check_model_dir(model_dir, "--model")
        config = pretrained_config(model_dir, "--model")
        tokenizer = drop_saved_padding(load_pretrained(AutoTokenizer, model_dir, "tokenizer"), repr(model_dir))
        check_fits(config, tokenizer, f"--model {model_dir!r}", "put the model's own tokenizer files beside it")
        try:
            options = onnxruntime.SessionOptions()
            # idle threads sleep rather than spin (as the torch backend's OpenMP waits passively): on a machine
            # shared with other work, spinning threads take the cores the busy ones need
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # (onnxruntime's own error types: a damaged or foreign file)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise MLMError(f"{path!r} cannot be loaded by onnxruntime ({first}); export it again with"
                           " mlm-lightning export --format onnx") from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        check(set(self.inputs) <= {"input_ids", "attention_mask", "token_type_ids"},
              f"{path!r} takes inputs {self.inputs}, not a masked LM's; export it again with mlm-lightning export"
              " --format onnx")
        super().__init__(_Graph(config), tokenizer, "cpu", **kwargs)

    def _logits(self, input_ids, attention, rows, cols) -> torch.Tensor:
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention.numpy(),
                "token_type_ids": np.zeros_like(input_ids.numpy())}
        logits = self.session.run(["logits"], {name: feed[name] for name in self.inputs})[0]
        return torch.from_numpy(logits)[rows, cols].float()
