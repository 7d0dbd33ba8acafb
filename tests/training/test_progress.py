"""The progress bar (run ETA, tokens) and the model summary."""

import io
import logging
from types import SimpleNamespace

import torch


def test_progress_bar_shows_run_eta_and_tokens_not_v_num(monkeypatch):
    from mlm_lightning.training import progress
    from mlm_lightning.training.callbacks import ThroughputLogger
    from mlm_lightning.training.progress import MLMTQDMProgressBar, RunReport

    monkeypatch.setattr(progress.time, "perf_counter", lambda: 1000.0)  # a fixed clock: no load can move the ETA
    report, throughput = RunReport(), ThroughputLogger()
    report.start_time, report.start_step = 990.0, 0
    throughput.latest = {"perf/tokens_per_s": 12345.0}
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=9))
    trainer = SimpleNamespace(
        training=True, global_step=10, estimated_stepping_batches=100, callbacks=[report, throughput],
        loggers=[SimpleNamespace(version=0)], callback_metrics={"train/loss": torch.tensor(1.5)},
        progress_bar_metrics={}, fit_loop=loop, log_every_n_steps=10,
    )
    bar = MLMTQDMProgressBar()
    items = bar.get_metrics(trainer, None)
    assert "v_num" not in items
    assert items["tok/s"] == "12.3k" and items["step"] == "10/100" and items["train/loss"] == "1.500"
    assert items["eta"] == "1m 30s"  # 1 s per step, 90 steps left
    # between log steps the loss and tokens/s are not read again (a read of the loss waits for the GPU)
    loop.epoch_loop._batches_that_stepped, trainer.global_step = 10, 11
    trainer.callback_metrics["train/loss"] = torch.tensor(9.0)
    assert bar.get_metrics(trainer, None)["train/loss"] == "1.500"


def test_model_summary_has_no_flops_column():
    from mlm_lightning.training.progress import CompactModelSummary

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("lightning.pytorch.callbacks.model_summary")
    logger.addHandler(handler)
    try:
        data = [(" ", ["0"]), ("Name", ["model"]), ("Type", ["BertForMaskedLM"]), ("Params", ["1.2 M"]),
                ("Mode", ["train"]), ("FLOPs", ["0"])]
        CompactModelSummary.summarize(data, 1_200_000, 1_200_000, 4.8, {"train": 1, "eval": 0}, 0)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "BertForMaskedLM" in text and "1.2 M trainable params" in text and "FLOPs" not in text
