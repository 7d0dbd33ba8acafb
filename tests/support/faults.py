"""Faults to put a command through: damaged checkpoints, a full or read-only tmpfs mount, and file permissions
that apply even to root."""

from __future__ import annotations

import ctypes
import os
import random
import subprocess
from pathlib import Path

import torch


def damage(src, dst, how: str) -> None:
    """Write a damaged copy of the checkpoint `src` as `dst`: truncated, empty, random, corrupted (a byte of the
    largest tensor flipped: torch.load would not notice) or foreign (another tool's Lightning checkpoint)."""
    import zipfile

    data = bytearray(Path(src).read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    elif how == "random":
        data = bytearray(random.Random(0).randbytes(4096))
    elif how == "corrupted":
        with zipfile.ZipFile(src) as archive:
            info = max(archive.infolist(), key=lambda i: i.file_size)
        with open(src, "rb") as f:  # the data starts after the local header (30 bytes, the name, the extra field)
            f.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + name_len + extra_len
        data[start + info.file_size // 2] ^= 0xFF
    elif how == "foreign":
        torch.save({"state_dict": {"encoder.weight": torch.zeros(2, 2)}, "epoch": 0, "global_step": 3,
                    "pytorch-lightning_version": "2.6.0"}, dst)
        return
    else:
        raise ValueError(how)
    Path(dst).write_bytes(bytes(data))


def mount_tmpfs(path, options: str) -> bool:
    """Mount a tmpfs at `path` with `options` (e.g. "size=64k", "ro"); False where this process may not mount."""
    os.makedirs(path, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    except FileNotFoundError:
        return False
    return done.returncode == 0


def unmount(path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class permissions_apply:
    """Within: file permissions apply to this thread even as root (CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH are
    dropped from its effective capabilities, and restored after). `possible` is False where they cannot be."""

    _DAC = (1 << 1) | (1 << 2)

    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.possible = os.geteuid() != 0 or self._caps() is not None

    def _caps(self):
        header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
        return (header, data) if self.libc.capget(ctypes.byref(header), data) == 0 else None

    def __enter__(self):
        self.saved = None
        if os.geteuid() == 0:
            header, data = self._caps()
            self.saved = data[0].effective
            data[0].effective &= ~self._DAC
            assert self.libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            header, data = self._caps()
            data[0].effective = self.saved
            self.libc.capset(ctypes.byref(header), data)
