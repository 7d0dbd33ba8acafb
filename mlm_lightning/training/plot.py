"""Pictures of runs: losses, validation perplexity and accuracy, learning rate and tokens/s against steps.

Reads what Lightning's CSV logger wrote (`RUN_DIR/lightning_logs/version_*/metrics.csv`). A resumed fit
writes a new version that continues the steps; a later version replaces the earlier rows from its first
step on (a resume from an older checkpoint, or a fresh run in the same directory, wins over what it redoes).
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import re

from mlm_lightning.errors import MLMError, check
from mlm_lightning.files import atomic_path
from mlm_lightning.metrics import TOKENS_PER_S, TRAIN_LOSS, TRAIN_LR, VAL_ACC, VAL_LOSS, VAL_PPL

log = logging.getLogger("mlm_lightning")

PANELS = [  # (title, [(metric, label)], log scale)
    ("loss", [(TRAIN_LOSS, "train"), (VAL_LOSS, "val")], False),
    ("validation perplexity", [(VAL_PPL, "val")], True),
    ("validation accuracy (masked tokens)", [(VAL_ACC, "val")], False),
    ("learning rate", [(TRAIN_LR, "lr")], False),
    ("real tokens/s", [(TOKENS_PER_S, "tokens/s")], False),
]
MARKER = "mlm-lightning plot"  # written into the PNG: only such a file is ever replaced


def with_csv_log(logger, root: str):
    """A fit's `logger` with Lightning's CSV logger first: the user's trackers (W&B, MLflow, TensorBoard ...) keep
    their records, and `metrics.csv`, which `plot` and the end of a fit read, is written as without them. First, so
    that the run's directory stays `ROOT/lightning_logs/version_N` (config.yaml goes there, never into a tracker's
    save_dir). Left as given: logging off (`False`, `[]`), or a CSV logger among them already."""
    from lightning.pytorch.loggers import CSVLogger

    if logger is None or logger is True:
        return CSVLogger(root)
    loggers = list(logger) if isinstance(logger, (list, tuple)) else [] if logger is False else [logger]
    if not loggers or any(isinstance(lg, CSVLogger) for lg in loggers):
        return logger
    return [CSVLogger(root), *loggers]


def metrics_files(run_dir: str) -> list[str]:
    files = glob.glob(os.path.join(glob.escape(run_dir), "lightning_logs", "version_*", "metrics.csv"))
    return sorted(files, key=lambda f: int(re.sub(r"\D", "", os.path.basename(os.path.dirname(f))) or 0))


def read_metrics(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of a run directory, all its logged versions joined."""
    files = metrics_files(run_dir)
    for directory in ([] if files else [run_dir, os.path.join(run_dir, "lightning_logs")]):
        if os.path.isdir(directory):
            os.listdir(directory)  # glob hides why it found nothing: an unreadable directory raises its OS error
    check(bool(files), f"{run_dir!r} has no lightning_logs/version_*/metrics.csv; pass a fit's default_root_dir")
    series: dict[str, list[tuple[int, float]]] = {}
    for path in files:
        try:
            rows = _metric_rows(path)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise MLMError(f"{path!r} cannot be read as a metrics CSV ({type(e).__name__})") from None
        if not rows:
            continue
        first = min(int(r["step"]) for r in rows) + 1
        series = {k: [(s, v) for s, v in pts if s < first] for k, pts in series.items()}
        for r in rows:
            for key, value in r.items():
                if key in ("step", "epoch") or not value:
                    continue
                try:  # Lightning's CSV `step` is the optimizer steps done minus one: count steps done
                    series.setdefault(key, []).append((int(r["step"]) + 1, float(value)))
                except ValueError:
                    continue  # a non-numeric cell: skip it, the rest of the run still draws
    return {k: sorted(v) for k, v in series.items() if v}


