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
import pickle
import tempfile
import zipfile
import zlib

import torch
from transformers import AutoTokenizer

from mlm_lightning.data.tokenizer import (
    TOKENIZER_FILES,
    drop_saved_padding,
    tokenizer_dir_problem,
    validate_tokenizer,
)
from mlm_lightning.errors import MLMError, check, os_error
from mlm_lightning.hub import load_pretrained
from mlm_lightning.model import sharded
from mlm_lightning.model.arch import check_fits, from_config, load_pretrained_mlm, pretrained_config

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
        os.path.isfile(path) or (os.path.isdir(path) and sharded.kind(path)),
        f"{path!r} is not a checkpoint (expected a .ckpt written by mlm-lightning fit, or a sharded FSDP/DeepSpeed"
        " checkpoint directory)",
    )


# -- is a .ckpt intact? (before anything is done with it) --------------------------------------------------------
ZIP_START = b"PK\x03\x04"  # torch.save writes a zip archive: this is how one begins


def checkpoint_problem(path: str, resumable: bool = False) -> tuple[str | None, dict | None]:
    """(what is wrong with the .ckpt at `path`, or None; its contents, memory-mapped, if nothing is).

    `resumable`: a fit resumes from it, so it must hold the optimizer and loop state too. torch.load checks no
    checksum (a flipped byte in the weights loads silently) and fails on a cut-short file with a zip reader's
    traceback: the zip's own CRC-32 of every member is checked here first (~0.2 s per GB once the file is cached,
    and torch.load reads it right after)."""
    if os.path.getsize(path) == 0:
        return "is empty (0 bytes)", None
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == ZIP_START:
                return f"is cut short ({os.path.getsize(path)} bytes and no end: a copy or save was interrupted)", None
        return "is not a checkpoint (not the zip archive that torch.save writes)", None
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size:  # saved with torch's crc32 off: nothing to check against
                    continue
                with archive.open(info) as member:
                    while member.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, EOFError, NotImplementedError, zlib.error) as e:
        return f"is damaged ({e})", None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        if (error := os_error(e)) is not None:  # the file is fine, the system is not (e.g. too many open files)
            raise OSError(error.errno, error.strerror, path) from e
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        return f"cannot be read as plain data ({first}): another tool's file, or not safe to load", None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        return "is not a Lightning checkpoint (it holds no state_dict)", None
    if not isinstance(ckpt.get(PAYLOAD), dict):
        return "is another tool's checkpoint (no mlm-lightning model config and tokenizer inside)", None
    if resumable and "optimizer_states" not in ckpt:
        return ("holds weights only (no optimizer state), so a fit cannot resume from it; export it (mlm-lightning"
                " export) and start a new fit from the export with --model.model_name_or_path"), None
    return None, ckpt


def verified_checkpoint(path: str, option: str = "--ckpt_path", resumable: bool = False) -> dict:
    """The contents of the .ckpt at `path` (memory-mapped), or one line naming the file, what is wrong with it
    and the way on: the newest intact checkpoint beside it, or a run without it."""
    problem, ckpt = checkpoint_problem(path, resumable)
    if problem is None:
        return ckpt
    if "weights only" in problem:
        raise MLMError(f"checkpoint {path!r} {problem}")
    other = intact_beside(path, resumable)
    if other:
        way = f"the newest intact checkpoint beside it is {other!r}: pass {option} {other}"
    elif resumable:
        way = "no intact checkpoint beside it: start a new fit without --ckpt_path (another --trainer.default_root_dir)"
    else:
        way = "no intact checkpoint beside it: use another checkpoint or an exported model directory"
    raise MLMError(f"checkpoint {path!r} {problem}; {way}")


