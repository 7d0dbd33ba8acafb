"""The Python API behaves as the command line: `MLMDataModule` + `MLMModule` + a plain `lightning.Trainer`, as in a
script or a notebook, get the same pairing of model and data, refusals in Python terms, a graceful stop that saves
and resumes exactly, checkpoints that load with their tokenizer, fill-mask and export."""

import os
import signal
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch

from mlm_lightning import MLMDataModule, MLMModule
from mlm_lightning.errors import MLMError
from tests.support import ROOT
from tests.support.models import TINY, tiny_model

DATA = dict(max_length=24, batch_size=8, vocab_size=300)


def trainer(root, **kw) -> L.Trainer:
    return L.Trainer(**{"accelerator": "cpu", "default_root_dir": str(root), "enable_progress_bar": False,
                        "enable_model_summary": False, "log_every_n_steps": 1, "max_steps": 6,
                        "val_check_interval": 3, **kw})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("pretrained"))


def test_a_pretrained_model_brings_its_tokenizer_length_and_learning_rate(corpus, pretrained, tmp_path):
    data = MLMDataModule(train_files=corpus, cache_dir=str(tmp_path / "cache"))
    model = MLMModule(model_name_or_path=pretrained)
    trainer(tmp_path, max_steps=2).fit(model, datamodule=data)
    assert data.hparams.tokenizer == pretrained and data.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert model.hparams.learning_rate == 5e-5 and data.hparams.max_length == 24  # its tokenizer's 24 tokens
    # what the caller gave wins
    data = MLMDataModule(train_files=corpus, max_length=16, cache_dir=str(tmp_path / "cache"))
    model = MLMModule(model_name_or_path=pretrained, learning_rate=1e-4)
    trainer(tmp_path / "given", max_steps=1).fit(model, datamodule=data)
    assert model.hparams.learning_rate == 1e-4 and data.hparams.max_length == 16


