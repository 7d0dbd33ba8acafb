"""FSDP and DeepSpeed as Lightning 2.6 runs them (FSDP needs a GPU: its strategy is stood in for here)."""

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch.distributed.fsdp import MixedPrecision

from mlm_lightning.errors import MLMError
from mlm_lightning.model.arch import layer_classes
from mlm_lightning.training.setup import EncoderLayerPolicy, RunSetup
from tests.support.models import module


class Root(torch.nn.Module):
    """Stands in for the FSDP root module (`trainer.strategy.model` after FSDP has wrapped the module)."""

    def __init__(self):
        super().__init__()
        self.clipped = []

    def clip_grad_norm_(self, max_norm):
        self.clipped.append(max_norm)
        return torch.tensor(0.0)


def fsdp(**kwargs) -> FSDPStrategy:
    strategy = FSDPStrategy(**kwargs)
    strategy.model = Root()
    return strategy


def with_trainer(m, strategy, **extra):
    m._trainer = SimpleNamespace(strategy=strategy, gradient_clip_val=1.0, gradient_clip_algorithm=None, **extra)
    return m


def test_fsdp_clips_by_norm_through_the_root(tokenizer):
    m = with_trainer(module(tokenizer), fsdp())
    optimizer = torch.optim.AdamW(m.parameters())
    m.configure_gradient_clipping(optimizer, 1.0, None)
    m.configure_gradient_clipping(optimizer, 0.5, "norm")
    assert m.trainer.strategy.model.clipped == [1.0, 0.5]  # Lightning's FSDP precision plugin would raise here


def test_deepspeed_leaves_clipping_to_its_engine(tokenizer, monkeypatch):
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # (deepspeed itself is not installed)
    m = with_trainer(module(tokenizer), strategy)
    monkeypatch.setattr(m, "clip_gradients", lambda *a: pytest.fail("clipped twice"))
    m.configure_gradient_clipping(torch.optim.AdamW(m.parameters()), 1.0, None)


def test_fsdp_wraps_each_encoder_layer_and_keeps_a_user_policy(tokenizer):
    m = module(tokenizer)
    assert {c.__name__ for c in layer_classes(m.model)} == {"BertLayer"}
    strategy = fsdp()
    RunSetup().setup(SimpleNamespace(strategy=strategy), m, "validate")
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, EncoderLayerPolicy)
    wrapped = [name for name, mod in m.model.named_modules() if policy(mod, recurse=False, nonwrapped_numel=0)]
    assert wrapped == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert policy(m.model, recurse=True, nonwrapped_numel=0)
    mine = fsdp(auto_wrap_policy={torch.nn.Linear})
    RunSetup().setup(SimpleNamespace(strategy=mine), m, "validate")
    assert not isinstance(mine.kwargs["auto_wrap_policy"], EncoderLayerPolicy)


def test_fsdp_bf16_mixed_computes_in_bf16_and_keeps_fp32_weights():
    from lightning.pytorch.plugins.precision import FSDPPrecision

    config = FSDPPrecision("bf16-mixed").mixed_precision_config
    assert isinstance(config, MixedPrecision) and config.param_dtype == torch.bfloat16  # (sharded weights stay fp32)


def test_skip_nonfinite_is_refused_with_deepspeed_and_time_based_validation_with_processes(tokenizer):
    ds = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    with pytest.raises(MLMError, match="not supported with DeepSpeed"):
        RunSetup().setup(SimpleNamespace(strategy=ds, world_size=1), module(tokenizer, skip_nonfinite=True), "fit")
    trainer = SimpleNamespace(strategy=object(), world_size=2, _val_check_time_interval=600.0)
    with pytest.raises(MLMError, match="own clock"):
        RunSetup().setup(trainer, module(tokenizer), "fit")
