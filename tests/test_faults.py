"""Every fault ends in one line: damaged checkpoints, OS errors in every command, full disks that keep the
previous checkpoint and export whole, incomplete model dirs, options a resumed checkpoint replaces, and standard
streams that are closed or whose reader went away.

The matrices are parametrized over the commands: a new command gets a row in `CKPT_COMMANDS`, `WRITERS` or
`READERS` and inherits the guarantees. Faults are real where the machine allows: tmpfs mounts for a full disk and
a read-only file system (skipped where this process may not mount), file permissions applied to root by dropping
CAP_DAC_OVERRIDE for the command, a regular file where a directory is needed, and a lowered open-file limit.
"""

import errno
import os
import resource
import shutil
from contextlib import contextmanager

import pytest
import torch

from mlm_lightning.cli.main import _describe
from tests.support import ROOT
from tests.support.cli import TINY_DATA, error_lines, fit_args, run_cli
from tests.support.faults import damage, mount_tmpfs, permissions_apply, unmount
from tests.support.models import family_tokenizer

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def masked(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("masked") / "masked.txt"
    path.write_text("the cat [MASK] the ball .\na [MASK] sees the dog .\n")
    return str(path)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache for the command: still empty after it means nothing was tokenized or trained."""
    cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("MLM_LIGHTNING_CACHE", str(cache))
    return cache


def untouched(cache) -> bool:
    """Nothing tokenized or trained in `cache`: it holds at most the CLI's option cache (`cli/`, written by any
    command's parse, data of no run)."""
    return not cache.exists() or all(p.name == "cli" for p in cache.iterdir())


def one_line(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    return lines[0]


# -- 1. damaged checkpoints: one line naming the file, the problem and the way on, before tokenizing ------------
CKPT_COMMANDS = {
    "fit": lambda k, c, m, o: [*fit_args(c, o / "run", "--trainer.max_steps", "6"), "--ckpt_path", k],
    "validate": lambda k, c, m, o: ["validate", "--ckpt_path", k, "--data.train_files", c, *TINY_DATA, *QUIET,
                                    "--trainer.default_root_dir", str(o / "v")],
    "test": lambda k, c, m, o: ["test", "--ckpt_path", k, "--data.train_files", c, *TINY_DATA, *QUIET,
                                "--trainer.default_root_dir", str(o / "t")],
    "predict": lambda k, c, m, o: ["predict", "--ckpt_path", k, "--data.predict_files", m, *QUIET,
                                   "--trainer.default_root_dir", str(o / "p")],
    "export": lambda k, c, m, o: ["export", "--ckpt_path", k, "--export_dir", str(o / "e")],
    "fill-mask": lambda k, c, m, o: ["fill-mask", "--model", k, "a [MASK] sees the dog ."],
    "score": lambda k, c, m, o: ["score", "--model", k, "a cat sees the dog ."],
    "serve": lambda k, c, m, o: ["serve", "--model", k, "--port", "0"],
}
DAMAGES = {"truncated": "is cut short", "empty": "is empty", "random": "is not a checkpoint",
           "corrupted": "is damaged", "foreign": "another tool's checkpoint"}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("command", CKPT_COMMANDS)
def test_a_damaged_checkpoint_is_one_line_before_any_work(run, corpus, masked, tmp_path, capsys, fresh_cache,
                                                          command, how):
    beside = tmp_path / "ckpts"
    beside.mkdir()
    good = beside / "good.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", good)
    broken = beside / "broken.ckpt"
    damage(good, broken, how)
    code = run_cli(*CKPT_COMMANDS[command](str(broken), corpus, masked, tmp_path))
    way = f"the newest intact checkpoint beside it is {str(good)!r}"
    line = one_line(capsys, code, repr(str(broken)), DAMAGES[how], way)
    assert line.endswith(str(good))  # the way on: that checkpoint, with the command's own option
    assert untouched(fresh_cache)  # nothing tokenized or trained
    assert not (tmp_path / "e").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_last_ckpt_points_to_the_newest_intact_one(run, corpus, tmp_path, capsys, fresh_cache, how):
    root = tmp_path / "run"
    shutil.copytree(run / "checkpoints", root / "checkpoints")
    last = root / "checkpoints" / "last.ckpt"
    damage(run / "checkpoints" / "last.ckpt", last, how)
    best = next(p for p in (root / "checkpoints").iterdir() if p.name.startswith("best-"))
    code = run_cli(*fit_args(corpus, root, "--trainer.max_steps", "6", "--ckpt_path", "last"))
    one_line(capsys, code, repr(str(last)), DAMAGES[how], f"--ckpt_path {best}")
    assert untouched(fresh_cache)


def test_a_weights_only_checkpoint_cannot_resume_a_fit(run, corpus, tmp_path, capsys):
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    for key in ("optimizer_states", "lr_schedulers", "callbacks"):
        ckpt.pop(key, None)
    torch.save(ckpt, tmp_path / "weights.ckpt")
    code = run_cli(*fit_args(corpus, tmp_path / "r", "--ckpt_path", str(tmp_path / "weights.ckpt")))
    one_line(capsys, code, "holds weights only", "export it")
    assert run_cli("export", "--ckpt_path", str(tmp_path / "weights.ckpt"), "--export_dir", str(tmp_path / "e")) == 0


# -- 2. OS errors: one line in every command, whatever the phase ------------------------------------------------
@contextmanager
def fault(kind: str, base, prepare=None):
    """A directory `base/target` with the fault `kind`, for the command run inside; `prepare(target)` first fills
    it (while it is still writable)."""
    target = base / "target"
    if kind in ("read-only", "disk-full"):
        if not mount_tmpfs(target, "size=4k" if kind == "disk-full" else "size=8m"):
            pytest.skip("this process may not mount a tmpfs (needs root or CAP_SYS_ADMIN)")
        try:
            if prepare:
                prepare(target)
            if kind == "read-only":
                assert mount_tmpfs(target, "remount,ro")
            else:
                (target / "filler").write_bytes(b"x" * 4096)  # the one page there is: now nothing fits
            yield target
        finally:
            unmount(target)
        return
    if kind == "path-is-a-file":
        target.write_text("a file, not a directory\n")
        yield target
        return
    target.mkdir()
    if prepare:
        prepare(target)
    if kind == "permission-denied":
        denied = target / "model" if (target / "model").exists() else target
        denied.chmod(0o000 if denied != target else 0o555)
        apply = permissions_apply()
        if not apply.possible:
            pytest.skip("cannot make file permissions apply to this process")
        try:
            with apply:
                yield target
        finally:
            denied.chmod(0o755)
        return
    assert kind == "too-many-open-files"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # a new descriptor takes the lowest free number, at least 3 (stdin, stdout, stderr stay open): every open
    # fails, even after others were closed
    resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))
    try:
        yield target
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


