"""The `mlm-lightning` command: a short fit, validate from its checkpoint, and one-line errors."""

import os

import pytest
import torch

from tests.support.cli import error_line, fit_args, run_cli
from tests.support.runs import column, metric
from tests.support.runs import metric_rows as metrics


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """One short fit shared by the tests below (30 steps, validation every 10)."""
    root = tmp_path_factory.mktemp("run")
    code = run_cli(*fit_args(corpus, root, "--trainer.max_steps", "30", "--trainer.val_check_interval", "10",
                             "--model.learning_rate", "3e-3"))
    assert code == 0
    return root


def test_fit_writes_checkpoints_metrics_and_export(trained):
    names = sorted(os.listdir(trained / "checkpoints"))
    assert "last.ckpt" in names and any(n.startswith("best-step=") for n in names)
    assert not [n for n in names if ".tmp" in n]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(trained / "export"))
    rows = metrics(trained)
    ppl = column(rows, "val/ppl")
    assert len(ppl) >= 2 and ppl[-1] < ppl[0]  # validation perplexity dropped
    assert len(column(rows, "train/loss")) == 30 and column(rows, "train/lr")
    assert column(rows, "perf/tokens_per_s")[-1] > 0
    assert 0 <= column(rows, "val/acc")[-1] <= 1


def test_validate_from_checkpoint_reports_ppl(trained, corpus, capsys):
    import re

    [best] = [n for n in os.listdir(trained / "checkpoints") if n.startswith("best-step=")]
    step = int(best.removeprefix("best-step=").removesuffix(".ckpt"))
    args = fit_args(corpus, trained)[1:]
    code = run_cli("validate", *args, "--ckpt_path", str(trained / "checkpoints" / best))
    assert code == 0
    out = capsys.readouterr().out
    ppl = float(re.search(r"val/ppl\D+([0-9.]+)", out).group(1))
    # the checkpoint's own weights: the fit's validation at that step measured the same (logged at step - 1)
    assert ppl == pytest.approx(metric(trained, "val/ppl")[step - 1], rel=1e-4)


def test_print_config(corpus, capsys):
    assert run_cli("fit", "--data.train_files", corpus, "--print_config") == 0
    out = capsys.readouterr().out
    assert "train_files:" in out and "mlm_probability: 0.15" in out and "every_n_train_steps" in out


def test_help_shows_docstrings(capsys):
    assert run_cli("fit", "--help") == 0
    assert "Share of (non-special) tokens to predict" in capsys.readouterr().out


def _no_mask_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "hello": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(
        tmp_path / "nomask")
    return str(tmp_path / "nomask")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data.train_files", "no/such/file.txt"], "does not exist"),
        pytest.param(["--trainer.accelerator", "gpu"], "no usable CUDA GPU", marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="a GPU is there: the option is not bad input here")),
        (["--ckpt_path", "missing.ckpt"], "checkpoint 'missing.ckpt' does not exist"),
        (["--ckpt_path", "CORPUS"], "is not a checkpoint"),
        (["--data.max_length", "100"], "beyond the model's 64 position embeddings"),
        (["--model.model_name_or_path", "no-such-org/no-such-model"], "needs a network, or pass a local directory"),
        (["--data.max_length", "abc"], "data.max_length"),
        (["--data.mlm_probability", "0"], "mlm_probability must be in (0, 1)"),
        (["--data.tokenizer", "NOMASK"], "has no mask token"),
    ],
)
def test_bad_input_is_one_line(corpus, tmp_path, capsys, extra, message):
    extra = [corpus if e == "CORPUS" else _no_mask_tokenizer(tmp_path) if e == "NOMASK" else e for e in extra]
    code = run_cli(*fit_args(corpus, tmp_path / "run", "--trainer.max_steps", "2"), *extra)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("mlm-lightning: error")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and "usage:" not in err
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # refused before any work


def test_continue_from_a_local_model_dir(trained, corpus, tmp_path):
    """`model_name_or_path` = a save_pretrained directory: its weights and its tokenizer are used."""
    from safetensors.torch import load_file

    root = tmp_path / "continued"
    code = run_cli("fit", "--data.train_files", corpus, "--model.model_name_or_path", str(trained / "export"),
                   "--data.max_length", "32", "--trainer.max_steps", "3", "--trainer.default_root_dir", str(root),
                   "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false")
    assert code == 0
    assert (root / "export" / "model.safetensors").exists()
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["mlm_lightning"]["bert_config"]["hidden_size"] == 32  # the directory's model, not a new one
    # its weights: 3 steps at the fine-tuning rate (5e-5) move each by ~1e-4 at most; a fresh init differs by ~0.02
    saved = load_file(str(trained / "export" / "model.safetensors"))
    now = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    common = saved.keys() & now.keys()
    assert len(common) > 20
    assert max((saved[k].float() - now[k].float()).abs().max().item() for k in common) < 1e-3
    # and it starts where the directory's training ended, far below a random model's first loss
    first, random_first = metric(root, "train/loss")[0], metric(trained, "train/loss")[0]
    assert first < random_first - 1.0, (first, random_first)


def test_hub_id_resolves_from_the_local_hf_cache(trained, corpus, tmp_path, monkeypatch):
    """The code path of `--model.model_name_or_path bert-base-uncased`, offline: a hub id found in the cache."""
    import shutil

    repo = tmp_path / "hub" / "models--local-org--tiny-bert"
    shutil.copytree(trained / "export", repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    root = tmp_path / "from-hub"
    code = run_cli("fit", "--data.train_files", corpus, "--model.model_name_or_path", "local-org/tiny-bert",
                   "--data.max_length", "32", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root),
                   "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false")
    assert code == 0


