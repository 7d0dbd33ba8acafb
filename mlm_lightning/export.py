"""Checkpoint -> Hugging Face directory (config.json, model.safetensors, tokenizer files), safely.

What export does to an existing directory (the rule, also in the README):
- a new or empty directory is written into;
- a directory holding nothing but a previous export (the files named in its `.mlm-lightning-export` manifest)
  is replaced: the new export is written aside and renamed into place, then the old export's own files are
  removed by name;
- anything else (a run directory with checkpoints, a user's own files, `.`) is refused with one line: export
  never deletes or overwrites what it did not write. The model card (`README.md`) it wrote counts as the user's
  once edited (the manifest keeps its SHA-256): an edited card is never replaced.

Every export writes a model card (`card.py`); `fmt="onnx"` adds `model.onnx` (`onnx_export.py`).

Reading checkpoints and model dirs is `model.checkpoint`'s job; this module only writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

from mlm_lightning import card as model_card
from mlm_lightning.errors import MLMError, check, writing
from mlm_lightning.files import share_tree
from mlm_lightning.model.checkpoint import load_checkpoint

MANIFEST = ".mlm-lightning-export"
FORMATS = ("hf", "onnx")


def _previous_export(directory: str) -> list[str] | None:
    """The file names of the export in `directory` if it holds nothing else; else None."""
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        files, sums = manifest["files"], manifest.get("sha256", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if _edited(directory, files, sums) is not None:
        return None
    if not isinstance(files, list) or not all(
        isinstance(n, str) and n not in ("", ".", "..") and os.path.basename(n) == n for n in files
    ):
        return None
    entries = set(os.listdir(directory))
    ours = set(files) | {MANIFEST}
    plain = all(os.path.isfile(os.path.join(directory, n)) and not os.path.islink(os.path.join(directory, n))
                for n in entries)
    return files if entries <= ours and plain else None


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _edited(directory: str, files, sums) -> str | None:
    """The card's name if the export wrote one (it is in `files`) and it was changed since (`sums`: the
    manifest's checksums); else None."""
    name = model_card.CARD
    if not isinstance(files, list) or name not in files:
        return None
    path = os.path.join(directory, name)
    try:
        same = isinstance(sums, dict) and not os.path.islink(path) and _sha256(path) == sums.get(name)
    except FileNotFoundError:  # removed: nothing of the user's to keep
        return None
    except OSError:
        same = False
    return None if same else name


def check_export_dir(export_dir: str, keep: tuple[str, ...] = ()) -> None:
    """Refuse an export dir that export would not write safely, before any work is done.

    `keep`: directories the export must never contain (the run's checkpoints and logs).
    """
    target = os.path.realpath(export_dir)
    for path in keep:
        inside = os.path.realpath(path)
        check(
            os.path.commonpath([target, inside]) != target,
            f"--export_dir {export_dir!r} would contain {path!r} (checkpoints/logs); export into a directory of"
            f" its own, e.g. {os.path.join(export_dir, 'export')!r}",
        )
    if os.path.islink(export_dir) or (os.path.exists(export_dir) and not os.path.isdir(export_dir)):
        raise MLMError(f"--export_dir {export_dir!r} exists and is not a directory; pick another path")
    if os.path.isdir(export_dir) and os.listdir(export_dir) and _previous_export(export_dir) is None:
        example = _users_file(export_dir)
        raise MLMError(
            f"--export_dir {export_dir!r} already holds files that no export wrote (e.g. {example!r}); export"
            " replaces only a previous export: pick a new or empty directory"
        )


