"""The GPU configs run on a CPU with only the device swapped: every GPU-only choice (fused AdamW, pinned memory,
asynchronous checkpoint saves, bf16-mixed, torch.compile, gradient clipping) set as the config and a GPU would set
it, through a few steps with validation and periodic saves, a SIGTERM, an exact resume and the export.

Only the sizes differ from the configs (a tiny local model dir for bert-base-uncased, batches of 16 instead of 128,
steps and intervals of a few steps): none of those is a device choice.
"""

import signal
import subprocess

import pytest
import torch

from mlm_lightning.export import save_hf
from mlm_lightning.model import MLMModule
from tests.support import ROOT
from tests.support.cli import cli
from tests.support.runs import assert_resumed_at
from tests.support.text import sentences

pytestmark = pytest.mark.slow
GPU_OPTIONS = ["--model.fused_optimizer", "true", "--data.pin_memory", "true", "--checkpoint.async_save", "true"]
STEPS, SIGNAL_AT = 8, 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny BERT dir with 128 positions (the config's max_length) and a corpus of a few steps of 16 x 128 tokens."""
    from mlm_lightning.data.tokenizer import train_wordpiece

    tmp = tmp_path_factory.mktemp("gpu-config")
    tok = train_wordpiece(sentences(300), str(tmp / "tok"), 200, 128)
    torch.manual_seed(0)
    m = MLMModule(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=128)
    m.tokenizer = tok
    m.configure_model()
    model = save_hf(m.model.eval(), tok, str(tmp / "bert-tiny"))
    corpus = tmp / "train.txt"
    corpus.write_text("\n".join(sentences(3000, seed=1)) + "\n", encoding="utf-8")
    return model, str(corpus)


def fit(setup, root, configs: list[str], *extra: str) -> subprocess.CompletedProcess:
    model, corpus = setup
    argv = [a for c in configs for a in ("--config", str(ROOT / "configs" / c))]
    argv += ["--trainer.accelerator", "cpu", "--model.model_name_or_path", model, "--data.train_files", corpus,
             "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(STEPS),
             "--trainer.val_check_interval", "4", "--checkpoint.every_n_train_steps", "4", "--data.batch_size", "16",
             "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false", *GPU_OPTIONS, *extra]
    return subprocess.run(cli("fit", *argv), capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("configs", [["bert-base-gpu.yaml"], ["bert-base-gpu.yaml", "ddp-2gpu.yaml"]],
                         ids=["one-process", "ddp-2-processes"])
def test_a_gpu_config_on_a_cpu_trains_stops_resumes_exactly_and_exports(setup, tmp_path, configs):
    straight = fit(setup, tmp_path / "straight", configs)
    assert straight.returncode == 0, straight.stderr[-3000:]
    err = straight.stderr
    assert "precision bf16-mixed" in err
    assert "fused AdamW on" in err and "pinned memory on" in err and "async checkpoint saves on" in err
    assert "compile on" in err
    if "ddp-2gpu.yaml" in configs:
        assert "2 processes" in err

    root = tmp_path / "interrupted"
    stopped = fit(setup, root, configs, "--trainer.callbacks+=tests.support.callbacks.SignalAt",
                  "--trainer.callbacks.step", str(SIGNAL_AT))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    # (several processes agree on the stop at a later step: within seconds, see training/stopping.py)
    saved = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert SIGNAL_AT <= saved < STEPS
    resumed = fit(setup, root, configs, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_at(root, saved)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    for k in a["state_dict"]:
        assert torch.allclose(a["state_dict"][k], b["state_dict"][k], atol=1e-6), k
    assert (root / "export" / "model.safetensors").exists() and (root / "export" / "tokenizer.json").exists()
