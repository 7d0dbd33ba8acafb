"""Safety: nothing is destroyed, checkpoints are data, interrupts lose nothing, odd settings are right."""

import glob
import os
import signal
import stat
import time

import numpy as np
import pytest
import torch

from mlm_lightning.data.sampling import BatchPlan
from mlm_lightning.errors import MLMError
from mlm_lightning.export import MANIFEST
from mlm_lightning.model.checkpoint import load_checkpoint
from mlm_lightning.training.checkpointing import MLMCheckpoint
from tests.support.cli import error_line, run_cli
from tests.support.cli import fit_args as fit
from tests.support.runs import assert_resumed_at, run_steps, state
from tests.support.runs import metric as metrics


def same_weights(a, b):
    wa, wb = state(a)["state_dict"], state(b)["state_dict"]
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


# -- 1. export never removes what it did not write ------------------------------------------------------
def test_export_keeps_user_files_and_replaces_only_its_own(run, tmp_path, capsys):
    ckpt = str(run / "checkpoints" / "last.ckpt")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert run_cli("export", "--ckpt_path", ckpt, "--export_dir", str(mine)) == 2
    err = capsys.readouterr().err
    assert "already holds files that no export wrote (e.g. 'notes.txt')" in err and err.count("\n") == 1
    assert (mine / "notes.txt").read_text() == "keep me" and os.listdir(mine) == ["notes.txt"]

    out = tmp_path / "out"
    assert run_cli("export", "--ckpt_path", ckpt, "--export_dir", str(out)) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    first = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST} <= first
    assert run_cli("export", "--ckpt_path", ckpt, "--export_dir", str(out)) == 0  # a previous export: replaced
    assert set(os.listdir(out)) == first
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary dirs left behind
    (out / "README.md").write_text("my model card")
    assert run_cli("export", "--ckpt_path", ckpt, "--export_dir", str(out)) == 2
    assert (out / "README.md").read_text() == "my model card"