def test_a_tokenizer_with_another_vocabulary_than_the_pretrained_models_is_refused(corpus, pretrained, tmp_path):
    other = MLMDataModule(train_files=corpus, vocab_size=150, cache_dir=str(tmp_path / "cache"))
    other.prepare_data()
    other.tokenizer.save_pretrained(tmp_path / "other-tok")
    data = MLMDataModule(train_files=corpus, tokenizer=str(tmp_path / "other-tok"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(MLMError, match=r"another vocabulary.*leave MLMDataModule\(tokenizer=\.\.\.\) unset"):
        trainer(tmp_path, max_steps=1).fit(MLMModule(model_name_or_path=pretrained), datamodule=data)


def test_a_vocabulary_trained_on_the_corpus_for_a_pretrained_model_is_refused(corpus, pretrained, tmp_path):
    data = MLMDataModule(train_files=corpus, tokenizer=None, cache_dir=str(tmp_path / "cache"))  # (given: trained)
    with pytest.raises(MLMError, match=r"tokenizer \(trained on the corpus\) has another vocabulary"):
        trainer(tmp_path, max_steps=1).fit(MLMModule(model_name_or_path=pretrained), datamodule=data)


def test_a_new_roberta_gets_a_byte_level_bpe_tokenizer(corpus, tmp_path):
    data = MLMDataModule(train_files=corpus, **DATA, cache_dir=str(tmp_path / "cache"))
    model = MLMModule(architecture="roberta", **{**TINY, "max_position_embeddings": 32})
    trainer(tmp_path, max_steps=1).fit(model, datamodule=data)
    assert data.hparams.tokenizer_kind == "roberta" and data.tokenizer.mask_token == "<mask>"
    assert type(model.model).__name__ == "RobertaForMaskedLM"


@pytest.mark.parametrize("make, words", [
    (lambda: MLMDataModule(batch_size="ten"), "MLMDataModule(batch_size='ten'): expects int, got str"),
    (lambda: MLMModule(learning_rate="1e-4"), "MLMModule(learning_rate='1e-4'): expects float, got str"),
    (lambda: MLMModule(fused_optimizer="yes"), "MLMModule(fused_optimizer='yes'): expects bool | 'auto'"),
    (lambda: MLMDataModule(train_files=3), "MLMDataModule(train_files=3): expects str | list"),
])
def test_wrong_types_are_refused_naming_the_argument(make, words):
    with pytest.raises(MLMError) as e:
        make()
    assert str(e.value).startswith(words)


def test_predict_without_input_says_so_in_python_terms(tmp_path, pretrained):
    model = MLMModule.load(pretrained)
    with pytest.raises(MLMError, match=r"pass MLMDataModule\(predict_files='FILE'\)"):
        trainer(tmp_path).predict(model, datamodule=MLMDataModule(tokenizer=pretrained))


def test_a_checkpoint_loads_with_its_tokenizer_fills_masks_and_exports(corpus, tmp_path):
    data = MLMDataModule(train_files=corpus, **DATA, cache_dir=str(tmp_path / "cache"))
    model = MLMModule(**TINY)
    trainer(tmp_path).fit(model, datamodule=data)
    last = tmp_path / "checkpoints" / "last.ckpt"  # the module's checkpoint policy, under the trainer's root
    assert last.exists() and list((tmp_path / "checkpoints").glob("best-step=*.ckpt"))
    loaded = MLMModule.load_from_checkpoint(last)
    assert loaded.tokenizer.get_vocab() == data.tokenizer.get_vocab()
    for k, v in model.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    answer = loaded.fill_mask("the cat [MASK] the river .", top_k=3)
    assert len(answer) == 3 and set(answer[0]) == {"score", "token", "token_str", "sequence"}
    two = loaded.fill_mask(["the [MASK] sees a tree .", "[MASK] dog [MASK] the ball ."], top_k=2)
    assert len(two) == 2 and len(two[0]) == 2 and len(two[1]) == 2 and len(two[1][0]) == 2  # two masks: a list each
    out = loaded.export(str(tmp_path / "export"))
    again = MLMModule.load(out)  # an export dir loads too, and answers the same
    again_answer = again.fill_mask("the cat [MASK] the river .", top_k=3)
    assert [c["token"] for c in again_answer] == [c["token"] for c in answer]
    assert [c["score"] for c in again_answer] == pytest.approx([c["score"] for c in answer], abs=1e-6)
    from transformers import pipeline

    assert pipeline("fill-mask", model=out)("the cat [MASK] the river .", top_k=3)[0]["token"] == answer[0]["token"]


class InterruptAt(L.Callback):
    """What a notebook's interrupt button does: SIGINT to the kernel, here after optimizer step `step`."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_notebook_interrupt_saves_last_ckpt_and_the_resume_is_exact(corpus, tmp_path):
    def run(root, *callbacks, ckpt_path=None):
        torch.manual_seed(0)
        data = MLMDataModule(train_files=corpus, **DATA, cache_dir=str(tmp_path / "cache"))
        model = MLMModule(**{**TINY, "dropout": 0.1})
        t = trainer(root, max_steps=8, callbacks=list(callbacks))
        t.fit(model, datamodule=data, ckpt_path=ckpt_path)  # returns: no KeyboardInterrupt, no SystemExit
        return t, model

    straight, _ = run(tmp_path / "straight")
    stopped, _ = run(tmp_path / "nb", InterruptAt(4))
    last = tmp_path / "nb" / "checkpoints" / "last.ckpt"
    assert stopped.global_step == 4 and torch.load(last, weights_only=True)["global_step"] == 4
    resumed, model = run(tmp_path / "nb", ckpt_path=str(last))
    assert resumed.global_step == 8
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(last, weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_a_script_without_a_main_guard_tokenizes_in_worker_processes_and_finishes(corpus, tmp_path):
    """Spawned tokenizing workers import the parent's `__main__`: an unguarded script would fit again in each."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import lightning as L
        from mlm_lightning import MLMDataModule, MLMModule
        from mlm_lightning.data import shards
        shards.PROCESS_MIN_BYTES = 0  # (workers from the first byte: a big corpus's path, on a small one)
        data = MLMDataModule(train_files={corpus!r}, max_length=24, batch_size=8, vocab_size=300,
                             cache_dir={str(tmp_path / "cache")!r})
        model = MLMModule(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        L.Trainer(max_steps=1, accelerator="cpu", default_root_dir={str(tmp_path / "run")!r},
                  enable_progress_bar=False).fit(model, datamodule=data)
        print("FIT DONE")
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0 and done.stdout.count("FIT DONE") == 1, done.stderr[-3000:]
    # a script that configured no logging sees the project's lines (the end summary), once
    assert done.stderr.count("mlm-lightning: fit done: 1 steps") == 1, done.stderr[-3000:]


def test_callbacks_false_leaves_the_trainers_own(corpus, tmp_path):
    data = MLMDataModule(train_files=corpus, **DATA, cache_dir=str(tmp_path / "cache"))
    t = trainer(tmp_path, max_steps=1)
    t.fit(MLMModule(**TINY, callbacks=False), datamodule=data)
    assert not (tmp_path / "checkpoints").exists()  # Lightning's own checkpoint, in its own place


def test_a_refusal_names_options_in_the_callers_terms(corpus, capsys):
    from tests.support.cli import run_cli

    with pytest.raises(MLMError, match=r"set MLMDataModule\(val_fraction=\.\.\.\) above 0"):
        MLMDataModule(train_files=corpus, val_fraction=0.0)
    assert run_cli("fit", "--data.train_files", corpus, "--data.val_fraction", "0") == 2
    assert "set --data.val_fraction above 0" in capsys.readouterr().err
    with pytest.raises(MLMError, match=r"MLMDataModule\(val_fraction"):  # (back to Python terms after the CLI)
        MLMDataModule(train_files=corpus, val_fraction=0.0)


def test_paths_and_a_subclasss_keyword_arguments(corpus, pretrained, tmp_path):
    from pathlib import Path

    data = MLMDataModule(train_files=Path(corpus), cache_dir=tmp_path / "cache")
    assert data.hparams.train_files == corpus and isinstance(data.hparams.cache_dir, str)

    class Mine(MLMModule):
        def __init__(self, extra: int = 1, **kwargs):
            super().__init__(**kwargs)

    model = Mine(model_name_or_path=Path(pretrained), learning_rate=1e-4)
    assert {"model_name_or_path", "learning_rate"} <= model.given_arguments  # (what the subclass passed on)
    trainer(tmp_path, max_steps=1).fit(model, datamodule=data)
    assert model.hparams.learning_rate == 1e-4  # given through **kwargs: it wins over the fine-tuning rate