FAULTS = {"read-only": "read-only file system", "disk-full": "no space left on the device",
          "permission-denied": "permission denied", "path-is-a-file": "a file", "too-many-open-files": "open files"}
# what each command writes under the faulty directory D (o: a sound directory for the rest)
WRITERS = {
    "fit": lambda D, r, c, m, o: fit_args(c, D / "run", "--trainer.max_steps", "2"),
    "fit-cache": lambda D, r, c, m, o: [*fit_args(c, o / "run", "--trainer.max_steps", "2"), "--data.cache_dir",
                                        str(D / "cache")],  # (the tokenizer is trained and saved there first)
    "fit-checkpoint": lambda D, r, c, m, o: [*fit_args(c, o / "run", "--trainer.max_steps", "2"),
                                             "--checkpoint.dirpath", str(D / "checkpoints")],
    "fit-export": lambda D, r, c, m, o: [*fit_args(c, o / "run", "--trainer.max_steps", "2"), "--export_dir",
                                         str(D / "export")],  # (written when the training is done)
    "validate": lambda D, r, c, m, o: ["validate", "--ckpt_path", str(r / "checkpoints" / "last.ckpt"),
                                       "--data.train_files", c, *TINY_DATA, *QUIET, "--trainer.default_root_dir",
                                       str(D / "run")],
    "test": lambda D, r, c, m, o: ["test", "--ckpt_path", str(r / "checkpoints" / "last.ckpt"), "--data.train_files",
                                   c, *TINY_DATA, *QUIET, "--trainer.default_root_dir", str(D / "run")],
    "predict": lambda D, r, c, m, o: ["predict", "--ckpt_path", str(r / "checkpoints" / "last.ckpt"),
                                      "--data.predict_files", m, "--data.tokenizer", str(r / "export"), *QUIET,
                                      "--prediction_writer.output", str(D / "p.jsonl"),
                                      "--trainer.default_root_dir", str(o / "p")],
    "export": lambda D, r, c, m, o: ["export", "--ckpt_path", str(r / "checkpoints" / "last.ckpt"), "--export_dir",
                                     str(D / "export")],
    "plot": lambda D, r, c, m, o: ["plot", str(r), "--out", str(D / "plot.png")],
}
# commands that only read a model from D/model
READERS = {
    "fill-mask": lambda D: ["fill-mask", "--model", str(D / "model"), "a [MASK] sees the dog ."],
    "score": lambda D: ["score", "--model", str(D / "model"), "a cat sees the dog ."],
    "serve": lambda D: ["serve", "--model", str(D / "model"), "--port", "0"],
}