def test_export_into_the_run_root_or_cwd_is_refused(run, tmp_path, capsys, monkeypatch):
    before = sorted(os.listdir(run / "checkpoints"))
    assert run_cli("export", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--export_dir", str(run)) == 2
    assert sorted(os.listdir(run / "checkpoints")) == before
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work.py").write_text("print(1)")
    assert run_cli("export", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--export_dir", ".") == 2
    assert (tmp_path / "work.py").exists()
    assert "no export wrote" in capsys.readouterr().err


def test_fit_with_export_dir_equal_to_the_run_root_keeps_every_checkpoint(corpus, tmp_path, capsys):
    root = tmp_path / "x"
    assert run_cli(*fit(corpus, root, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2")) == 0
    (root / "notes.txt").write_text("mine")
    before = sorted(os.listdir(root / "checkpoints"))
    start = time.time()
    code = run_cli(*fit(corpus, root, "--trainer.max_steps", "4", "--export_dir", str(root)))
    assert code == 2 and time.time() - start < 30  # refused before training, not after it
    assert "would contain" in capsys.readouterr().err
    assert sorted(os.listdir(root / "checkpoints")) == before and (root / "notes.txt").read_text() == "mine"
    fresh = tmp_path / "fresh"  # a run root that does not exist yet is refused too
    assert run_cli(*fit(corpus, fresh, "--trainer.max_steps", "2", "--export_dir", str(fresh))) == 2
    assert "would contain" in error_line(capsys.readouterr().err)


# -- 2. a checkpoint is data: no file name from it becomes a path ---------------------------------------
@pytest.mark.parametrize("name", ["../../evil.pth", "/tmp/mlm-evil-abs.pth", "sub/tokenizer.json", "vocab.txt"])
def test_crafted_checkpoint_writes_nothing_and_is_refused(run, tmp_path, capsys, name):
    ckpt = state(run)
    target = tmp_path / "deep" / "er"
    target.mkdir(parents=True)
    ckpt["mlm_lightning"]["tokenizer_files"][name] = "import os; os.system('echo pwned')"
    crafted = target / "crafted.ckpt"
    torch.save(ckpt, crafted)
    before = set(glob.glob(f"{tmp_path}/**", recursive=True))
    with pytest.raises(MLMError, match="unexpected tokenizer file"):
        load_checkpoint(str(crafted))
    assert run_cli("fill-mask", "--model", str(crafted), "the [MASK] sees a tree .") == 2
    assert "unexpected tokenizer file" in capsys.readouterr().err
    assert set(glob.glob(f"{tmp_path}/**", recursive=True)) == before
    assert not os.path.exists("/tmp/mlm-evil-abs.pth")


def test_checkpoint_tokenizer_config_naming_files_is_refused(run, tmp_path):
    ckpt = state(run)
    ckpt["mlm_lightning"]["tokenizer_files"]["tokenizer_config.json"] = '{"vocab_file": "/etc/passwd"}'
    torch.save(ckpt, tmp_path / "c.ckpt")
    with pytest.raises(MLMError, match="names a file"):
        load_checkpoint(str(tmp_path / "c.ckpt"))


# -- 3. only the families it knows ---------------------------------------------------------------------
def test_a_refused_family_is_refused_by_fit_and_fill_mask(run, corpus, tmp_path, capsys):
    """DeBERTa-v2/v3 hub checkpoints carry no MLM head (replaced-token detection): refused, not given a random head."""
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForMaskedLM

    deberta = tmp_path / "deberta"
    DebertaV2ForMaskedLM(DebertaV2Config(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64)).save_pretrained(deberta)
    AutoTokenizer.from_pretrained(run / "export").save_pretrained(deberta)
    assert run_cli(*fit(corpus, tmp_path / "r", "--model.model_name_or_path", str(deberta))) == 2
    assert "deberta" in error_line(capsys.readouterr().err)
    assert run_cli("fill-mask", "--model", str(deberta), "the [MASK] sees a tree .") == 2
    assert "deberta" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


# -- 4. interrupts in every phase, exact resume ---------------------------------------------------------
VAL = ["--data.val_fraction", "0.3", "--trainer.max_steps", "30", "--trainer.val_check_interval", "10"]


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    assert run_cli(*fit(corpus, root, *VAL)) == 0
    return root


@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_sigterm_during_a_long_validation_saves_within_seconds_and_resume_reruns_it(
    corpus, tmp_path, capsys, straight
):
    root = tmp_path / "val"
    step = sorted(metrics(straight, "val/loss"))[1]  # the second validation, each of ~6 batches
    code = run_cli(*fit(corpus, root, *VAL, "--trainer.callbacks+=tests.support.callbacks.SlowValidation",
                        "--trainer.callbacks.after_step", "15", "--trainer.callbacks.seconds", "2.5",
                        # 2.5 s a batch from then on: the signal comes after the first, with ~12 s of validation left
                        "--trainer.callbacks+=tests.support.callbacks.SignalDuringValidation",
                        "--trainer.callbacks.step", "15"))
    assert code == 143, capsys.readouterr().err
    assert state(root)["global_step"] == step + 1  # (metrics.csv logs a validation at global step - 1)
    assert step not in run_steps(root, "val/loss")[0]  # that validation was cut short: it never logged its end
    waited = os.path.getmtime(root / "checkpoints" / "last.ckpt") - float(os.environ["MLM_TEST_SIGNAL_SENT"])
    # the batch under way (2.5 s) and the save, not the rest of the validation (5 more batches, 12.5 s)
    assert waited < 10
    assert run_cli(*fit(corpus, root, *VAL, "--ckpt_path", "last")) == 0
    assert_resumed_at(root, step + 1)
    assert same_weights(straight, root)
    # the validation cut short was run again, whole: same value as in the uninterrupted run
    assert metrics(root, "val/loss")[step] == pytest.approx(metrics(straight, "val/loss")[step], abs=1e-6)


@pytest.fixture(scope="module")
def accumulated(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("acc")
    assert run_cli(*fit(corpus, root, *VAL, "--trainer.accumulate_grad_batches", "2")) == 0
    return root


@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_interrupt_inside_an_accumulation_window_then_resume_is_exact(corpus, tmp_path, capsys, accumulated):
    root = tmp_path / "acc-int"
    code = run_cli(*fit(corpus, root, *VAL, "--trainer.accumulate_grad_batches", "2",
                        "--trainer.callbacks+=tests.support.callbacks.SignalAtBatch",
                        "--trainer.callbacks.batch", "15"))
    assert code == 143, capsys.readouterr().err
    assert state(root)["global_step"] == 8  # batch 15 is mid-window: saved after batch 16, step 8
    assert run_cli(*fit(corpus, root, *VAL, "--trainer.accumulate_grad_batches", "2", "--ckpt_path", "last")) == 0
    assert_resumed_at(root, 8)
    assert same_weights(accumulated, root)


def test_no_periodic_checkpoint_at_step_0_and_none_inside_a_window(corpus, tmp_path, monkeypatch):
    saved = []
    real = MLMCheckpoint.write_last

    def spy(self, trainer, mid_validation=False):
        saved.append((trainer.global_step, trainer.fit_loop.epoch_loop._should_accumulate()))
        return real(self, trainer, mid_validation)

    monkeypatch.setattr(MLMCheckpoint, "write_last", spy)
    assert run_cli(*fit(corpus, tmp_path / "p", "--trainer.max_steps", "6", "--trainer.accumulate_grad_batches", "2",
                        "--checkpoint.every_n_train_steps", "2", "--trainer.val_check_interval", "4")) == 0
    # (asked once more where a validation ends: write_last writes once per step, see test_host_syncs.py)
    assert sorted({s for s, _ in saved}) == [2, 4, 6] and not any(mid for _, mid in saved)  # 6: periodic and final


def test_a_second_ctrl_c_exits_130_at_once(corpus, tmp_path, capsys):
    code = run_cli(*fit(corpus, tmp_path / "cc", "--trainer.max_steps", "30",
                        "--trainer.callbacks+=tests.support.callbacks.SignalAtBatch", "--trainer.callbacks.batch", "5",
                        "--trainer.callbacks.signum", str(int(signal.SIGINT)), "--trainer.callbacks.times", "2"))
    err = capsys.readouterr().err
    assert code == 130, err
    assert "interrupted by SIGINT" in err and "Traceback" not in err
    # at once: the second Ctrl-C came before the first one's checkpoint (a single Ctrl-C saves step 5, below)
    assert "no training step to save" in err and not (tmp_path / "cc" / "checkpoints" / "last.ckpt").exists()


def test_a_single_ctrl_c_saves_then_exits_130(corpus, tmp_path, capsys):
    code = run_cli(*fit(corpus, tmp_path / "c1", "--trainer.max_steps", "30",
                        "--trainer.callbacks+=tests.support.callbacks.SignalAtBatch", "--trainer.callbacks.batch", "5",
                        "--trainer.callbacks.signum", str(int(signal.SIGINT))))
    assert code == 130 and "saved" in capsys.readouterr().err
    assert state(tmp_path / "c1")["global_step"] == 5


# -- 6. token-budget batches: a stable count per epoch, within the budget after padding ----------------
@pytest.mark.parametrize("replicas", [1, 2])
def test_max_tokens_batches_are_stable_across_epochs_and_within_budget(replicas):
    lengths = np.random.default_rng(0).integers(3, 61, size=2000)
    for rank in range(replicas):
        plan = BatchPlan(lengths, 16, max_tokens=512, seed=1, num_replicas=replicas, rank=rank)
        counts = set()
        for epoch in range(6):
            plan.set_epoch(epoch)
            batches = [np.array([i for _, i in b]) for b in plan]
            counts.add(len(batches))
            for b in batches:
                padded = -(-lengths[b].max() // 8) * 8
                assert padded * len(b) <= 512 or len(b) == 1
            if replicas == 1:
                assert sorted(np.concatenate(batches)) == list(range(2000))
        assert len(counts) == 1


def test_evaluation_shards_step_in_lockstep():
    lengths = np.arange(4, 21)  # 17 examples, 2 processes, batch 8: 9 + 8 examples
    plans = [BatchPlan(lengths, 8, shuffle=False, num_replicas=2, rank=r) for r in (0, 1)]
    shards = [list(p) for p in plans]
    assert len(shards[0]) == len(shards[1]) and all(p.lockstep for p in plans)
    assert sorted(i for s in shards for b in s for _, i in b) == list(range(17))


# -- 7. the best checkpoint is chosen by the validation that belongs to it ------------------------------
def test_best_checkpoint_is_scored_by_its_own_validation(corpus, tmp_path):
    root = tmp_path / "best"
    assert run_cli(*fit(corpus, root, "--trainer.max_steps", "20", "--trainer.val_check_interval", "5",
                        "--checkpoint.every_n_train_steps", "5", "--model.learning_rate", "3e-3")) == 0
    val = metrics(root, "val/loss")
    best_step = min(val, key=val.get)
    best = [n for n in os.listdir(root / "checkpoints") if n.startswith("best-")]
    assert best == [f"best-step={best_step + 1}.ckpt"]  # (metrics.csv logs a validation at global step - 1)
    callback = next(v for k, v in state(root)["callbacks"].items() if k.startswith("MLMCheckpoint"))
    assert float(callback["best_model_score"]) == pytest.approx(val[best_step], abs=1e-5)


def test_packed_training_batches_have_one_static_shape(corpus, tmp_path):
    """Every packed training batch is batch_size x max_length, so torch.compile compiles once."""
    from mlm_lightning.data import MLMDataModule

    dm = MLMDataModule(train_files=corpus, cache_dir=str(tmp_path / "c"), vocab_size=300, max_length=32,
                       batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    shapes = {tuple(b["input_ids"].shape) for b in dm.train_dataloader()}
    assert shapes == {(8, 32)}
    assert len(dm.datasets["train"]) % 8 != 0  # (there was a partial batch to drop)


def test_a_new_fit_does_not_overwrite_another_runs_last_ckpt(run, corpus, capsys):
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    assert run_cli(*fit(corpus, run, "--trainer.max_steps", "2")) == 2  # same root, no --ckpt_path
    assert "is another run's checkpoint" in capsys.readouterr().err
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before


def test_paths_in_a_checkpoints_callback_state_outside_the_run_are_dropped(tmp_path):
    home = tmp_path / "checkpoints"
    home.mkdir()
    cb = MLMCheckpoint(dirpath=str(home))
    evil = f"{home}/../../thesis.tex"
    cb.load_state_dict({"dirpath": str(home), "best_model_path": evil, "best_model_score": torch.tensor(1.0),
                        "kth_best_model_path": evil, "best_k_models": {evil: torch.tensor(1.0),
                                                                       f"{home}/best-step=4.ckpt": torch.tensor(2.0)},
                        "last_model_path": "/etc/passwd", "kth_value": torch.tensor(1.0), "monitor": "val/loss"})
    assert list(cb.best_k_models) == [f"{home}/best-step=4.ckpt"]
    assert cb.best_model_path == cb.kth_best_model_path == cb.last_model_path == ""


# -- every file a command writes gets the umask's permissions ---------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_file_the_commands_write_gets_the_umasks_permissions(corpus, tmp_path, mask):
    root, cache = tmp_path / "run", tmp_path / "cache"
    inputs = tmp_path / "in.txt"
    inputs.write_text("the cat [MASK] the river .\n")
    data = ["--data.cache_dir", str(cache)]
    old = os.umask(mask)
    try:  # fit: config.yaml, logs, checkpoints, export, plot.png, the cache (tokenizer, tokenized corpus)
        assert run_cli(*fit(corpus, root, "--trainer.max_steps", "2", *data)) == 0
        assert run_cli("predict", *fit(corpus, root, *data)[1:], "--ckpt_path", str(root / "checkpoints" /
                       "last.ckpt"), "--data.predict_files", str(inputs), "--prediction_writer.output",
                       str(tmp_path / "out" / "pred.jsonl")) == 0
        assert run_cli("export", "--ckpt_path", str(root / "checkpoints" / "last.ckpt"), "--export_dir",
                       str(tmp_path / "exported")) == 0
        assert run_cli("plot", str(root), "--out", str(tmp_path / "out" / "plot.png")) == 0
    finally:
        os.umask(old)
    modes = {}
    for top in (root, cache, tmp_path / "out", tmp_path / "exported"):
        for where, _, names in os.walk(top):
            modes[where] = stat.S_IMODE(os.stat(where).st_mode)
            modes.update({os.path.join(where, n): stat.S_IMODE(os.stat(os.path.join(where, n)).st_mode)
                          for n in names})
    named = [root / "checkpoints" / "last.ckpt", root / "export" / "model.safetensors", root / "plot.png",
             root / "lightning_logs" / "version_0" / "config.yaml", tmp_path / "out" / "pred.jsonl",
             tmp_path / "out" / "plot.png", tmp_path / "exported" / "model.safetensors"]
    named += glob.glob(f"{cache}/data/*/meta.json") + glob.glob(f"{cache}/tokenizers/*/tokenizer.json")
    assert len(named) == 9 and all(str(p) in modes for p in named), sorted(modes)
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o777 if os.path.isdir(p) else 0o666) & ~mask}
    assert not wrong
