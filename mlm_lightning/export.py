"""Checkpoint -> Hugging Face directory (config.json, model.safetensors, tokenizer files), safely.

What export does to an existing directory (the rule, also in the README):
- a new or empty directory is written into;
- a directory holding nothing but a previous export (the files named in its `.mlm-lightning-export` manifest)
  is replaced: the new export is written aside and renamed into place, then the old export's own files are
  removed by name;
- anything else (a run directory with checkpoints, a user's own files, `.`) is refused with one line: export
  never deletes or overwrites what it did not write.

Reading checkpoints and model dirs is `model.checkpoint`'s job; this module only writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from mlm_lightning.errors import MLMError, check, writing
from mlm_lightning.files import share_tree
from mlm_lightning.model.checkpoint import load_checkpoint

MANIFEST = ".mlm-lightning-export"


def _previous_export(directory: str) -> list[str] | None:
    """The file names of the export in `directory` if it holds nothing else; else None."""
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
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
        example = sorted(os.listdir(export_dir))[0]
        raise MLMError(
            f"--export_dir {export_dir!r} already holds files that no export wrote (e.g. {example!r}); export"
            " replaces only a previous export: pick a new or empty directory"
        )


def save_hf(model, tokenizer, export_dir: str, keep: tuple[str, ...] = ()) -> str:
    """Write a Hugging Face directory aside, then move it into place (see the module docstring for the rule)."""
    check_export_dir(export_dir, keep)
    export_dir = os.path.abspath(export_dir)
    parent = os.path.dirname(export_dir)
    # a full disk or a read-only directory is reported on export_dir (safetensors names no file; the temporary
    # directory is gone by then); a previous export there is untouched until the rename
    with writing(export_dir, temporary=(os.path.join(parent, ".export-"), os.path.join(parent, ".old-export-"))):
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)  # ours: removed whatever happens
        _write_aside(model, tokenizer, tmp, export_dir, parent)
    return export_dir


def _write_aside(model, tokenizer, tmp: str, export_dir: str, parent: str) -> None:
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump({"files": sorted(os.listdir(tmp))}, f)
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


def export(ckpt_path: str, export_dir: str) -> str:
    model, tokenizer = load_checkpoint(ckpt_path)
    keep = (os.path.abspath(ckpt_path),)  # e.g. `--export_dir r` for r/checkpoints/last.ckpt is refused
    return save_hf(model, tokenizer, export_dir, keep)
