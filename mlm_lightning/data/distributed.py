"""Data preparation with several processes: one process works, all check in, errors reach every process.

`together(trainer, work)` is entered by every process at the same point: each runs its `work` (a no-op on the
processes that only wait) in a thread and checks in every `CHECK_IN_S` seconds. Tokenizing a big corpus on one
process can take longer than the process group's timeout (30 min by default), which one long gather on the
waiting processes would hit; and a process that failed alone would leave the others waiting in the next
collective (torchrun kills no one), so the first error of any process is raised on all of them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch.distributed as dist

from mlm_lightning.errors import MLMError, check

CHECK_IN_S = 5.0  # processes waiting for another one's data preparation check in this often


def together(trainer, work: Callable[[], object]):
    """Run `work` here, then raise on every process the first error any process had; returns `work()`."""
    box: dict = {}

    def run():
        try:
            box["result"] = work()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others are told
            box["error"] = e

    thread = threading.Thread(target=run, name="mlm-lightning-data", daemon=True)
    thread.start()
    busy = [True]
    while any(busy):  # every process leaves this loop at the same check-in
        thread.join(timeout=CHECK_IN_S)
        busy = [None] * trainer.world_size
        dist.all_gather_object(busy, thread.is_alive())
    error = box.get("error")
    if error is None or isinstance(error, MLMError):
        message = None if error is None else str(error)
    else:
        message = f"process {trainer.global_rank} failed preparing the data: {type(error).__name__}: {error}"
    errors = [None] * trainer.world_size
    dist.all_gather_object(errors, message)
    if error is not None and not isinstance(error, MLMError):
        raise error  # this process's own failure, with its traceback
    check(not any(errors), next((e for e in errors if e), ""))
    return box.get("result")
