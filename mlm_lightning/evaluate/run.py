"""`mlm-lightning evaluate`: every (model, seed) run in turn, its progress on stderr, the report on stdout and in
a JSON file."""

from __future__ import annotations

import logging
import time
import warnings

from mlm_lightning.errors import check

log = logging.getLogger("mlm_lightning")

MODES = ("finetune", "probe")


def evaluate(
    *models: str,
    train_file: str,
    validation_file: str | None = None,
    test_file: str | None = None,
    split: str | None = None,
    split_seed: int = 0,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    mode: str = "finetune",
    seeds: int = 3,
    seed: int = 0,
    epochs: int = 3,
    batch_size: int = 16,
    lr: float = 5e-5,
    weight_decay: float = 0.01,
    warmup: float = 0.1,
    max_length: int | None = None,
    probe_l2: float = 1e-3,
    accelerator: str = "auto",
    precision: str = "auto",
    output_json: str | None = "evaluation.json",
    storage_options: dict | None = None,
) -> dict:
    """Compare models on your labelled data: fine-tune (or probe) each, report test accuracy and macro-F1.

    Args:
        models: Export dirs, .ckpt files, hub ids or Hugging Face dirs, and `random` (the first other model's
            architecture and tokenizer, untrained: the floor).
        train_file: A csv, jsonl or parquet file (a path or URL) with a text column and a label column.
        validation_file: Scored after each epoch (fine-tune) and reported beside the test figures.
        test_file: The rows the report scores. Without it, --split cuts --train_file.
        split: Shares train,validation,test (or train,test) of --train_file, class by class (default 0.8,0.1,0.1).
        split_seed: The seed of --split's shuffle.
        text_column: The column holding the text.
        text_pair_column: A second text column (sentence pairs), or none.
        label_column: The column holding each row's class.
        mode: finetune (each model as a sequence classifier) or probe (a linear classifier on frozen mean-pooled
            embeddings: quick on a CPU).
        seeds: Runs per model, with seeds seed, seed+1, ...; the report gives mean and standard deviation.
        seed: The first seed.
        epochs: Fine-tuning epochs.
        batch_size: Rows per batch.
        lr: Fine-tuning peak learning rate (AdamW).
        weight_decay: AdamW's weight decay (not on norms and biases).
        warmup: Share of the fine-tuning steps spent warming the learning rate up (then a linear decay to 0).
        max_length: Tokens per row at most (default: what the model takes).
        probe_l2: The probe's L2 penalty on its weights.
        accelerator: Lightning's accelerator (auto, cpu, gpu).
        precision: Lightning's precision; auto: bf16-mixed on a GPU that has it, else 32-true.
        output_json: The JSON report to write (replaced only if an earlier evaluate wrote it); null: none.
        storage_options: fsspec options for URLs (e.g. {"anon": true}).
    """
    from mlm_lightning.evaluate import report

    check(mode in MODES, f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    for name, value in (("seeds", seeds), ("epochs", epochs), ("batch_size", batch_size)):
        check(value >= 1, f"--{name} must be at least 1, got {value}")
    check(max_length is None or max_length >= 2, f"--max_length must be at least 2, got {max_length}")
    if output_json:
        report.check_output(output_json)
    from mlm_lightning.evaluate.data import load_task
    from mlm_lightning.evaluate.models import candidates

    task = load_task(train_file, validation_file, test_file, split, split_seed, text_column, text_pair_column,
                     label_column, storage_options)
    chosen = candidates(list(models))
    settings = dict(mode=mode, seeds=list(range(seed, seed + seeds)), epochs=epochs, batch_size=batch_size, lr=lr,
                    weight_decay=weight_decay, warmup=warmup, max_length=max_length, probe_l2=probe_l2)
    log.info("evaluate: %d models x %d seeds (%s) on %d train, %d validation, %d test rows, %d classes",
             len(chosen), seeds, mode, len(task.train), len(task.validation), len(task.test), len(task.labels))
    results = _run_all(chosen, task, settings, accelerator, precision)
    out = report.build(task, chosen, results, settings)
    print(report.table(out))
    if output_json:
        report.write(output_json, out)
        log.info("wrote %s", output_json)
    return out


def _run_all(chosen, task, settings: dict, accelerator: str, precision: str) -> list[list[dict]]:
    import torch

    from mlm_lightning.evaluate import classifier, probe
    from mlm_lightning.evaluate.models import RANDOM
    from mlm_lightning.evaluate.models import classifier as build
    from mlm_lightning.model.fill_mask import pick_device

    device = torch.device(pick_device("cuda" if accelerator == "gpu" else accelerator))
    if precision == "auto":
        precision = "bf16-mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "32-true"
    splits = {"train": task.train, "validation": task.validation, "test": task.test}
    total, done, started = len(chosen) * len(settings["seeds"]), 0, time.perf_counter()
    results = []
    for candidate in chosen:
        length = min(settings["max_length"] or candidate.max_length, candidate.max_length)
        runs, features = [], None
        for s in settings["seeds"]:
            run_start = time.perf_counter()
            model = build(candidate, task.labels, s)
            encoded = {k: (classifier.encode(candidate.tokenizer, rows, length, classifier.accepted_inputs(model)),
                           task.ids(rows)) for k, rows in splits.items()}
            if settings["mode"] == "finetune":
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", ".*(val_dataloader|does not have many workers).*")
                    scores = classifier.finetune(
                        model, candidate.tokenizer, encoded, len(task.labels), s, settings["epochs"],
                        settings["batch_size"], settings["lr"], settings["weight_decay"], settings["warmup"],
                        "cpu" if device.type == "cpu" else "auto", precision)
            else:
                if features is None or candidate.kind == RANDOM:  # (a trained encoder's embeddings: once)
                    features = {k: probe.embed(model.base_model, v[0], candidate.tokenizer, settings["batch_size"],
                                               device) for k, v in encoded.items()}
                scores = _probe_scores(probe, classifier, features, encoded, len(task.labels), s, settings)
            del model
            done += 1
            runs.append({"seed": s, **scores, "seconds": round(time.perf_counter() - run_start, 2)})
            elapsed = time.perf_counter() - started
            log.info("evaluate %d/%d: %s seed %d: accuracy %.3f, macro-F1 %.3f (%.1f s); elapsed %s, ETA %s", done,
                     total, candidate.describe(), s, scores["test"]["accuracy"], scores["test"]["f1_macro"],
                     runs[-1]["seconds"], _clock(elapsed), _clock(elapsed / done * (total - done)))
        results.append(runs)
    return results


def _probe_scores(probe, classifier, features: dict, encoded: dict, num_classes: int, seed: int, settings: dict):
    import torch

    labels = {k: torch.tensor(v[1], dtype=torch.long) for k, v in encoded.items()}
    fitted = probe.fit_probe(features["train"], labels["train"], num_classes, seed, settings["probe_l2"])
    out = {}
    for split in ("validation", "test"):
        if len(labels[split]):
            metrics = classifier.scores(num_classes)
            predicted = probe.predict(fitted, features[split])
            out[split] = {k: float(m(predicted, labels[split])) for k, m in metrics.items()}
    return out


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