@pytest.mark.parametrize("kind", FAULTS)
@pytest.mark.parametrize("command", WRITERS)
def test_an_os_error_while_writing_is_one_line(run, corpus, masked, tmp_path, capsys, command, kind):
    with fault(kind, tmp_path) as target:
        code = run_cli(*WRITERS[command](target, run, corpus, masked, tmp_path))
        empty = [p for p in target.rglob("*") if p.is_file() and not p.stat().st_size] if kind == "disk-full" else []
    line = one_line(capsys, code, FAULTS[kind])
    assert not empty, empty  # nothing left half-written (e.g. a 0-byte config.yaml)
    if kind != "too-many-open-files":  # (that one strikes wherever the next file is opened)
        assert str(target) in line


@pytest.mark.parametrize("kind", ["permission-denied", "path-is-a-file", "too-many-open-files"])
@pytest.mark.parametrize("command", READERS)
def test_an_os_error_while_reading_a_model_is_one_line(run, tmp_path, capsys, command, kind):
    def prepare(target):
        shutil.copytree(run / "export", target / "model")

    with fault(kind, tmp_path, prepare) as target:
        code = run_cli(*READERS[command](target))
    words = {"path-is-a-file": "does not exist", "too-many-open-files": "too many open files"}
    line = one_line(capsys, code, words.get(kind, FAULTS[kind]))
    if kind != "too-many-open-files":
        assert str(target) in line


def test_a_model_on_a_read_only_file_system_is_used(run, tmp_path, capsys):
    with fault("read-only", tmp_path, lambda t: shutil.copytree(run / "export", t / "model")) as target:
        assert run_cli("fill-mask", "--model", str(target / "model"), "a [MASK] sees the dog .") == 0
    assert "mask 1:" in capsys.readouterr().out


def test_os_errors_without_a_file_name_are_one_line_too(tmp_path):
    for raised, words in [
        (OSError(errno.ENOSPC, "No space left on device", "/data/x"), ["'/data/x'", "no space left"]),
        (PermissionError(errno.EACCES, "Permission denied", "/data"), ["'/data'", "permission denied"]),
        (OSError(errno.EMFILE, "Too many open files"), ["too many open files", "ulimit -n"]),
        # safetensors and tokenizers (Rust) say it as text only
        (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), ["no space left"]),
    ]:
        code, line = _describe(raised, "fit")
        assert code == 2 and "\n" not in line and all(w in line.lower() for w in words), line

    def write(path):
        with open(path, "w"):
            raise OSError(errno.ENOSPC, "No space left on device")  # (as write() and close() do: no file name)

    with pytest.raises(OSError) as caught:
        write(tmp_path / "plot.png")
    code, line = _describe(caught.value, "plot")
    assert code == 2 and repr(str(tmp_path / "plot.png")) in line and "(--out)" in line


