"""Test-only callbacks, importable by class path from the CLI (`--trainer.callbacks+=tests.helpers.X`)."""

import os
import signal
import time

import torch
from lightning.pytorch.callbacks import Callback

from mlm_lightning.model import arch


class SignalAt(Callback):
    """Send this process a signal after optimizer step `step` (simulates a preemption or Ctrl-C)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class NanAt(Callback):
    """Poison the MLM head before step `step` so that step's loss is NaN (on process `rank` only, if given)."""

    def __init__(self, step: int, rank: int | None = None):
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step and self.rank in (None, trainer.global_rank):
            with torch.no_grad():
                arch.head_module(pl_module.model).weight.fill_(float("nan"))



class SignalDuringValidation(Callback):
    """Send this process a signal in the middle of the first validation after step `step`."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.global_step >= self.step and not trainer.sanity_checking:
            os.environ["MLM_TEST_SIGNAL_SENT"] = repr(time.time())  # for tests that time the reaction
            os.kill(os.getpid(), self.signum)
            self.step = 10**9


class SlowValidation(Callback):
    """Make every validation batch after `after_step` take `seconds`: a long validation."""

    def __init__(self, seconds: float = 5.0, after_step: int = 0):
        self.seconds, self.after_step = seconds, after_step

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and trainer.global_step >= self.after_step:
            time.sleep(self.seconds)


class SignalAtBatch(Callback):
    """Send a signal after the `batch`-th training batch (counted from 1 over the whole fit)."""

    def __init__(self, batch: int, signum: int = int(signal.SIGTERM), times: int = 1):
        self.batch, self.signum, self.times = batch, signum, times

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx + 1 == self.batch:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def write_sharded_checkpoint(rank: int, world: int, ckpt_path: str, out_dir: str, port: int) -> None:
    """(torch.multiprocessing.spawn target) Write `ckpt_path` as a sharded `torch.distributed.checkpoint`
    directory from `world` gloo processes, laid out as Lightning's FSDP strategy does ("model" + meta.pt)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = torch.load(ckpt_path, weights_only=True)
        model = {
            k: distribute_tensor(v, mesh, [Shard(0)] if v.dim() and v.shape[0] >= world else [Replicate()])
            for k, v in full["state_dict"].items()
        }
        dcp.save({"model": model}, checkpoint_id=out_dir)
        if rank == 0:
            rest = {k: v for k, v in full.items() if k not in ("state_dict", "optimizer_states")}
            torch.save(rest, os.path.join(out_dir, "meta.pt"))
    finally:
        dist.destroy_process_group()


class SlowTokenization(Callback):
    """Make tokenizing the corpus take `seconds` longer (patched when the callback is made: before data setup)."""

    def __init__(self, seconds: float = 10.0):
        from mlm_lightning.data import shards

        real = shards.tokenize_phase

        def slow(*args, **kwargs):
            time.sleep(seconds)
            return real(*args, **kwargs)

        shards.tokenize_phase = slow
