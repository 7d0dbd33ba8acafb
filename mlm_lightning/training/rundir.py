"""A run directory is owned by one fit at a time.

Two fits started together into one `--trainer.default_root_dir` would both pass the "another run's last.ckpt"
check (neither has written one yet), then overwrite each other's checkpoints, logs and export. So a fit takes
`<run dir>/.mlm-lightning.lock` before it writes anything there, and holds it until it ends:

- the lock is the OS's (`flock`, through filelock's `lock_descriptor`): released when the holder exits or dies,
  so a lock file left by a crashed run blocks nothing; on NFS, Linux maps `flock` to byte-range locks that other
  nodes see;
- the holder writes its pid and host into the file, and a second fit is refused in one line that names them;
- only global rank 0 of a multi-process run takes it (the other processes write nothing there);
- a filesystem without locks (some network mounts) gets a warning and the fit goes on, as the cache does.

The lock file stays when the fit ends (removing a file another process may be opening is a race); a file of that
name that no fit wrote is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import socket

from filelock import lock_descriptor, unlock_descriptor

from mlm_lightning.errors import MLMError
from mlm_lightning.files import file_mode

log = logging.getLogger("mlm_lightning")

LOCK_NAME = ".mlm-lightning.lock"
_held: dict[str, int] = {}  # run dir (real path) -> the descriptor holding its lock, in this process


def own_run_dir(root: str, global_rank: int = 0) -> None:
    """Take `root`'s lock for this fit, or refuse in one line naming the fit that holds it."""
    if global_rank != 0:
        return  # one multi-process run: rank 0 holds it for all of them
    if "://" in str(root):
        log.warning("the run directory %s is a URL: it cannot be locked; start only one fit in it at a time", root)
        return
    os.makedirs(root, exist_ok=True)
    key = os.path.realpath(root)
    if key in _held:
        return
    path = os.path.join(root, LOCK_NAME)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, file_mode())
    except OSError as e:
        raise MLMError(f"cannot open the run directory's lock {path!r} ({e.strerror}); pick another"
                       " --trainer.default_root_dir") from None
    try:
        try:
            locked = lock_descriptor(fd, blocking=False)
        except OSError as e:  # a filesystem without flock (ENOLCK, EOPNOTSUPP, ENOSYS)
            _check_ours(fd, path)
            log.warning("cannot lock the run directory %s (%s): going on without the lock; start only one fit"
                        " in it at a time", root, e.strerror or e)
            os.close(fd)
            return
        if not locked:
            raise MLMError(f"{root} is in use by another fit ({_holder(_read(fd)) or 'a process that did not say'});"
                           " wait for it to end, or pick another --trainer.default_root_dir")
        _check_ours(fd, path)  # (the fd closes below, which releases the lock)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n", 0)
        except OSError:  # (a full disk): no empty lock file left behind; it is ours, and we hold its lock
            os.unlink(path)
            raise
    except BaseException:
        os.close(fd)
        raise
    _held[key] = fd


def release_run_dirs() -> None:
    """Give back every run directory this process holds (a fit in the same process, e.g. a test, may follow)."""
    while _held:
        _, fd = _held.popitem()
        try:
            unlock_descriptor(fd)
        finally:
            os.close(fd)


def _check_ours(fd: int, path: str) -> None:
    """Refuse to take over a file of that name that no fit wrote (empty: just created, or a crash before writing)."""
    data = _read(fd)
    if data and _holder(data) is None:
        raise MLMError(f"{path!r} exists and is not a lock file that mlm-lightning wrote; move it away, or pick"
                       " another --trainer.default_root_dir")


def _read(fd: int) -> bytes:
    return os.pread(fd, 4096, 0)


def _holder(data: bytes) -> str | None:
    """'pid N on host H' from a lock file's contents (untrusted: anything else is None)."""
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    pid, host = record.get("pid"), record.get("host")
    if not (isinstance(pid, int) and isinstance(host, str) and host.isprintable()):
        return None
    return f"pid {pid} on host {host[:100]}"