def _metric_rows(path: str) -> list[dict]:
    """The rows of a metrics.csv with a step; an empty file, a cut-short row or a cell that is not a number is
    named in a warning (file and line) and left out: the rest of the run still draws."""
    bad: list[tuple[int, str]] = []
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for r in reader:
            step = (r.get("step") or "").strip()
            if None in r or any(v is None for v in r.values()):
                bad.append((reader.line_num, "has the wrong number of fields (cut short or damaged)"))
            elif not step.isdigit():
                bad.append((reader.line_num, f"has no step number ({step[:20]!r})"))
            elif not all(_number(v) for k, v in r.items() if k not in ("step", "epoch") and v):
                bad.append((reader.line_num, "has a cell that is not a number"))
            else:
                rows.append(r)
        if reader.fieldnames is None:
            bad.append((1, "is empty (no header line)"))
        elif not rows and not bad:
            bad.append((1, "has a header and no rows"))
    if bad:
        log.warning("plot: %s line %d %s%s; drawn without %s", path, bad[0][0], bad[0][1],
                    f" (and {len(bad) - 1} more line(s))" if len(bad) > 1 else "", "them" if len(bad) > 1 else "it")
    return rows


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _smooth(values: list[float], weight: float) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def is_our_png(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x89PNG\r\n\x1a\n") and MARKER.encode() in head


def plot_runs(run_dirs: list[str], out: str, labels: list[str] | None = None) -> str:
    """Draw one figure of the runs (overlaid when several) to `out` (PNG). Returns the path written.

    An existing `out` is replaced only if an earlier `plot` wrote it: a user's file there is an error.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    check(len(run_dirs) > 0, "plot needs at least one run directory")
    check(
        not os.path.exists(out) or is_our_png(out),
        f"{out!r} exists and was not written by mlm-lightning plot; pass another --out or move it away",
    )
    labels = labels or [os.path.basename(os.path.normpath(d)) or d for d in run_dirs]
    runs = [read_metrics(d) for d in run_dirs]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    axes = axes.flatten()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (title, metrics, log_scale), ax in zip(PANELS, axes, strict=False):
        for r, (series, label) in enumerate(zip(runs, labels, strict=True)):
            for m, (key, name) in enumerate(metrics):
                pts = series.get(key)
                if not pts:
                    continue
                steps, values = zip(*pts, strict=True)
                color = colors[(r * len(metrics) + m) % len(colors)]
                text = f"{label} {name}" if len(runs) > 1 or len(metrics) > 1 else label
                noisy = key in (TRAIN_LOSS, TOKENS_PER_S) and len(values) > 20
                if noisy:  # raw steps faint, a smoothed line on top
                    ax.plot(steps, values, color=color, alpha=0.2, linewidth=0.8)
                    values = _smooth(list(values), 0.9)
                ax.plot(steps, values, color=color, label=text, linewidth=1.6,
                        marker="o" if len(values) < 30 and not noisy else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        shown = [v for line in ax.lines for v in line.get_ydata()]
        if log_scale and shown and min(shown) > 0 and max(shown) / min(shown) > 10:  # log only for a wide range
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 160, not 1.6 x 10^2
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        if ax.lines:
            ax.legend(fontsize=8)
    _summary_panel(axes[-1], runs, labels)
    fig.suptitle("mlm-lightning: " + ", ".join(labels))
    fig.tight_layout()
    try:  # written aside under a name of our own and renamed: never a half-written picture
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=80, metadata={"Software": MARKER})
    finally:
        plt.close(fig)
    return out


def _summary_panel(ax, runs, labels) -> None:
    """The sixth panel: the numbers behind the curves, per run."""
    ax.axis("off")
    lines = []
    for series, label in zip(runs, labels, strict=True):
        ppl, steps = series.get(VAL_PPL, []), series.get(TRAIN_LOSS, [])
        lines.append(label)
        if steps:
            lines.append(f"  steps: {steps[-1][0]}")
        if ppl:
            best = min(ppl, key=lambda p: p[1])
            lines.append(f"  {VAL_PPL}: {ppl[0][1]:.1f} (step {ppl[0][0]}) -> {ppl[-1][1]:.1f} (step {ppl[-1][0]})")
            lines.append(f"  best {VAL_PPL}: {best[1]:.1f} (step {best[0]})")
        if series.get(VAL_ACC):
            lines.append(f"  last {VAL_ACC}: {series[VAL_ACC][-1][1]:.3f}")
        if series.get(TOKENS_PER_S):
            tps = [v for _, v in series[TOKENS_PER_S]]
            lines.append(f"  median tokens/s: {sorted(tps)[len(tps) // 2]:,.0f}")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=9, transform=ax.transAxes)
