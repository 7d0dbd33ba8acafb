"""Every choice made for a GPU is an option whose `auto` picks it on CUDA devices, and `true` forces it on a CPU,
so the CPU tests run the GPU code paths (the whole GPU config: tests/test_gpu_configs.py)."""

import lightning as L
import pytest

from mlm_lightning.data import MLMDataModule
from mlm_lightning.errors import MLMError
from mlm_lightning.model import MLMModule
from mlm_lightning.training.checkpointing import (
    AsyncAtomicCheckpointIO,
    AtomicCheckpointIO,
    MLMCheckpoint,
    checkpoint_io,
)
from tests.support.models import TINY
from tests.training.weighting import ROWS_A, batch, one_step, tokenizer


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.mark.parametrize("choice, fused", [("auto", False), (True, True), (False, False)])
def test_fused_optimizer_option_reaches_adamw(tok, choice, fused, monkeypatch):
    seen = {}
    real = MLMModule.configure_optimizers

    def record(self):
        out = real(self)
        seen["fused"] = bool(out["optimizer"].defaults.get("fused"))
        return out

    monkeypatch.setattr(MLMModule, "configure_optimizers", record)
    one_step([[batch(ROWS_A, tok.mask_token_id)]], tok, fused=choice)
    assert seen["fused"] is fused  # (auto: a CPU takes the plain kernel)


def test_pin_memory_option_reaches_the_loader(corpus, tmp_path):
    loaders = {}
    for choice in ("auto", True, False):
        data = MLMDataModule(train_files=corpus, max_length=32, batch_size=8, vocab_size=300, pin_memory=choice,
                             cache_dir=str(tmp_path / "cache"))
        data.prepare_data()
        data.setup("fit")
        loaders[choice] = data.train_dataloader().pin_memory
    assert loaders == {"auto": False, True: True, False: False}


def test_async_save_option_picks_the_background_writer():
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert isinstance(checkpoint_io(trainer, MLMCheckpoint(async_save=True)), AsyncAtomicCheckpointIO)
    assert type(checkpoint_io(trainer, MLMCheckpoint(async_save="auto"))) is AtomicCheckpointIO  # a CPU


@pytest.mark.parametrize("make", [lambda: MLMModule(**TINY, fused_optimizer="yes"),
                                  lambda: MLMDataModule(pin_memory="maybe")])
def test_a_device_option_takes_auto_true_or_false(make):
    with pytest.raises(MLMError, match=r"(fused_optimizer|pin_memory)=.*: expects bool \| 'auto'"):
        make()
