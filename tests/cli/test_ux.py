"""What a user sees: effective defaults, the command list, progress, resume and end-of-fit lines, plots."""

import io
import os
import re

import pytest
import torch
import yaml

from mlm_lightning.cli.defaults import demo_recipe
from tests.support import ROOT
from tests.support.cli import TINY_DATA, TINY_MODEL, error_line, run_cli
from tests.support.text import sentences

PNG = b"\x89PNG\r\n\x1a\n"


def quiet(*extra):
    return ["--trainer.accelerator", "cpu", "--trainer.enable_model_summary", "false", *extra]


def printed_config(capsys, *args) -> dict:
    assert run_cli(*args, "--print_config") == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A local pretrained-BERT directory (save_pretrained output) with `max_position_embeddings` positions."""
    from transformers import BertConfig, BertForMaskedLM

    from mlm_lightning.data.tokenizer import train_wordpiece
    from mlm_lightning.export import save_hf

    tmp = tmp_path_factory.mktemp("bert")
    tok = train_wordpiece(sentences(300), str(tmp / "tok"), 200, 512)

    def make(positions: int) -> str:
        config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=positions)
        torch.manual_seed(0)
        return save_hf(BertForMaskedLM(config), tok, str(tmp / f"bert-{positions}"))

    return make


# -- defaults that follow from what was asked ----------------------------------------------------------
def test_print_config_shows_the_budget_for_the_demo_and_for_a_user_corpus(corpus, capsys):
    demo = printed_config(capsys, "fit")  # the offline demo: configs/default.yaml's recipe, its budget too
    assert demo["trainer"]["max_epochs"] is None and demo["data"]["max_length"] == 64
    assert demo["data"]["vocab_size"] == 4096 and demo["data"]["mlm_probability"] == 0.3
    assert demo["model"]["architecture"] == "modernbert"
    with open(ROOT / "configs" / "default.yaml") as f:
        shipped = yaml.safe_load(f)
    # bounded by steps, not wall time: a busy machine trains the same model, only later
    assert shipped["trainer"]["max_steps"] > 0 and "max_time" not in shipped["trainer"]
    recipe = {k: v for k, v in demo_recipe().items() if not k.startswith("trainer.")}
    for key in (*recipe, "trainer.max_steps"):
        group, name = key.split(".")
        assert shipped[group][name] == demo[group][name], key  # a bare `fit` runs the shipped recipe
    for sub in ("validate", "predict"):  # a demo checkpoint is read with the demo's model, vocabulary, masking
        other = printed_config(capsys, sub)
        assert {k: other[k.split(".")[0]][k.split(".")[1]] for k in recipe} == recipe, sub
    user = printed_config(capsys, "fit", "--data.train_files", corpus)
    assert user["trainer"]["max_epochs"] == 3 and user["model"]["learning_rate"] == 0.001
    assert user["data"]["mlm_probability"] == 0.15 and user["data"]["vocab_size"] == 8192
    assert user["model"]["architecture"] == "bert"  # your corpus: BERT, the library's own default
    steps = printed_config(capsys, "fit", "--data.train_files", corpus, "--trainer.max_steps", "500")
    assert steps["trainer"]["max_epochs"] is None and steps["trainer"]["max_steps"] == 500  # steps alone decide
    mine = printed_config(capsys, "fit", "--data.train_files", corpus, "--trainer.max_epochs", "60")
    assert mine["trainer"]["max_epochs"] == 60  # what the user set stays, even the demo's number


def test_print_config_with_a_pretrained_dir_shows_finetuning_values(corpus, bert_dir, capsys):
    small, large = bert_dir(128), bert_dir(1024)
    cfg = printed_config(capsys, "fit", "--data.train_files", corpus, "--model.model_name_or_path", small)
    assert cfg["model"]["learning_rate"] == 5e-5 and cfg["data"]["max_length"] == 128
    assert cfg["trainer"]["max_epochs"] == 3
    assert printed_config(capsys, "fit", "--model.model_name_or_path", large)["data"]["max_length"] == 512  # capped
    kept = printed_config(capsys, "fit", "--data.train_files", corpus, "--model.model_name_or_path", small,
                          "--model.learning_rate", "0.001", "--data.max_length", "32")
    assert kept["model"]["learning_rate"] == 0.001 and kept["data"]["max_length"] == 32


def test_the_adjusted_defaults_are_what_the_fit_uses(corpus, bert_dir, tmp_path, capsys):
    root = tmp_path / "ft"
    code = run_cli("fit", "--data.train_files", corpus, "--model.model_name_or_path", bert_dir(48),
                   "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root), *quiet(
                       "--trainer.enable_progress_bar", "false"))
    assert code == 0
    assert "--model.learning_rate 5e-05 (fine-tuning a pretrained model)" in capsys.readouterr().err
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["learning_rate"] == 5e-5
    assert ckpt["datamodule_hyper_parameters"]["max_length"] == 48


def test_seed_notebook_config_with_a_local_bert_dir(corpus, bert_dir, tmp_path, capsys):
    args = ["fit", "--config", "configs/seed-notebook.yaml", "--model.model_name_or_path", bert_dir(512),
            "--data.train_files", corpus]
    cfg = printed_config(capsys, *args)
    assert cfg["data"]["line_by_line"] is True and cfg["data"]["batch_size"] == 2 and cfg["data"]["max_length"] == 512
    assert cfg["trainer"]["max_epochs"] == 2 and cfg["model"]["learning_rate"] == 5e-5
    root = tmp_path / "seed"
    assert run_cli(*args, "--trainer.max_steps", "4", "--trainer.default_root_dir", str(root),
                   *quiet("--trainer.enable_progress_bar", "false")) == 0
    assert (root / "export" / "model.safetensors").exists() and (root / "checkpoints" / "last.ckpt").exists()


# -- one command line ------------------------------------------------------------------------------------
def test_help_lists_every_command_with_one_line(capsys):
    assert run_cli("--help") == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "fill-mask", "export", "plot", "serve"):
        assert re.search(rf"^  {re.escape(name)} +\S.+$", out, re.M), (name, out)
    assert run_cli() == 0 and "fill-mask" in capsys.readouterr().out


def test_every_command_waits_passively_in_openmp_unless_the_user_chose(monkeypatch, capsys):
    """Set before torch loads OpenMP (a new process's `mlm-lightning`): spinning waiters collapse a fit's throughput
    beside another busy job (scripts/bench_threads.py)."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert run_cli("--help") == 0 and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert run_cli("--help") == 0 and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_unknown_command_is_one_line(capsys):
    assert run_cli("fitt") == 2
    assert "unknown command 'fitt'" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["fill-mask", "export", "plot"])