# -- 3. a save that does not fit leaves the previous file whole and no temporary file ------------------------------
def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one(run, corpus, tmp_path, capsys):
    size = (run / "checkpoints" / "last.ckpt").stat().st_size
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, f"size={size * 3 // 2 // 1024}k"):  # room for one checkpoint, not for a second
        pytest.skip("this process may not mount a tmpfs (needs root or CAP_SYS_ADMIN)")
    try:
        args = fit_args(corpus, tmp_path / "r", "--checkpoint.dirpath", str(disk), "--checkpoint.save_top_k", "0")
        assert run_cli(*args, "--trainer.max_steps", "2") == 0
        before = (disk / "last.ckpt").read_bytes()
        code = run_cli(*args, "--trainer.max_steps", "4", "--ckpt_path", "last")
        one_line(capsys, code, repr(str(disk / "last.ckpt")), "no space left on the device",
                 f"the last checkpoint is kept: {disk / 'last.ckpt'}")
        assert (disk / "last.ckpt").read_bytes() == before
        assert os.listdir(disk) == ["last.ckpt"]  # no temporary file left
    finally:
        unmount(disk)


def test_an_export_that_does_not_fit_keeps_the_previous_one(run, tmp_path, capsys):
    size = sum(p.stat().st_size for p in (run / "export").iterdir())
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, f"size={size * 3 // 2 // 1024 + 8}k"):
        pytest.skip("this process may not mount a tmpfs (needs root or CAP_SYS_ADMIN)")
    try:
        out = disk / "export"
        ckpt = str(run / "checkpoints" / "last.ckpt")
        assert run_cli("export", "--ckpt_path", ckpt, "--export_dir", str(out)) == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        code = run_cli("export", "--ckpt_path", ckpt, "--export_dir", str(out))
        one_line(capsys, code, repr(str(out)), "no space left on the device")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert os.listdir(disk) == ["export"]  # no temporary directory left
    finally:
        unmount(disk)


# -- 4. incomplete model dirs: refused by every command that takes a model, naming what is missing ---------------
INCOMPLETE = {
    "no tokenizer": (lambda n: not n.startswith(("tokenizer", "special_tokens", "vocab")), "its tokenizer files"),
    "no weights": (lambda n: n != "model.safetensors", "its weights"),
    "config only": (lambda n: n == "config.json", "its weights (model.safetensors or pytorch_model.bin) and its"
                                                  " tokenizer files"),
}
MODEL_COMMANDS = {
    "fit": lambda M, c, m, o: fit_args(c, o / "run", "--model.model_name_or_path", M, "--trainer.max_steps", "2"),
    "validate": lambda M, c, m, o: ["validate", "--model.model_name_or_path", M, "--data.train_files", c, *QUIET,
                                    "--trainer.default_root_dir", str(o / "v")],
    "predict": lambda M, c, m, o: ["predict", "--model.model_name_or_path", M, "--data.predict_files", m, *QUIET,
                                   "--trainer.default_root_dir", str(o / "p")],
    "fill-mask": lambda M, c, m, o: ["fill-mask", "--model", M, "a [MASK] sees the dog ."],
    "score": lambda M, c, m, o: ["score", "--model", M, "a cat sees the dog ."],
    "serve": lambda M, c, m, o: ["serve", "--model", M, "--port", "0"],
}


@pytest.mark.parametrize("what", INCOMPLETE)
@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_an_incomplete_model_dir_is_refused(run, corpus, masked, tmp_path, capsys, fresh_cache, command, what):
    keep, missing = INCOMPLETE[what]
    model = tmp_path / "model"
    shutil.copytree(run / "export", model, ignore=lambda d, names: [n for n in names if not keep(n)])
    code = run_cli(*MODEL_COMMANDS[command](str(model), corpus, masked, tmp_path))
    one_line(capsys, code, f"{str(model)!r} is incomplete", missing)
    assert untouched(fresh_cache)


@pytest.fixture(scope="module")
def misfit(tmp_path_factory) -> str:
    """A RoBERTa dir whose 64-row embeddings cannot hold the ids of the (bigger) tokenizer beside its weights."""
    import transformers

    tmp = tmp_path_factory.mktemp("misfit")
    tok = family_tokenizer(tmp, "roberta")
    config = transformers.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=70, pad_token_id=1)
    out = tmp / "model"
    transformers.RobertaForMaskedLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    assert len(tok) > 64
    return str(out)


