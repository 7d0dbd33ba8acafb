"""Defaults that follow from what the user asked for, applied to options the user left unset.

The offline demo (no corpus, no model) runs the recipe of `mlm_lightning/configs/default.yaml` (its one home,
chosen by scripts/sweep_default.py, read here), budget included: a bare `mlm-lightning fit` and
`mlm-lightning fit --config configs/default.yaml` train the same model. Your own corpus gets 3 epochs (as Hugging
Face's `run_mlm`): the demo's budget on a real corpus would be far too short or far too long. A budget given as
`max_steps` or `max_time` alone ends the run by itself: no epoch limit is added on top of it. On a GPU: log every
50 steps, batches from loader workers. What a model brings to its data (a pretrained model's tokenizer, length and
learning rate) is applied here too, by `model/pairing.py`, the rules' one home (Python callers get them from
`MLMDataModule`).

"Set by the user" means given on the command line or in a `--config` file, whatever the value (jsonargparse
parses the same arguments once more without defaults to tell).
"""

from __future__ import annotations

import os
from importlib import resources

import yaml

from mlm_lightning.model.pairing import COMPILE_PAD_MULTIPLE, paired_options

__all__ = ["COMPILE_PAD_MULTIPLE", "DEMO_CONFIG", "adjusted_defaults", "demo_recipe", "on_gpu", "was_given"]

DEMO_CONFIG = resources.files("mlm_lightning") / "configs" / "default.yaml"
BUDGET = ("trainer.max_epochs", "trainer.max_steps", "trainer.max_time")
CORPUS_EPOCHS = 3
GPU_LOG_EVERY = 50


def demo_recipe() -> dict[str, object]:
    """The offline demo's options as dotted keys (`model.learning_rate`: 0.003), from its config file."""
    with DEMO_CONFIG.open(encoding="utf-8") as f:
        config = yaml.safe_load(f)
    return {f"{group}.{key}": value for group in ("trainer", "model", "data")
            for key, value in (config.get(group) or {}).items()}


PAIRED_HERE = ("model.learning_rate", "data.max_length", "data.pad_to_multiple_of")


def was_given(given, key: str) -> bool:
    try:
        return key in given
    except (KeyError, TypeError):
        return False


def _limit_given(given, key: str) -> bool:
    """A budget option set to a real limit (`max_steps -1` and `max_epochs -1` mean none)."""
    return was_given(given, key) and given[key] not in (None, -1)


def adjusted_defaults(cfg, given, model_positions=None, subcommand: str = "fit") -> dict[str, tuple[object, str]]:
    """{dotted key: (value, why)} to set in `cfg` (the parsed subcommand config) for options not in `given`.

    `model_positions(name_or_path) -> int` reads a pretrained model's max_position_embeddings.
    """
    changes: dict[str, tuple[object, str]] = {}
    pretrained = cfg["model"].get("model_name_or_path")
    demo = cfg["data"].get("train_files") is None and cfg["data"].get("dataset_name") is None and not pretrained
    recipe = demo_recipe() if demo else {}
    budget = [k for k in BUDGET if _limit_given(given, k)]
    if not budget and not was_given(given, "trainer.max_epochs"):  # (an explicit -1, no limit, is the user's)
        limits = {k: recipe[k] for k in BUDGET if k in recipe} if demo else {"trainer.max_epochs": CORPUS_EPOCHS}
        why = "the offline demo" if demo else "your corpus"
        ends = next((f"{k.split('.')[1]} ends the run" for k in limits if limits[k] is not None), why)
        changes.update({k: (limits[k], why) if k in limits else (None, ends) for k in BUDGET
                        if k in limits or k == "trainer.max_epochs"})
    elif not was_given(given, "trainer.max_epochs"):
        changes["trainer.max_epochs"] = (None, f"{budget[0].split('.')[1]} ends the run")
    if demo and not was_given(given, "data.max_length"):
        # never beyond the positions of the model being built (a smaller --model.max_position_embeddings wins);
        # validate/test/predict of a checkpoint keep the data module's own length (the checkpoint's model may be
        # smaller than the demo's: its sizes are only read after these defaults)
        length = recipe.get("data.max_length", cfg["data"].get("max_length"))
        length = min(length, cfg["model"].get("max_position_embeddings") or length)
        if subcommand == "fit" or not cfg.get("ckpt_path"):
            changes["data.max_length"] = (length, "the offline demo")
    if demo:  # (every subcommand: validate/test/predict of a demo checkpoint need its model, vocabulary, masking)
        changes.update({k: (v, "the offline demo") for k, v in recipe.items()
                        if k not in (*BUDGET, "data.max_length") and not was_given(given, k)})
    model = {**dict(cfg["model"].items()), **{k.split(".", 1)[1]: v for k, (v, _) in changes.items()
                                              if k.startswith("model.")}}
    data = {**dict(cfg["data"].items()), **{k.split(".", 1)[1]: v for k, (v, _) in changes.items()
                                            if k.startswith("data.")}}
    paired = paired_options(model, data, lambda key: was_given(given, key), model_positions)
    changes.update({k: v for k, v in paired.items() if k in PAIRED_HERE})
    if on_gpu(cfg["trainer"].get("accelerator")):
        # on a GPU every host sync stalls the device: log (and check the loss) every 50 steps, and feed it
        # from loader workers
        if not was_given(given, "trainer.log_every_n_steps"):
            changes["trainer.log_every_n_steps"] = (GPU_LOG_EVERY, "a GPU: fewer host syncs")
        if not was_given(given, "data.num_workers"):
            changes["data.num_workers"] = (min(4, os.cpu_count() or 1), "a GPU: batches prepared in workers")
    return {k: (v, why) for k, (v, why) in changes.items() if cfg.get(k) != v}


def on_gpu(accelerator) -> bool:
    """Will `--trainer.accelerator` run on a CUDA GPU?"""
    name = str(accelerator or "auto").lower()
    if name in ("gpu", "cuda"):
        return True
    if name != "auto":
        return False
    import torch

    return torch.cuda.is_available()