def test_predict_subcommand_writes_jsonl_in_order(trained, corpus, tmp_path):
    inputs = tmp_path / "in.txt"
    inputs.write_text("the cat [MASK] the river .\n\n[MASK] dog sees a tree .\na bird [MASK] the ball .\n")
    out = tmp_path / "pred.jsonl"
    last = str(trained / "checkpoints" / "last.ckpt")
    code = run_cli("predict", *fit_args(corpus, trained)[1:], "--ckpt_path", last,
                   "--data.predict_files", str(inputs), "--prediction_writer.output", str(out), "--model.top_k", "2")
    assert code == 0
    import json

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[1]["text"] == "[MASK] dog sees a tree ."
    assert all(len(r["predictions"][0]) == 2 and {"score", "token", "token_str", "sequence"} <= set(
        r["predictions"][0][0]) for r in rows)
    # the checkpoint's model answered: the same candidates as fill-mask on that checkpoint
    from mlm_lightning.model.checkpoint import load_checkpoint
    from mlm_lightning.model.fill_mask import FillMasker

    expected = FillMasker(*load_checkpoint(last), top_k=2)([r["text"] for r in rows])
    for row, want in zip(rows, expected, strict=True):
        got, ref = row["predictions"][0], want["predictions"][0]
        assert [c["token"] for c in got] == [c["token"] for c in ref]
        assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(got, ref, strict=True))


def test_fill_mask_reads_stdin(trained, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("the cat [MASK] the river .\n\na [MASK] sees the ball .\n"))
    assert run_cli("fill-mask", "--model", str(trained / "export")) == 0
    out = capsys.readouterr().out
    assert out.count("mask 1:") == 2


@pytest.mark.slow
def test_bf16_autocast_and_compile(corpus, tmp_path):
    """The GPU-path options on CPU: bf16-mixed autocast and torch.compile; the export stays a plain model."""
    from transformers import pipeline

    root = tmp_path / "bf16"
    code = run_cli(*fit_args(corpus, root, "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
                             "--trainer.precision", "bf16-mixed", "--model.compile", "true"))
    assert code == 0
    assert column(metrics(root), "val/ppl")
    assert pipeline("fill-mask", model=str(root / "export"), top_k=2)("the cat [MASK] the river .")


@pytest.mark.slow
def test_predict_on_two_processes_keeps_input_order(trained, corpus, tmp_path):
    import json
    import subprocess
    import sys

    inputs = tmp_path / "in.txt"
    inputs.write_text("".join(f"the cat [MASK] the river {i} .\n" for i in range(21)))
    out = tmp_path / "pred.jsonl"
    cmd = [sys.executable, "-m", "mlm_lightning.cli", "predict", *fit_args(corpus, trained)[1:], "--trainer.devices",
           "2", "--trainer.strategy", "ddp", "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"),
           "--data.predict_files", str(inputs), "--prediction_writer.output", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(21))
    assert [r["text"] for r in rows] == inputs.read_text().splitlines()
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "pred.jsonl"]  # the per-process parts are merged away


@pytest.mark.parametrize("stop", [["--trainer.max_epochs", "1"], ["--trainer.max_time", "00:00:00:03"]])
def test_a_fit_ended_by_epochs_or_time_leaves_last_ckpt(corpus, tmp_path, stop):
    root = tmp_path / "run"
    # no validation: no other save could leave a last.ckpt of the final step by chance; only the final save does
    code = run_cli(*fit_args(corpus, root, "--trainer.max_steps", "-1" if "max_time" not in stop[0] else "100000",
                             "--trainer.limit_val_batches", "0", *stop))
    assert code == 0
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == max(column(metrics(root), "step")) + 1  # the final step, not an earlier one


def test_continuing_from_an_export_keeps_the_length_it_was_trained_at(trained, corpus, capsys):
    """An export of a model trained from scratch on 32-token examples: its tokenizer says 32, and 32 is the default
    length (not its 64 position embeddings, whose last 32 never trained)."""
    assert run_cli("fit", "--data.train_files", corpus, "--model.model_name_or_path", str(trained / "export"),
                   "--print_config") == 0
    captured = capsys.readouterr()
    assert "max_length: 32" in captured.out and "--data.max_length 32" in captured.err


def test_a_tokenizer_kind_given_is_kept(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    assert run_cli(*fit_args(corpus, tmp_path / "r", "--trainer.max_steps", "1", "--model.architecture", "roberta",
                             "--data.tokenizer_kind", "bert", "--data.cache_dir", str(cache))) == 0
    assert [p.name.split("-")[0] for p in (cache / "tokenizers").iterdir()] == ["wordpiece"]


def test_predict_replaces_only_its_own_output(trained, corpus, tmp_path, capsys):
    inputs = tmp_path / "in.txt"
    inputs.write_text("the cat [MASK] the river .\n")
    base = ["predict", *fit_args(corpus, trained)[1:], "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"),
            "--data.predict_files", str(inputs), "--prediction_writer.output"]
    mine = tmp_path / "mine.jsonl"
    mine.write_text("my notes\n")
    assert run_cli(*base, str(mine)) == 2
    assert "is not a file that predict wrote" in error_line(capsys.readouterr().err)
    assert mine.read_text() == "my notes\n"
    ours = tmp_path / "ours.jsonl"
    assert run_cli(*base, str(ours)) == 0 and run_cli(*base, str(ours)) == 0  # its own output: replaced
    assert len(ours.read_text().splitlines()) == 1
