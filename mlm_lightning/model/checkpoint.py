"""The checkpoint payload, written and read here only, and loading a model from a .ckpt, a checkpoint dir or a
Hugging Face dir.

A Lightning checkpoint of `MLMModule` carries, under `"mlm_lightning"`: the model config (so any .ckpt exports
on its own), the tokenizer files, and each process's RNG state that drives dropout (a resumed run draws the same
dropout masks as an uninterrupted one).

Checkpoints are data: they are read with `weights_only=True`, and the tokenizer files embedded in them are
taken only under the known file names (never a name from the file that could become a path).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile

import torch
from transformers import AutoTokenizer

from mlm_lightning.data.tokenizer import TOKENIZER_FILES
from mlm_lightning.errors import MLMError, check
from mlm_lightning.hub import load_pretrained
from mlm_lightning.model import sharded
from mlm_lightning.model.arch import from_config, load_pretrained_mlm

PAYLOAD = "mlm_lightning"
CONFIG = "bert_config"  # (the key's name is kept: checkpoints written before other families came read the same)


# -- the payload ---------------------------------------------------------------------------------------------
def write_payload(checkpoint: dict, config, tokenizer_files: dict[str, str], rng_states: list[dict]) -> None:
    """Put the payload into a Lightning checkpoint dict (`MLMModule.on_save_checkpoint`)."""
    checkpoint[PAYLOAD] = {
        CONFIG: config.to_dict(),
        "tokenizer_files": tokenizer_files,
        "rng": rng_states,  # one entry per process, by global rank
    }


def saved_tokenizer_json(checkpoint: dict) -> str | None:
    """The `tokenizer.json` text a checkpoint was trained with (None if it carries none)."""
    payload = checkpoint.get(PAYLOAD)
    files = payload.get("tokenizer_files") if isinstance(payload, dict) else None
    text = files.get("tokenizer.json") if isinstance(files, dict) else None
    return text if isinstance(text, str) else None


def saved_rng_states(checkpoint: dict) -> list[dict]:
    """Each process's RNG states, by global rank."""
    payload = checkpoint.get(PAYLOAD)
    states = (payload.get("rng") if isinstance(payload, dict) else None) or []
    return [states] if isinstance(states, dict) else list(states)  # (checkpoints of mlm-lightning 0.1: one dict)


# -- reading ---------------------------------------------------------------------------------------------------
def check_checkpoint_path(path: str) -> None:
    """A .ckpt file, or a sharded (FSDP) / DeepSpeed checkpoint directory."""
    check(os.path.exists(path), f"checkpoint {path!r} does not exist; check the path or use --ckpt_path last")
    check(
        (os.path.isfile(path) and zipfile.is_zipfile(path)) or (os.path.isdir(path) and sharded.kind(path)),
        f"{path!r} is not a checkpoint (expected a .ckpt written by mlm-lightning fit, or a sharded FSDP/DeepSpeed"
        " checkpoint directory)",
    )


def _tokenizer_from_files(files: object, source: str):
    """A tokenizer from the {file name: text} dict stored in a checkpoint, written to a private temp dir."""
    check(isinstance(files, dict) and "tokenizer.json" in files, f"{source} has no embedded tokenizer")
    for name, text in files.items():
        check(
            name in TOKENIZER_FILES and isinstance(text, str),
            f"{source} carries an unexpected tokenizer file {str(name)[:80]!r}; refusing it (a checkpoint may only"
            f" hold {', '.join(TOKENIZER_FILES)})",
        )
    config = files.get("tokenizer_config.json")
    if config is not None:
        try:
            config = json.loads(config)
        except json.JSONDecodeError:
            config = None
        check(isinstance(config, dict), f"{source} has an invalid tokenizer_config.json")
        # no remote code, and no file names from the checkpoint (e.g. "vocab_file": "/etc/...")
        check("auto_map" not in config, f"{source}: its tokenizer asks for custom code (auto_map); refusing it")
        for key, value in config.items():
            check(
                not (key.endswith("_file") and isinstance(value, str) and value),
                f"{source}: its tokenizer_config.json names a file ({key}); refusing it",
            )
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        try:
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MLMError(f"{source} has an unreadable tokenizer ({type(e).__name__})") from None


def load_checkpoint(path: str):
    """(masked LM, tokenizer) from an mlm-lightning .ckpt (loaded with `weights_only=True`) or a sharded
    FSDP / DeepSpeed checkpoint directory (see `sharded.py`)."""
    check_checkpoint_path(path)
    if os.path.isdir(path):
        ckpt = sharded.load_directory(path)
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MLMError(f"{path!r} could not be read as a checkpoint ({type(e).__name__}); is it complete?") from e
    meta = ckpt.get(PAYLOAD) if isinstance(ckpt, dict) else None
    check(isinstance(meta, dict), f"{path!r} is not an mlm-lightning checkpoint (no model config/tokenizer inside)")
    source = f"checkpoint {path!r}"
    model = from_config(meta.get(CONFIG), source)
    weights = ckpt.get("state_dict")
    check(isinstance(weights, dict), f"{source} holds no weights")
    state = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise MLMError(f"{source}: its weights do not fit its model config ({str(e).splitlines()[0]})") from None
    return model.eval(), _tokenizer_from_files(meta.get("tokenizer_files"), source)


def load_model(path: str):
    """(model, tokenizer) from an exported/Hugging Face directory, a hub id, or a .ckpt file (any family of
    `arch.FAMILIES`; a model without MLM head weights gets a random head, with a warning)."""
    if os.path.isfile(path) or (os.path.isdir(path) and sharded.kind(path)):
        return load_checkpoint(path)
    model, _ = load_pretrained_mlm(path, "model")
    return model.eval(), load_pretrained(AutoTokenizer, path, "tokenizer")
