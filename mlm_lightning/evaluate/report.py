"""The report: a table on stdout, the same figures (and each run's) in a JSON file.

The JSON file's rule: a new path is written; an existing one is replaced only if it is a regular file holding a
report an earlier evaluate wrote (its "report" key); anything else is a user's file and is refused before any
work. The file is written aside and renamed into place (`files.atomic_file`).
"""

from __future__ import annotations

import json
import os
import statistics

from mlm_lightning.errors import check
from mlm_lightning.files import atomic_file

REPORT = "mlm-lightning evaluate"
METRICS = {"accuracy": "accuracy", "f1_macro": "macro-F1"}


def _ours(path: str) -> bool:
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("report") == REPORT
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return False


def check_output(path: str) -> None:
    check(not os.path.lexists(path) or _ours(path), f"--output_json {path!r} exists and is not a report evaluate"
          " wrote; evaluate replaces only its own reports: pick another path")


def write(path: str, report: dict) -> None:
    check_output(path)  # (again: the runs took a while, and a file may have appeared meanwhile)
    with atomic_file(path) as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")


def build(task, chosen, results: list[list[dict]], settings: dict) -> dict:

    counts = {split: {name: rows.labels.count(name) for name in task.labels}
              for split, rows in (("train", task.train), ("validation", task.validation), ("test", task.test))}
    majority = max(counts["test"].values()) / max(1, len(task.test))
    models = []
    for candidate, runs in zip(chosen, results, strict=True):
        entry = {"model": candidate.name, "kind": candidate.kind, "family": candidate.config.model_type,
                 "label": candidate.describe(), "runs": runs}
        for split in ("validation", "test"):
            if all(split in r for r in runs):
                entry[split] = {m: mean_std([r[split][m] for r in runs]) for m in METRICS}
        models.append(entry)
    return {"report": REPORT, "settings": settings, "data": {"sources": task.sources, "labels": task.labels,
            "counts": counts, "test_majority_class_accuracy": majority}, "models": models}


def table(report: dict) -> str:
    """model | accuracy | macro-F1, as mean ± std over the seeds, on the test split."""
    settings, data = report["settings"], report["data"]
    rows = [(m["label"], *(f"{m['test'][k]['mean']:.3f} ± {m['test'][k]['std']:.3f}" for k in METRICS))
            for m in report["models"]]
    header = ("model", *METRICS.values())
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    seeds = settings["seeds"]
    out = [f"test split: {sum(data['counts']['test'].values())} rows, {len(data['labels'])} classes (the most"
           f" frequent class alone: accuracy {data['test_majority_class_accuracy']:.3f}); {settings['mode']}, mean ±"
           f" std over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}", line.format(*header),
           line.format(*("-" * w for w in widths))]
    out += [line.format(*r) for r in rows]
    return "\n".join(x.rstrip() for x in out)


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one run)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
