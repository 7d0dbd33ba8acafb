"""FLOPs per training step from the real config, and the throughput callback's rates and device syncs."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForMaskedLM

import mlm_lightning.training.callbacks as callbacks
from mlm_lightning.model import MLMModule
from mlm_lightning.model.arch import train_flops
from mlm_lightning.training.callbacks import ThroughputLogger

# one with intermediate = 4h (bert-base's ratio), one with intermediate != 4h (the default tiny model's 2x is
# 4h too; 96 = 1.5h is not)
CONFIGS = [
    dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, vocab_size=1000),
    dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, vocab_size=504),
]


def bert(sizes: dict) -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM._from_config(BertConfig(**sizes), attn_implementation="sdpa")


def linear_weights(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("sizes", CONFIGS)
def test_train_flops_is_six_times_the_matmul_weights(sizes):
    model = bert(sizes)
    config, seq = model.config, 48
    encoder, head = linear_weights(model.bert.encoder), linear_weights(model.cls)
    assert head == config.hidden_size * (config.hidden_size + config.vocab_size)  # transform + decoder
    attention = 3 * 2 * 2 * seq * config.hidden_size * config.num_hidden_layers  # scores and values, fwd + bwd
    assert train_flops(config, seq, n_tokens=1, n_head_rows=0) == 6 * encoder + attention
    assert train_flops(config, seq, n_tokens=0, n_head_rows=1) == 6 * head
    assert train_flops(config, seq, 10, 3) == 10 * (6 * encoder + attention) + 3 * 6 * head


@pytest.mark.parametrize("sizes", CONFIGS)
@pytest.mark.parametrize("sparse", [True, False])
def test_train_flops_equals_the_counted_matmuls_of_a_real_step(sizes, sparse):
    """PyTorch's own FLOP counter over a forward + backward of `MLMModule.forward` itself (sparse head or not)."""
    module = MLMModule(sparse_head=sparse)
    module.model = model = bert(sizes)
    batch, seq = 3, 24
    ids = torch.randint(5, model.config.vocab_size, (batch, seq))
    positions = torch.tensor([1, 7, 30, 50, 71])
    labels = torch.full((batch, seq), -100)
    labels.view(-1)[positions] = ids.view(-1)[positions]
    inputs = {"input_ids": ids, "labels": labels, "masked_positions": positions,
              "masked_labels": ids.view(-1)[positions]}
    with FlopCounterMode(display=False) as counter:
        logits, _ = module(inputs)
        logits.float().logsumexp(-1).sum().backward()
    rows = positions.numel() if sparse else batch * seq
    assert counter.get_total_flops() == train_flops(model.config, seq, batch * seq, rows)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_run(device: str, log_every: int):
    """A trainer/module pair with just what the callback reads, and the dicts it logs."""
    logged = []
    model = bert(CONFIGS[1])
    module = SimpleNamespace(
        model=model, device=torch.device(device), hparams=SimpleNamespace(sparse_head=True),
        train_flops=lambda *shape: train_flops(model.config, *shape),  # what `MLMModule.train_flops` returns
        log_dict=lambda d, **kw: logged.append((trainer.fit_loop.epoch_loop._batches_that_stepped + 1, d)),
    )
    trainer = SimpleNamespace(
        log_every_n_steps=log_every, precision="bf16-mixed", world_size=1,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0)),
    )
    return trainer, module, logged


def batch(rows=4, seq=32, real=100, masked=15) -> dict:
    return {"input_ids": torch.zeros(rows, seq, dtype=torch.long), "num_tokens": rows * seq,
            "num_real_tokens": real, "masked_positions": torch.arange(masked)}


def run_steps(callback, trainer, module, clock, steps: int, seconds_per_step: float):
    callback.on_train_start(trainer, module)
    for i in range(steps):
        clock.now += seconds_per_step
        callback.on_train_batch_end(trainer, module, None, batch(), i)
        trainer.fit_loop.epoch_loop._batches_that_stepped += 1


def test_gpu_syncs_only_at_measurements_and_reports_exact_rates(monkeypatch):
    clock, syncs = Clock(), []
    monkeypatch.setattr(callbacks.time, "perf_counter", clock)
    monkeypatch.setattr(callbacks.torch.cuda, "synchronize", lambda *a: syncs.append(a))
    monkeypatch.setattr(callbacks, "peak_flops", lambda device, dtype: 1e12)
    trainer, module, logged = fake_run("cuda", log_every=1)
    run_steps(ThroughputLogger(window=100, gpu_interval=50), trainer, module, clock, 250, 0.1)
    assert len(syncs) == 5  # steps 50, 100, ..., 250: not one per step although log_every_n_steps is 1
    assert [step for step, _ in logged] == [50, 100, 150, 200, 250]
    rates = [d for _, d in logged if "perf/tokens_per_s" in d]
    assert len(rates) == 3  # a window of 100 steps spans 3 measurements: rates from the third (step 150) on
    step_flops = train_flops(module.model.config, 32, 4 * 32, 15)
    for d in rates:
        assert d["perf/tokens_per_s"] == pytest.approx(100 / 0.1)  # real tokens, not the 128 padded ones
        assert d["perf/mfu"] == pytest.approx(step_flops / 0.1 / 1e12)
        assert d["perf/pad_share"] == pytest.approx(1 - 100 / 128)


def test_gpu_interval_is_a_multiple_of_the_logging_interval(monkeypatch):
    monkeypatch.setattr(callbacks.torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(callbacks, "peak_flops", lambda device, dtype: 1e12)
    trainer, module, logged = fake_run("cuda", log_every=30)
    run_steps(ThroughputLogger(gpu_interval=50), trainer, module, Clock(), 200, 0.1)
    assert [step for step, _ in logged] == [60, 120, 180]  # values logged off a log step would be dropped


def test_cpu_measures_at_every_log_step_without_mfu(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(callbacks.time, "perf_counter", clock)
    trainer, module, logged = fake_run("cpu", log_every=2)
    run_steps(ThroughputLogger(window=10), trainer, module, clock, 30, 0.5)
    assert [step for step, _ in logged] == list(range(2, 31, 2))
    rates = [d for _, d in logged if "perf/tokens_per_s" in d]
    assert rates and all(d["perf/tokens_per_s"] == pytest.approx(200) and "perf/mfu" not in d for d in rates)


@pytest.mark.parametrize(("name", "dtype", "peak"), [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),  # SXM
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.5e12),
    ("NVIDIA H100 NVL", torch.bfloat16, 835.5e12),  # Lightning: 1,671 (with sparsity), MFU shown at half
    ("NVIDIA H200", torch.bfloat16, 989.4e12),  # Lightning: unknown by this name
    ("NVIDIA H200 NVL", torch.float16, 835.5e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A100 80GB PCIe", torch.float16, 312e12),
    ("NVIDIA L4", torch.bfloat16, 121e12),
    ("NVIDIA L40S", torch.bfloat16, 362.1e12),
    ("NVIDIA H200", torch.float32, 66.9e12),  # (torch's default fp32 matmul precision "highest": no tf32)
    ("NVIDIA L40", torch.bfloat16, None),  # not in the table: no MFU rather than a wrong one
    ("Tesla T4", torch.float16, None),
])
def test_peak_flops_is_the_dense_peak(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert callbacks.peak_flops(torch.device("cuda"), dtype) == (pytest.approx(peak) if peak else None)
    assert callbacks.peak_flops(torch.device("cpu"), dtype) is None