MISFIT = ("the tokenizer has", "but the model's embeddings hold", "do not belong together")


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_a_model_dir_whose_tokenizer_outgrows_its_embeddings_is_refused(misfit, corpus, masked, tmp_path, capsys,
                                                                        fresh_cache, command):
    code = run_cli(*MODEL_COMMANDS[command](misfit, corpus, masked, tmp_path))
    one_line(capsys, code, repr(misfit), *MISFIT)
    assert untouched(fresh_cache)  # refused before tokenizing
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def misfit_ckpt(run, tmp_path_factory) -> str:
    """The run's checkpoint carrying a bigger tokenizer than its embeddings hold (an edited or mixed-up file)."""
    tmp = tmp_path_factory.mktemp("misfit-ckpt")
    tok = family_tokenizer(tmp, "roberta")  # (its 256 bytes alone outnumber the tiny BERT's rows)
    tok.save_pretrained(tmp / "tok")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(tok) > ckpt["state_dict"]["model.bert.embeddings.word_embeddings.weight"].shape[0]
    files = ckpt["mlm_lightning"]["tokenizer_files"]
    for name in files:
        files[name] = (tmp / "tok" / name).read_text()
    torch.save(ckpt, tmp / "misfit.ckpt")
    return str(tmp / "misfit.ckpt")


@pytest.mark.parametrize("command", ["export", "fill-mask", "serve"])
def test_a_checkpoint_whose_tokenizer_outgrows_its_embeddings_is_refused(misfit_ckpt, corpus, masked, tmp_path,
                                                                         capsys, command):
    code = run_cli(*CKPT_COMMANDS[command](misfit_ckpt, corpus, masked, tmp_path))
    one_line(capsys, code, repr(misfit_ckpt), *MISFIT)
    assert not (tmp_path / "e").exists()


def test_the_python_loaders_make_the_same_load_check(misfit, misfit_ckpt, run):
    import transformers

    from mlm_lightning.errors import MLMError
    from mlm_lightning.model.arch import check_fits
    from mlm_lightning.model.checkpoint import load_checkpoint, load_model
    from mlm_lightning.model.fill_mask import FillMasker

    for load, path in [(load_model, misfit), (load_model, misfit_ckpt), (load_checkpoint, misfit_ckpt)]:
        with pytest.raises(MLMError, match="do not belong together"):
            load(path)
    model = transformers.RobertaForMaskedLM.from_pretrained(misfit)
    tokenizer = transformers.AutoTokenizer.from_pretrained(misfit)
    with pytest.raises(MLMError, match="but the model's embeddings hold 64"):
        FillMasker(model, tokenizer)

    class MaskBeyond:  # as small as the embeddings, but its mask token's id is beyond them
        mask_token_id, pad_token_id, cls_token_id, sep_token_id, unk_token_id = 70, 0, 1, 2, 3
        all_special_tokens, all_special_ids = ["[PAD]", "<mask>"], [0, 70]

        def __len__(self):
            return 60

    with pytest.raises(MLMError, match="mask token has id 70, beyond the model's 64 embeddings"):
        check_fits(transformers.BertConfig(vocab_size=64), MaskBeyond(), "x")


def test_a_tokenizer_dir_without_tokenizer_files_is_refused(run, corpus, tmp_path, capsys):
    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copy(run / "export" / "config.json", tok)
    code = run_cli(*fit_args(corpus, tmp_path / "r", "--data.tokenizer", str(tok), "--trainer.max_steps", "2"))
    one_line(capsys, code, f"tokenizer {str(tok)!r} is incomplete", "its tokenizer files")


# -- 5. options a resumed checkpoint replaces ----------------------------------------------------------------------
def test_resume_with_another_model_size_is_refused(run, corpus, tmp_path, capsys):
    last = str(run / "checkpoints" / "last.ckpt")
    code = run_cli(*fit_args(corpus, tmp_path / "r", "--ckpt_path", last, "--model.hidden_size", "64"))
    one_line(capsys, code, "--model.hidden_size 64 cannot change on resume", "was trained with 32")
    assert not (tmp_path / "r").exists()