def test_extra_commands_have_help(command, capsys):
    assert run_cli(command, "--help") == 0
    assert f"usage: mlm-lightning {command}" in capsys.readouterr().out


def test_extra_command_bad_option_is_one_line(capsys):
    assert run_cli("export", "--ckpt_path", "x.ckpt") == 2  # --export_dir missing
    line = error_line(capsys.readouterr().err)
    assert "export_dir" in line and "see mlm-lightning export --help" in line


def test_lightnings_optimizer_options_are_not_offered_and_are_refused_in_one_line(tmp_path, capsys):
    assert run_cli("fit", "--help") == 0
    out = capsys.readouterr().out
    assert "--optimizer" not in out and "--lr_scheduler" not in out and "--model.learning_rate" in out
    config = tmp_path / "sgd.yaml"
    config.write_text("optimizer:\n  class_path: torch.optim.SGD\n")
    for args, points_to in [(["--optimizer", "SGD", "--optimizer.lr", "0.1"], "--model.learning_rate"),
                            (["--lr_scheduler=StepLR"], "--model.schedule"), (["--config", str(config)], "AdamW")]:
        assert run_cli("fit", *args) == 2
        line = error_line(capsys.readouterr().err)
        assert "is not an option of mlm-lightning" in line and points_to in line, line


