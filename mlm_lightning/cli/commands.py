"""The commands beside LightningCLI's `fit|validate|test|predict`: plain typed functions.

`mlm_lightning.cli` turns each into a command line with jsonargparse (same `--name value` style and `--help`
as the Lightning commands): the signature gives the options, the docstring their help, and a `*name`
parameter the positional arguments. Each imports what it needs inside (`plot` needs no torch, a second of
start-up).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from mlm_lightning.errors import MLMError, check

log = logging.getLogger("mlm_lightning")


def fill_mask(
    *sentences: str,
    model: str,
    file: str | None = None,
    top_k: int = 5,
    joint: bool = False,
    json: bool = False,
    device: str = "auto",
    batch_size: int = 64,
    targets: str | None = None,
) -> None:
    """Complete sentences with [MASK] in them (arguments, --file, or lines on stdin).

    Args:
        sentences: Sentences with [MASK] where a word should go. None: read --file or stdin.
        model: An exported (Hugging Face) model directory, a hub id, or a .ckpt written by fit.
        file: A text file with one sentence per line.
        top_k: Candidates reported per mask.
        joint: Fill several masks left to right, each choice fed back for the next.
        json: One JSON object per input, with the keys of transformers' fill-mask pipeline.
        device: cpu, cuda or auto.
        batch_size: Sentences per forward pass.
        targets: Score only these words, comma-separated (as transformers' fill-mask pipeline: a word that is
            not one token is scored by its first token).
    """
    from mlm_lightning.model.checkpoint import load_model
    from mlm_lightning.model.fill_mask import FillMasker, format_text, pick_device

    texts = _input_lines(sentences, file, "sentences with [MASK]")
    device = pick_device(device)
    net, tokenizer = load_model(model)
    masker = FillMasker(net.to(device), tokenizer, device, top_k, batch_size)
    start = time.perf_counter()
    words = [w.strip() for w in targets.split(",") if w.strip()] if targets is not None else None
    check(words is None or words, "--targets is empty; give words separated by commas, e.g. --targets cat,dog")
    results = masker(texts, joint=joint, targets=words)
    elapsed = time.perf_counter() - start
    import json as json_module  # (the `json` option shadows the module name here)

    for r in results:
        print(json_module.dumps(r, ensure_ascii=False) if json else format_text(r))
    if len(texts) > 1:
        log.info("filled %d lines in %.2f s (%.0f lines/s on %s)", len(texts), elapsed, len(texts) / elapsed, device)


def _input_lines(sentences: tuple[str, ...], file: str | None, what: str) -> list[str]:
    """The input sentences of a command: its arguments, then --file's lines; neither: the lines on stdin. Blank
    lines of a file or stdin are skipped."""
    texts = list(sentences)
    if file:
        check(os.path.isfile(file), f"--file {file!r} does not exist; check the path")
        try:
            with open(file, encoding="utf-8") as f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise MLMError(f"--file {file!r} cannot be read as UTF-8 text ({type(e).__name__})") from None
    if not sentences and not file:
        check(not sys.stdin.isatty(), f"no input: pass {what}, --file FILE, or pipe lines on stdin")
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    return texts


def score(
    *sentences: str,
    model: str,
    file: str | None = None,
    variant: str = "original",
    device: str = "auto",
    batch_size: int = 256,
) -> None:
    """Score sentences by their pseudo-log-likelihood (arguments, --file, or lines on stdin), as JSON lines.

    Args:
        sentences: Sentences to score. None: read --file or stdin.
        model: An exported (Hugging Face) model directory, a hub id, or a .ckpt written by fit.
        file: A text file with one sentence per line.
        variant: original (mask each token in turn) or word_l2r (also mask the rest of its word to the right).
        device: cpu, cuda or auto.
        batch_size: Masked copies of the sentences per forward pass.
    """
    from mlm_lightning.model.checkpoint import load_model
    from mlm_lightning.model.fill_mask import pick_device
    from mlm_lightning.model.score import Scorer, check_variant

    check_variant(variant)
    texts = _input_lines(sentences, file, "sentences")
    device = pick_device(device)
    net, tokenizer = load_model(model)
    scorer = Scorer(net.to(device), tokenizer, device, batch_size)
    start = time.perf_counter()
    results = scorer(texts, variant)
    elapsed = time.perf_counter() - start
    import json

    for r in results:
        print(json.dumps(r, ensure_ascii=False))
    if len(texts) > 1:
        log.info("scored %d lines in %.2f s (%.0f lines/s on %s)", len(texts), elapsed, len(texts) / elapsed, device)


def export(ckpt_path: str, export_dir: str, format: str = "hf", license: str | None = None) -> None:
    """Write a checkpoint as a Hugging Face model directory (what transformers' pipeline loads), with a model card.

    Args:
        ckpt_path: A .ckpt written by mlm-lightning fit.
        export_dir: The directory to write (replaced atomically if it holds an earlier export).
        format: hf (config, weights, tokenizer, README.md), or onnx: the same plus model.onnx (ONNX Runtime,
            optimum, mlm-lightning serve --backend onnx).
        license: The license in the model card's metadata (a hub license id, e.g. apache-2.0, mit).
    """
    from mlm_lightning.export import export as export_checkpoint

    command = ["export", "--ckpt_path", ckpt_path, "--export_dir", export_dir, "--format", format]
    command += ["--license", license] if license else []
    path = export_checkpoint(ckpt_path, export_dir, license, format, command)
    log.info("exported %s to %s", ckpt_path, path)
    print(path)


def plot(*runs: str, out: str | None = None) -> None:
    """Draw loss, perplexity, accuracy, learning rate and tokens/s of one or more runs (overlaid).

    Args:
        runs: Run directories (a fit's --trainer.default_root_dir, holding lightning_logs/).
        out: The PNG to write. Default: RUN_DIR/plot.png for one run, ./plot.png for several.
    """
    from mlm_lightning.training.plot import plot_runs

    check(len(runs) > 0, "plot needs a run directory: mlm-lightning plot RUN_DIR [RUN_DIR ...] [--out FILE]")
    for run in runs:
        check(os.path.isdir(run), f"run directory {run!r} does not exist; pass a fit's --trainer.default_root_dir")
    out = out or (os.path.join(runs[0], "plot.png") if len(runs) == 1 else "plot.png")
    path = plot_runs(list(runs), out)
    log.info("plotted %s to %s", ", ".join(runs), path)
    print(path)