def intact_beside(path: str, resumable: bool = False, tries: int = 5) -> str | None:
    """The newest intact .ckpt in `path`'s directory other than `path` (the `tries` newest are looked at)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        names = [n for n in os.listdir(directory) if n.endswith(".ckpt") and not n.startswith(".")]
    except OSError:
        return None
    others = [os.path.join(directory, n) for n in names if not os.path.samefile(os.path.join(directory, n), path)]
    others = sorted((p for p in others if os.path.isfile(p)), key=os.path.getmtime, reverse=True)
    for candidate in others[:tries]:
        if checkpoint_problem(candidate, resumable)[0] is None:
            return candidate
    return None


# -- is a model dir complete? (before it is loaded) --------------------------------------------------------------
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_model_dir(path: str, what: str = "--model", tokenizer: bool = True) -> None:
    """Refuse a local model directory without its config, its weights (or a shard its index names) or, with
    `tokenizer`, its tokenizer files, naming what is missing. transformers would otherwise fill the gap silently
    (AutoTokenizer makes a 5-token BERT tokenizer from a config alone: every mask filled with nothing)."""
    if not os.path.isdir(path):
        return  # a hub id or a file: checked where it is read
    names = set(os.listdir(path))
    if "config.json" in names:  # a family that is refused says why first: no other file would make it usable
        pretrained_config(path, what)
    missing = [] if "config.json" in names else ["its config (config.json)"]
    weights = [n for n in WEIGHT_FILES if n in names]
    for index in (f"{n}.index.json" for n in WEIGHT_FILES):
        if index in names:
            shards = _index_shards(os.path.join(path, index))
            absent = sorted(s for s in shards if s not in names) if shards is not None else [f"{index} unreadable"]
            if absent:
                missing.append(f"the weight shard(s) its {index} names ({', '.join(absent[:3])})")
            weights.append(index)
    if not weights:
        missing.append(f"its weights ({' or '.join(WEIGHT_FILES)})")
    if tokenizer and (problem := tokenizer_dir_problem(path)):
        missing.append(problem)
    check(not missing, f"{what} {path!r} is incomplete: it lacks {' and '.join(missing)}; pass a complete model"
                       " directory (mlm-lightning export writes one from a checkpoint)")


def check_model_dir_fits(path: str, tokenizer_path: str, what: str = "--model.model_name_or_path") -> None:
    """Before anything is tokenized: the model directory's embeddings hold every id of the tokenizer that will be
    used with it (`check_fits` on its config; the load checks the model itself again)."""
    from mlm_lightning.data.tokenizer import load_tokenizer

    if not (os.path.isdir(path) and os.path.isdir(tokenizer_path)):
        return  # a hub id: checked when it is loaded
    own = os.path.abspath(tokenizer_path) == os.path.abspath(path)
    check_fits(pretrained_config(path, what), load_tokenizer(tokenizer_path), f"{what} {path!r}",
               "put the model's own tokenizer files beside its weights" if own else
               f"use the model's own tokenizer (leave --data.tokenizer unset, not {tokenizer_path!r})")


def _index_shards(index: str) -> set[str] | None:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    ok = all(isinstance(s, str) and s and os.path.basename(s) == s and s not in (".", "..") for s in shards)
    return shards if ok else None


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
            return drop_saved_padding(AutoTokenizer.from_pretrained(tmp, local_files_only=True,
                                                                    trust_remote_code=False), source)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MLMError(f"{source} has an unreadable tokenizer ({type(e).__name__})") from None


def carried_tokenizer(checkpoint: dict, path: str):
    """The tokenizer a checkpoint (the dict of `verified_checkpoint`) was trained with, from the files it carries:
    a resume tokenizes with it, whatever a cache holds."""
    source = f"checkpoint {path!r}"
    payload = checkpoint.get(PAYLOAD)
    tokenizer = _tokenizer_from_files(payload.get("tokenizer_files") if isinstance(payload, dict) else None, source)
    validate_tokenizer(tokenizer, source)
    return tokenizer


def load_checkpoint(path: str, option: str = "--ckpt_path"):
    """(masked LM, tokenizer) from an mlm-lightning .ckpt (loaded with `weights_only=True`) or a sharded
    FSDP / DeepSpeed checkpoint directory (see `sharded.py`)."""
    check_checkpoint_path(path)
    if os.path.isdir(path):
        ckpt = sharded.load_directory(path)
    else:
        ckpt = verified_checkpoint(path, option)
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
    tokenizer = _tokenizer_from_files(meta.get("tokenizer_files"), source)
    check_fits(model, tokenizer, source, "the checkpoint is damaged or was edited; use another checkpoint")
    return model.eval(), tokenizer


def load_model(path: str, option: str = "--model"):
    """(model, tokenizer) from an exported/Hugging Face directory, a hub id, or a .ckpt file (any family of
    `arch.FAMILIES`; a model without MLM head weights gets a random head, with a warning)."""
    if os.path.isfile(path) or (os.path.isdir(path) and sharded.kind(path)):
        return load_checkpoint(path, option)
    check_model_dir(path, option)
    model, _ = load_pretrained_mlm(path, "model")
    tokenizer = drop_saved_padding(load_pretrained(AutoTokenizer, path, "tokenizer"), repr(path))
    check_fits(model, tokenizer, f"{option} {path!r}", "put the model's own tokenizer files beside its weights")
    return model.eval(), tokenizer
