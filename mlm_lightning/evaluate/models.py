"""The models `evaluate` compares: export or Hugging Face dirs and hub ids (transformers' Auto classes), `.ckpt`
files (read as fill-mask and export read them), and `random`: the first other model's architecture, untrained.

Each becomes its family's `*ForSequenceClassification`: the encoder's weights, a new classifier head.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import transformers

from mlm_lightning.errors import MLMError, check
from mlm_lightning.hub import load_pretrained
from mlm_lightning.model import arch, checkpoint, sharded

RANDOM = "random"


@dataclass
class Candidate:
    name: str  # as given on the command line
    kind: str  # "pretrained", "checkpoint" or "random"
    config: transformers.PretrainedConfig
    tokenizer: object
    source: str | None  # the dir or hub id to load weights from
    weights: dict | None = None  # a checkpoint's masked-LM weights (read and verified once, for every seed)

    @property
    def max_length(self) -> int:
        return min(self.tokenizer.model_max_length, arch.position_limit(self.config))

    def describe(self) -> str:
        return f"random ({self.config.model_type}, untrained)" if self.kind == RANDOM else self.name


def _is_checkpoint(path: str) -> bool:
    return os.path.isfile(path) or (os.path.isdir(path) and bool(sharded.kind(path)))


def candidates(specs: list[str]) -> list[Candidate]:
    """Each model's config and tokenizer, checked before any training (a refused family, an incomplete dir, a
    damaged checkpoint: one line, before the first run)."""
    check(len(specs) > 0, "no model to evaluate: mlm-lightning evaluate MODEL [MODEL ...] --train_file FILE")
    out, first = [], None
    for spec in specs:
        if spec == RANDOM:
            out.append(None)
            continue
        if _is_checkpoint(spec):
            model, tokenizer = checkpoint.load_checkpoint(spec, "model")
            candidate = Candidate(spec, "checkpoint", model.config, tokenizer, None, model.state_dict())
        else:
            checkpoint.check_model_dir(spec, "model")
            config = arch.pretrained_config(spec, "model")  # (a family that is not supported is refused here)
            tokenizer = load_tokenizer(spec)
            arch.check_fits(config, tokenizer, f"model {spec!r}", "put the model's own tokenizer files beside its"
                                                                  " weights")
            candidate = Candidate(spec, "pretrained", config, tokenizer, spec)
        first = first or candidate
        out.append(candidate)
    check(first is not None, "random needs a trained model beside it to take its architecture and tokenizer from:"
                             " mlm-lightning evaluate MODEL random ...")
    return [c or Candidate(RANDOM, RANDOM, first.config, first.tokenizer, None) for c in out]


def load_tokenizer(spec: str):
    from mlm_lightning.data.tokenizer import load_tokenizer as load

    return load(spec)


class _ExpectedReport(logging.Filter):
    """Drops transformers' load report while a classifier is built from an encoder: it lists the new classifier
    head (expected) and the unused MLM head; anything unexpected in it is refused by `classifier` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextmanager
def _quiet_report():
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _ExpectedReport()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def classifier(candidate: Candidate, labels: list[str], seed: int):
    """A new `*ForSequenceClassification` of the candidate's family: its encoder's weights (none for random), a
    classifier head seeded by `seed`, in fp32."""
    family = candidate.config.model_type
    config = candidate.config.__class__.from_dict(candidate.config.to_dict())
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    config.problem_type = "single_label_classification"
    cls = getattr(transformers, arch.FAMILIES[family].model_class.replace("ForMaskedLM", "ForSequenceClassification"))
    torch.manual_seed(seed)
    if candidate.kind == RANDOM:
        return cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    source, state = candidate.source, candidate.weights
    with _quiet_report():
        model, info = load_pretrained(cls, source, "model", config=config, state_dict=state, dtype=torch.float32,
                                      attn_implementation="sdpa", output_loading_info=True) if source else \
            cls.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32,
                                attn_implementation="sdpa", output_loading_info=True)
    prefix = f"{model.base_model_prefix}."
    lost = sorted(k for k in info.get("missing_keys", ()) if k.startswith(prefix) and ".pooler" not in k)
    if lost or info.get("mismatched_keys"):
        raise MLMError(f"model {candidate.name!r} lacks {len(lost)} {family} encoder weights (e.g. {lost[:1]}) or"
                       " holds weights of other shapes; it is not a complete checkpoint")
    return model
