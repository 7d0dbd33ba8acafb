"""Checkpoint -> Hugging Face directory (config.json, model.safetensors, tokenizer files), atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile

import torch

from mlm_lightning.errors import MLMError, check
from mlm_lightning.hub import load_pretrained


def check_checkpoint_path(path: str) -> None:
    check(os.path.exists(path), f"checkpoint {path!r} does not exist; check the path or use --ckpt_path last")
    check(
        os.path.isfile(path) and zipfile.is_zipfile(path),
        f"{path!r} is not a checkpoint (expected a .ckpt written by mlm-lightning fit)",
    )


def load_checkpoint(path: str):
    """(BertForMaskedLM, tokenizer) from an mlm-lightning .ckpt, loaded with `weights_only=True`."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    check_checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MLMError(f"{path!r} could not be read as a checkpoint ({type(e).__name__}); is it complete?") from e
    meta = ckpt.get("mlm_lightning") if isinstance(ckpt, dict) else None
    check(meta is not None, f"{path!r} is not an mlm-lightning checkpoint (no model config/tokenizer inside)")
    model = BertForMaskedLM._from_config(BertConfig.from_dict(meta["bert_config"]), attn_implementation="sdpa")
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in meta["tokenizer_files"].items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    return model.eval(), tokenizer


def load_model(path: str):
    """(model, tokenizer) from an exported/Hugging Face directory, a hub id, or a .ckpt file."""
    from transformers import AutoTokenizer, BertForMaskedLM

    if os.path.isfile(path):
        return load_checkpoint(path)
    model = load_pretrained(BertForMaskedLM, path, "model", attn_implementation="sdpa")
    return model.eval(), load_pretrained(AutoTokenizer, path, "tokenizer")


def save_hf(model, tokenizer, export_dir: str) -> str:
    """Write a Hugging Face directory to a temporary sibling and rename it into place."""
    export_dir = os.path.abspath(export_dir)
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if os.path.isdir(export_dir):
            old = tempfile.mkdtemp(prefix=".old-export-", dir=parent)
            os.replace(export_dir, os.path.join(old, "x"))
            os.replace(tmp, export_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, export_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return export_dir


def export(ckpt_path: str, export_dir: str) -> str:
    model, tokenizer = load_checkpoint(ckpt_path)
    return save_hf(model, tokenizer, export_dir)