def _users_file(directory: str) -> str:
    """A file in `directory` that no export wrote (an edited card counts as the user's)."""
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        edited = _edited(directory, manifest["files"], manifest.get("sha256", {}))
        if edited is not None:
            return edited
        ours = set(manifest["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ours = set()
    names = sorted(os.listdir(directory))
    return next((n for n in names if n not in ours), names[0])


def save_hf(model, tokenizer, export_dir: str, keep: tuple[str, ...] = (), card: str | None = None,
            fmt: str = "hf") -> str:
    """Write a Hugging Face directory aside, then move it into place (see the module docstring for the rule).

    `card`: the model card's text (default: what the model and tokenizer tell); `fmt` "onnx" adds `model.onnx`."""
    check(fmt in FORMATS, f"--format {fmt!r} is not an export format; use one of {', '.join(FORMATS)}")
    check_export_dir(export_dir, keep)
    if fmt == "onnx":
        from mlm_lightning.onnx_export import check_onnx_available

        check_onnx_available()  # before any file is written
    export_dir = os.path.abspath(export_dir)
    parent = os.path.dirname(export_dir)
    # a full disk or a read-only directory is reported on export_dir (safetensors names no file; the temporary
    # directory is gone by then); a previous export there is untouched until the rename
    with writing(export_dir, temporary=(os.path.join(parent, ".export-"), os.path.join(parent, ".old-export-"))):
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)  # ours: removed whatever happens
        _write_aside(model, tokenizer, tmp, export_dir, parent, card, fmt)
    return export_dir


def _write_aside(model, tokenizer, tmp: str, export_dir: str, parent: str, card: str | None, fmt: str) -> None:
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if fmt == "onnx":
            from mlm_lightning.onnx_export import save_onnx

            save_onnx(model, tmp)
        card_path = os.path.join(tmp, model_card.CARD)
        with open(card_path, "w", encoding="utf-8") as f:
            f.write(model_card.render(model, tokenizer) if card is None else card)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump({"files": sorted(os.listdir(tmp)), "sha256": {model_card.CARD: _sha256(card_path)}}, f)
        # mkdtemp makes 0700 and safetensors writes 0600: an export is meant to be shared (the umask's permissions)
        share_tree(tmp)
        if os.path.isdir(export_dir) and os.listdir(export_dir):
            _replace_export(tmp, export_dir, parent)
        else:
            if os.path.isdir(export_dir):
                os.rmdir(export_dir)  # empty: nothing lost (rmdir refuses a directory that is not)
            os.rename(tmp, export_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_export(tmp: str, export_dir: str, parent: str) -> None:
    old_files = _previous_export(export_dir)
    check(old_files is not None, f"--export_dir {export_dir!r} changed during the export; nothing was replaced")
    aside = tempfile.mkdtemp(prefix=".old-export-", dir=parent)
    old = os.path.join(aside, "export")
    os.rename(export_dir, old)
    try:
        os.rename(tmp, export_dir)
    except OSError:  # the previous export goes back where it was
        os.rename(old, export_dir)
        os.rmdir(aside)
        raise
    # remove only what the previous export wrote, by name; anything that appeared meanwhile stays in `aside`
    for name in [*old_files, MANIFEST]:
        try:
            os.remove(os.path.join(old, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(old)
        os.rmdir(aside)
    except OSError:
        raise MLMError(f"files appeared in the previous export during the export; they were kept in {old!r}") from None


def export(ckpt_path: str, export_dir: str, license: str | None = None, fmt: str = "hf",
           command: list[str] | None = None, facts: dict | None = None, keep: tuple[str, ...] = ()) -> str:
    """Export a checkpoint; `command` (the arguments after `mlm-lightning`) and `facts` (e.g. the run's last
    validation, tokens seen) go into the model card with what the checkpoint itself says of its training.
    `keep`: directories the export must never contain, beside the checkpoint itself."""
    check(fmt in FORMATS, f"--format {fmt!r} is not an export format; use one of {', '.join(FORMATS)}")
    keep = (*keep, os.path.abspath(ckpt_path))  # e.g. `--export_dir r` for r/checkpoints/last.ckpt is refused
    check_export_dir(export_dir, keep)  # before the checkpoint is read
    model, tokenizer = load_checkpoint(ckpt_path)
    known = training_facts(ckpt_path)
    known.update(facts or {})
    if command is not None:
        known["command"] = model_card.masked_command(command)
    text = model_card.render(model, tokenizer, known, license)
    return save_hf(model, tokenizer, export_dir, keep, card=text, fmt=fmt)


def training_facts(ckpt_path: str) -> dict:
    """What a .ckpt (already verified by `load_checkpoint`) says of its training; {} for a sharded directory."""
    if not os.path.isfile(ckpt_path):
        return {}
    import torch

    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # (it loaded a moment ago: a card with fewer facts rather than no export)
        return {}
    return model_card.checkpoint_facts(checkpoint) if isinstance(checkpoint, dict) else {}