# -- a fit, resumed: progress, resume line, end summary, plot -----------------------------------------------
@pytest.fixture(scope="module")
def resumed(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("resumed")
    base = ["fit", "--data.train_files", corpus, *TINY_MODEL, *TINY_DATA, "--trainer.default_root_dir", str(root),
            "--trainer.val_check_interval", "3", *quiet()]
    assert run_cli(*base, "--trainer.max_steps", "6") == 0
    err = io.StringIO()
    import contextlib

    with contextlib.redirect_stderr(err):  # the progress bar stays on: our bar must work in a real fit
        code = run_cli(*base, "--trainer.max_steps", "10", "--ckpt_path", "last")
    assert code == 0
    return root, err.getvalue()


def test_resume_says_where_it_resumes(resumed):
    root, err = resumed
    last = os.path.join(str(root), "checkpoints", "last.ckpt")
    assert f"resuming from {last} at step 6 (epoch 0, batch 6)" in err, err[-2000:]


def test_end_of_fit_summary(resumed):
    root, err = resumed
    done = re.search(r"fit done in \S+: 4 steps \(step 6 -> 10\), ([\d.]+)(k?) real tokens seen,"
                     r" ([\d,]+) real tokens/s on average over \S+ of training", err)
    assert done, err[-2000:]
    tokens = float(done.group(1)) * (1000 if done.group(2) else 1)
    assert 4 * 8 * 10 < tokens <= 4 * 8 * 32  # 4 batches of 8 blocks of at most 32 tokens (~31 real)
    assert re.search(r"val/ppl: [\d.]+ \(step 9\) -> [\d.]+ \(step 9\), best [\d.]+ \(step 9\)", err)
    for line in (f"checkpoints: {root}/checkpoints", f"exported that model (Hugging Face format) to {root}/export",
                 f"logs: {root}/lightning_logs/version_1", f"plot: {root}/plot.png"):
        assert line in err, (line, err[-2000:])


def test_fit_writes_a_plot_of_the_whole_run(resumed):
    root, _ = resumed
    data = (root / "plot.png").read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000
    from mlm_lightning.training.plot import read_metrics

    steps = [s for s, _ in read_metrics(str(root))["train/loss"]]
    assert steps == list(range(1, 11))  # both logged versions, joined


def test_plot_command_draws_one_or_several_runs(resumed, tmp_path, capsys):
    root, _ = resumed
    out = tmp_path / "one.png"
    assert run_cli("plot", str(root), "--out", str(out)) == 0
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 10_000
    both = tmp_path / "both.png"
    assert run_cli("plot", str(root), str(root), "--out", str(both)) == 0 and both.read_bytes().startswith(PNG)
    assert run_cli("plot", str(root), "--out", str(out)) == 0  # our own picture is replaced


def test_plot_never_overwrites_a_users_file(resumed, tmp_path, capsys):
    root, _ = resumed
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"my picture")
    assert run_cli("plot", str(root), "--out", str(mine)) == 2
    assert "was not written by mlm-lightning plot" in capsys.readouterr().err
    assert mine.read_bytes() == b"my picture"
    assert run_cli("plot", str(tmp_path / "nothing")) == 2
    assert "does not exist" in error_line(capsys.readouterr().err)


# -- defaults on a GPU and under torch.compile ------------------------------------------------------------
def test_on_a_gpu_logging_is_sparser_and_workers_prepare_batches():
    from jsonargparse import Namespace

    from mlm_lightning.cli.defaults import GPU_LOG_EVERY, adjusted_defaults

    cfg = Namespace(trainer=Namespace(accelerator="gpu", max_epochs=3, log_every_n_steps=1),
                    model=Namespace(model_name_or_path=None), data=Namespace(train_files="x.txt", num_workers=0))
    changes = adjusted_defaults(cfg, Namespace(data=Namespace(train_files="x.txt")))
    assert changes["trainer.log_every_n_steps"][0] == GPU_LOG_EVERY and changes["data.num_workers"][0] >= 1
    given = Namespace(data=Namespace(train_files="x.txt", num_workers=0), trainer=Namespace(log_every_n_steps=1))
    assert "data.num_workers" not in adjusted_defaults(cfg, given)  # what the user set stays
    cfg.trainer.accelerator = "cpu"
    assert "trainer.log_every_n_steps" not in adjusted_defaults(cfg, Namespace())


def test_compile_with_line_by_line_pads_to_few_shapes(write, tmp_path):
    from jsonargparse import Namespace

    from mlm_lightning.cli.defaults import COMPILE_PAD_MULTIPLE, adjusted_defaults
    from mlm_lightning.data import MLMDataModule

    cfg = Namespace(trainer=Namespace(accelerator="cpu", max_epochs=3), model=Namespace(compile=True),
                    data=Namespace(train_files="x.txt", line_by_line=True, pad_to_multiple_of=8))
    assert adjusted_defaults(cfg, Namespace())["data.pad_to_multiple_of"][0] == COMPILE_PAD_MULTIPLE
    dm = MLMDataModule(train_files=write("t.txt", sentences(200)), cache_dir=str(tmp_path / "c"), vocab_size=300,
                       line_by_line=True, max_length=48, batch_size=8, pad_to_multiple_of=16)
    dm.prepare_data()
    dm.setup("fit")
    assert {b["input_ids"].shape[1] % 16 for b in dm.train_dataloader() if "attention_mask" in b} == {0}
