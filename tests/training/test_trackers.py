"""Experiment trackers as `--trainer.logger`: W&B (offline) and MLflow (a local file store) record the run; the CSV
log beside them keeps the end summary and `plot` working; a secret given to a tracker lands in neither config.yaml
nor a checkpoint."""

import glob
import json
import os

import pytest
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import DummyLogger

from mlm_lightning.training.plot import read_metrics, with_csv_log
from tests.support.cli import fit_args, run_cli

SECRET = "s3cr3t-" + "x" * 33  # 40 characters, as a W&B key
FIT = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2"]


def wandb_history(run_file: str) -> dict[str, list[float]]:
    """{metric: values} of an offline W&B run file. wandb ships no Python reader of it (its Go core reads it): the
    file is a 7-byte header, then LevelDB's log format (32 KiB blocks of records with a 7-byte header: checksum,
    length, type FULL/FIRST/MIDDLE/LAST) around protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", run_file
    pos, parts, history = 7, b"", {}
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6] if left >= 7 else 0
        if left < 7 or (length == 0 and kind == 0):  # the rest of a block is zero padding
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
    return history


def assert_no_secret(root) -> None:
    for path in glob.glob(f"{root}/**/*", recursive=True):  # config.yaml, hparams.yaml, checkpoints, the export
        if os.path.isfile(path) and not path.endswith(".png"):
            with open(path, "rb") as f:
                assert SECRET.encode() not in f.read(), path


def assert_csv_summary_and_plot(root, out: str) -> dict:
    csv = read_metrics(str(root))  # the CSV log beside the tracker: what plot and the summary read
    assert "val/ppl" in csv and "train/loss" in csv
    assert "plot: " + str(root / "plot.png") in out  # (the end of the fit drew it)
    assert "val/ppl: " in out and "fit done in" in out
    return csv


@pytest.mark.slow  # (wandb starts its service process: 20-50 s)
def test_wandb_offline_records_the_run_beside_the_csv_log_and_keeps_its_key_out(corpus, tmp_path, monkeypatch,
                                                                                  capsys):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    root = tmp_path / "run"
    # (a key passed as an option, as wandb.init(settings=wandb.Settings(api_key=...)) takes it)
    settings = json.dumps({"api_key": SECRET, "mode": "offline"})
    code = run_cli(*fit_args(corpus, root, *FIT, "--trainer.logger", "WandbLogger", "--trainer.logger.save_dir",
                             str(tmp_path / "wandb"), "--trainer.logger.project", "mlm", "--trainer.logger.settings",
                             settings))
    out = capsys.readouterr().err
    assert code == 0, out[-3000:]
    wandb.teardown()  # (what the end of the CLI's process does: the run finished, its file complete)
    runs = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    history = wandb_history(runs[0])
    csv = assert_csv_summary_and_plot(root, out)
    assert history["train/loss"] == pytest.approx([v for _, v in csv["train/loss"]], rel=1e-6)
    assert history["val/ppl"] == pytest.approx([v for _, v in csv["val/ppl"]], rel=1e-6)
    config = (root / "lightning_logs" / "version_0" / "config.yaml").read_text()
    assert "api_key: '***'" in config and "WandbLogger" in config
    assert_no_secret(root)


def test_mlflow_file_store_records_the_run_beside_the_csv_log(corpus, tmp_path, monkeypatch, capsys):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # (MLflow 3 refuses its file store without it)
    root, store = tmp_path / "run", tmp_path / "mlruns"
    uri = f"file:{store}"
    code = run_cli(*fit_args(corpus, root, *FIT, "--trainer.logger", "MLFlowLogger", "--trainer.logger.tracking_uri",
                             uri, "--trainer.logger.experiment_name", "mlm"))
    out = capsys.readouterr().err
    assert code == 0, out[-3000:]
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mlm").experiment_id])
    csv = assert_csv_summary_and_plot(root, out)
    for key in ("train/loss", "val/ppl"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [v for _, v in logged] == pytest.approx([v for _, v in csv[key]], rel=1e-6), key
    assert (root / "lightning_logs" / "version_0" / "config.yaml").exists()  # (not in the tracker's directory)


def test_the_csv_log_comes_first_beside_other_loggers_unless_there_is_one(tmp_path):
    assert isinstance(with_csv_log(None, str(tmp_path)), CSVLogger)
    tracker = DummyLogger()
    loggers = with_csv_log(tracker, str(tmp_path))
    assert isinstance(loggers[0], CSVLogger) and loggers[1] is tracker
    assert loggers[0].root_dir == str(tmp_path / "lightning_logs")
    own = [tracker, CSVLogger(str(tmp_path / "mine"))]
    assert with_csv_log(own, str(tmp_path)) is own
    assert with_csv_log(False, str(tmp_path)) is False and with_csv_log([], str(tmp_path)) == []


def test_secret_looking_tracker_options_and_url_passwords_are_masked():
    from jsonargparse import Namespace

    from mlm_lightning.cli.lightning import _redacted_options

    given = Namespace(class_path="x.Logger", init_args=Namespace(
        api_key=SECRET, tracking_uri=f"https://me:{SECRET}@mlflow.example/x", project="p", offline=True, token=None,
        settings={"api_key": SECRET, "x_tokens": 3}, tags=[{"auth_token": SECRET}]))
    masked = _redacted_options([given])[0]
    assert masked.init_args.api_key == "***" and masked.init_args.settings == {"api_key": "***", "x_tokens": 3}
    assert masked.init_args.tracking_uri == "https://me:***@mlflow.example/x"
    assert masked.init_args.tags == [{"auth_token": "***"}]
    assert (masked.init_args.project, masked.init_args.offline, masked.init_args.token) == ("p", True, None)
    assert given.init_args.api_key == SECRET  # (the run itself keeps the real ones)