def test_resume_names_the_learning_rate_it_replaces_and_takes_how_to_run_options(run, corpus, tmp_path, capsys):
    root = tmp_path / "r"
    shutil.copytree(run / "checkpoints", root / "checkpoints")
    code = run_cli(*fit_args(corpus, root, "--ckpt_path", "last", "--trainer.max_steps", "6",
                             "--model.learning_rate", "0.005", "--model.skip_nonfinite", "true"))
    err = capsys.readouterr().err
    assert code == 0, err
    named = [line for line in err.splitlines() if "resuming" in line and "checkpoint's own" in line]
    assert len(named) == 1 and "--model.learning_rate 0.001 (you gave 0.005)" in named[0], err
    assert "skip_nonfinite" not in named[0]
    hparams = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["learning_rate"] == 0.001 and hparams["skip_nonfinite"] is True  # the user's, used


# -- 6. standard streams: closed, empty or gone away, every command ends in its result or one line -----------------
@contextmanager
def stream_fault(kind: str, masked: str):
    """The process's standard streams as the shell leaves them for `0<&-`, `</dev/null`, `1>&-` and `| head -1`
    (in this process: Python sets sys.stdin/sys.stdout to None for a closed descriptor, and ignores SIGPIPE); with
    stdout's faults, stdin holds the sentences of `masked`."""
    import sys

    fd = 1 if kind in ("stdout-closed", "broken-pipe") else 0
    saved_fd, saved = os.dup(fd), (sys.stdin, sys.stdout)
    pipe = None
    try:
        if kind == "stdin-closed":
            os.close(0)
            sys.stdin = None
        elif kind == "stdin-devnull":
            sys.stdin = open(os.devnull)  # noqa: SIM115
        elif kind == "stdout-closed":
            sys.stdin = open(masked)  # noqa: SIM115
            os.close(1)
            sys.stdout = None
        else:
            sys.stdin = open(masked)  # noqa: SIM115
            read, write = os.pipe()
            os.close(read)  # the reader is gone: `| head -1` once it has its line
            pipe = sys.stdout = open(write, "w", buffering=1)  # noqa: SIM115
        yield
    finally:
        if sys.stdin is not None and sys.stdin is not saved[0]:
            sys.stdin.close()
        sys.stdin, sys.stdout = saved
        os.dup2(saved_fd, fd)
        os.close(saved_fd)
        if pipe is not None:
            pipe.close()


STREAM_FAULTS = ["stdin-closed", "stdin-devnull", "stdout-closed", "broken-pipe"]
# each command's arguments (r: a finished run, o: a directory for its outputs) and the file it leaves as its result
STREAM_COMMANDS = {
    "fit": (lambda r, c, m, o: fit_args(c, o / "run", "--trainer.max_steps", "2"), "run/export/model.safetensors"),
    "validate": (lambda r, c, m, o: CKPT_COMMANDS["validate"](str(r / "checkpoints" / "last.ckpt"), c, m, o), None),
    "test": (lambda r, c, m, o: CKPT_COMMANDS["test"](str(r / "checkpoints" / "last.ckpt"), c, m, o), None),
    "predict": (lambda r, c, m, o: [*WRITERS["predict"](o, r, c, m, o)], "p.jsonl"),
    "export": (lambda r, c, m, o: WRITERS["export"](o, r, c, m, o), "export/model.safetensors"),
    "plot": (lambda r, c, m, o: WRITERS["plot"](o, r, c, m, o), "plot.png"),
    "fill-mask": (lambda r, c, m, o: ["fill-mask", "--model", str(r / "export"), "a [MASK] sees the dog ."], None),
    "fill-mask-stdin": (lambda r, c, m, o: ["fill-mask", "--model", str(r / "export")], None),
}
# where a command cannot give its result: the one line it ends in instead
STREAM_REFUSALS = {
    ("fill-mask-stdin", "stdin-closed"): "no input sentences",
    ("fill-mask-stdin", "stdin-devnull"): "no input sentences",
    ("fill-mask-stdin", "stdout-closed"): "standard output is closed",
    ("fill-mask", "stdout-closed"): "standard output is closed",
}


