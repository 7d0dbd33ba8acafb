"""Writing the project's files: whole or not at all, with the permissions the user's umask gives.

Every file a command leaves behind (checkpoints, exports, the plot, predictions, the cache, `config.yaml`) is
written under a temporary name beside its target, synced, and renamed over it, so a crash or a full disk never
leaves a half-written file in its place. `tempfile.mkstemp` and `mkdtemp` create 0600 files and 0700
directories (private, as temporary files should be): what is published gets `0o666 & ~umask` (files) and
`0o777 & ~umask` (directories) instead, as a plain `open()` or `mkdir` would, so a server, a colleague or a
shared cache can read it.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager

from mlm_lightning.errors import writing


def umask() -> int:
    """The process's umask. Read from /proc where there is one: `os.umask(0)` then back would, for an instant,
    give every file another thread creates meanwhile (a loader worker, the async checkpoint writer) mode 0666."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def temp_beside(path: str, suffix: str = ".tmp") -> str:
    """A new empty file of our own next to `path` (same directory, so the final rename is atomic): `.NAME.XXXX`."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=directory)
    os.close(fd)
    return tmp


def publish(tmp: str, path: str) -> None:
    """Sync our temporary file `tmp`, give it the umask's permissions and rename it over `path`."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # the bytes are on disk before the name points at them (a crash leaves the old file)
    finally:
        os.close(fd)
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str, suffix: str = ".tmp"):
    """Yield a temporary path beside `path` for a library that writes by name (matplotlib, torch); on success
    it becomes `path` (see `publish`), on failure it is removed and `path` is untouched. An OS error naming no
    file, or our temporary one, is reported on `path`."""
    directory, name = os.path.split(os.path.abspath(path))
    with writing(path, temporary=(os.path.join(directory, f".{name}."),)):
        tmp = temp_beside(path, suffix)
        try:
            yield tmp
            publish(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.remove(tmp)


@contextmanager
def atomic_file(path: str, mode: str = "w", encoding: str | None = "utf-8"):
    """`open(path, mode)` written aside and published whole (see `atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
        yield f


def share_tree(root: str) -> None:
    """Give a directory we created with `mkdtemp` (0700), and everything in it, the umask's permissions before it
    is renamed into place (libraries such as `save_pretrained` and safetensors write with modes of their own)."""
    files, dirs = file_mode(), dir_mode()
    for top, _, names in os.walk(root):
        os.chmod(top, dirs)
        for name in names:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                os.chmod(path, files)