@pytest.mark.parametrize("kind", STREAM_FAULTS)
@pytest.mark.parametrize("command", STREAM_COMMANDS)
def test_standard_streams_never_cause_a_traceback(run, corpus, masked, tmp_path, capsys, command, kind):
    args, result = STREAM_COMMANDS[command]
    argv = args(run, corpus, masked, tmp_path)
    with stream_fault(kind, masked):
        code = run_cli(*argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    refusal = STREAM_REFUSALS.get((command, kind))
    if refusal:
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and refusal in lines[0], err[-3000:]
    else:
        assert code == 0 and not error_lines(err), err[-3000:]
        assert result is None or (tmp_path / result).stat().st_size > 0


@pytest.mark.slow
def test_fill_mask_with_stdin_closed_or_a_reader_gone_in_a_real_shell(run, tmp_path):
    """The shell's own `0<&-` and `| head -1` (a process, not this one's streams): one line, or the first result."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    many = tmp_path / "many.txt"
    many.write_text("a [MASK] sees the dog .\n" * 3000)
    fill = f"{sys.executable} -m mlm_lightning.cli fill-mask --model {run / 'export'}"
    closed = subprocess.run(["bash", "-c", f"{fill} 0<&-"], env=env, capture_output=True, text=True)
    assert closed.returncode == 2 and "Traceback" not in closed.stderr, closed.stderr
    assert error_lines(closed.stderr) == ["mlm-lightning: error: no input sentences; pass sentences, --file FILE,"
                                          " or lines on stdin"]
    piped = subprocess.run(["bash", "-c", f"set -o pipefail; {fill} --file {many} | head -1"], env=env,
                           capture_output=True, text=True)
    assert piped.returncode == 0 and piped.stdout.count("\n") == 1, piped.stderr
    assert "Traceback" not in piped.stderr and not error_lines(piped.stderr), piped.stderr


# -- 7. runs that do nothing say so and why; odd inputs get a line that names them ----------------------------------
def test_max_steps_0_is_refused_before_anything_is_written(corpus, tmp_path, capsys, fresh_cache):
    code = run_cli(*fit_args(corpus, tmp_path / "r", "--trainer.max_steps", "0"))
    one_line(capsys, code, "--trainer.max_steps 0 trains nothing", "give a positive number")
    assert not (tmp_path / "r").exists() and untouched(fresh_cache)


@pytest.mark.parametrize("budget", [("--trainer.max_steps", "4"), ("--trainer.max_epochs", "1")])
def test_a_finished_run_resumed_says_there_is_nothing_to_train(run, corpus, tmp_path, capsys, budget):
    root = tmp_path / "r"
    if budget[0] == "--trainer.max_steps":
        shutil.copytree(run, root)
    else:
        assert run_cli(*fit_args(corpus, root, *budget)) == 0
    capsys.readouterr()
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    code = run_cli(*fit_args(corpus, root, *budget, "--ckpt_path", "last"))
    err = capsys.readouterr().err
    assert code == 0 and not error_lines(err), err
    said = [line for line in err.splitlines() if "nothing to train" in line]
    assert len(said) == 1 and f"already reached {' '.join(budget)}" in said[0], err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # no empty version_N, no new export


def test_a_vocab_size_below_what_the_corpus_needs_says_the_size_used(corpus, tmp_path, capsys, fresh_cache):
    args = [a for a in fit_args(corpus, tmp_path / "r", "--trainer.max_steps", "1") if a != "300"]
    args[args.index("--data.vocab_size") + 1:args.index("--data.vocab_size") + 1] = ["5"]
    assert run_cli(*args) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "--data.vocab_size 5 is below what this corpus needs" in line]
    assert len(said) == 1 and "the model uses them all" in said[0], err


@pytest.mark.parametrize("how", ["truncated", "corrupt", "empty"])
def test_plot_of_a_damaged_metrics_csv_warns_naming_the_file_and_line(run, tmp_path, capsys, how):
    root = tmp_path / "r"
    shutil.copytree(run / "lightning_logs", root / "lightning_logs")
    csv_path = root / "lightning_logs" / "version_0" / "metrics.csv"
    lines = csv_path.read_text().splitlines(keepends=True)
    damaged = {"truncated": "".join(lines)[:-40],  # (the last row cut in the middle of its fields)
               "corrupt": "".join(lines[:2] + ["\x00\x01,zz,\n"] + lines[3:]), "empty": ""}[how]
    csv_path.write_text(damaged)
    assert run_cli("plot", str(root)) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if str(csv_path) in line and "line" in line]
    where = {"truncated": f"line {len(lines)} ", "corrupt": "line 3 ", "empty": "line 1 is empty"}[how]
    assert len(warned) == 1 and where in warned[0], err
    assert (root / "plot.png").stat().st_size > 0


@pytest.mark.parametrize("how", ["tab-indented", "a list"])
def test_a_bad_config_file_is_named_with_the_shape_expected(tmp_path, capsys, how):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n\tbatch_size: 4\n" if how == "tab-indented" else "[1, 2]\n")
    code = run_cli("fit", "--config", str(config))
    line = one_line(capsys, code, repr(str(config)), "a config is a mapping of options")
    assert ("line 2, column 1" in line and "never tabs" in line) if how == "tab-indented" else "holds a list" in line


def test_a_huge_top_k_is_a_sane_line_and_a_big_one_gives_every_token(run, capsys):
    code = run_cli("fill-mask", "--model", str(run / "export"), "--top_k", "9" * 5000, "a [MASK] sees the dog .")
    line = one_line(capsys, code, "--top_k: a number of 5000 digits is far too large")
    assert "set_int_max_str_digits" not in line
    assert run_cli("fill-mask", "--model", str(run / "export"), "--top_k", "9" * 20, "--json",
                   "a [MASK] sees the dog .") == 0
    import json

    from transformers import AutoTokenizer

    answer = json.loads(capsys.readouterr().out)["predictions"][0]
    assert len(answer) == len(AutoTokenizer.from_pretrained(run / "export"))  # as the pipeline: at most every token


@pytest.mark.parametrize("what", ["pdf", "random"])
def test_a_binary_corpus_is_called_binary(tmp_path, capsys, what):
    import random

    data = random.Random(0).randbytes(4000).replace(b"\x00", b"\x01")  # (no NUL: it would say so first)
    path = tmp_path / "book.txt"
    path.write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + data if what == "pdf" else data)
    code = run_cli(*fit_args(str(path), tmp_path / "r", "--trainer.max_steps", "1"))
    line = one_line(capsys, code, repr(str(path))[1:-1], "not text", "extract its text first")
    assert ("a PDF, a binary file" if what == "pdf" else "binary data") in line and "iconv" not in line


def test_predict_says_its_truncation_notice_once(run, tmp_path, capsys):
    long = " ".join(["the cat sees the ball ."] * 30)
    inputs = tmp_path / "in.txt"
    inputs.write_text(f"{long} a [MASK] here .\na [MASK] sees the dog .\n{long} the [MASK] .\n")
    args = WRITERS["predict"](tmp_path, run, "", str(inputs), tmp_path)
    assert run_cli(*args, "--data.batch_size", "1") == 0
    err = capsys.readouterr().err
    notices = [line for line in err.splitlines() if "were truncated" in line]
    assert len(notices) == 1 and "2 input(s)" in notices[0] and "(input 1, 3)" in notices[0], err


@pytest.mark.slow
def test_serve_with_stdin_and_stdout_closed_answers_and_stops_cleanly(run):
    """The server in a real shell with `0<&- 1>&-`: it serves, answers, and a SIGTERM stops it without a traceback."""
    import re
    import signal
    import subprocess
    import sys

    from tests.support.server import post

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = f"exec {sys.executable} -m mlm_lightning.cli serve --model {run / 'export'} --port 0 0<&- 1>&-"
    proc = subprocess.Popen(["bash", "-c", command], env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "serving" in line:
                break
        url = re.search(r"http://[^ ]+", lines[-1]).group(0)
        status, answer = post(url, {"inputs": "a [MASK] sees the dog ."})
        assert status == 200 and answer, answer
        proc.send_signal(signal.SIGTERM)
        err = "".join(lines) + proc.stderr.read()
        assert proc.wait(30) == 143 and "Traceback" not in err, err
    finally:
        proc.kill()
