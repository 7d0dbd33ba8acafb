"""The network: a `transformers.BertForMaskedLM`, built new, from a saved config, or from pretrained weights.

One place builds it for training (`model.py`), checkpoint loading (`export.py`) and inference, and one place
decides what is accepted: BERT only. Another architecture (RoBERTa, DistilBERT, ...) loaded into
`BertForMaskedLM` gets no matching weights, and transformers would only log that they were "newly
initialized": a user would train a random model believing they continue a pretrained one.
"""

from __future__ import annotations

import logging

import torch

from mlm_lightning.errors import MLMError, check
from mlm_lightning.hub import load_pretrained

log = logging.getLogger("mlm_lightning")


def check_bert(model_type: object, source: str) -> None:
    check(
        model_type == "bert",
        f"{source} holds a {model_type!r} model, but mlm-lightning trains and runs BERT (model_type 'bert')"
        " only; pass a BERT model (e.g. bert-base-uncased or a directory saved from BertForMaskedLM)",
    )


def bert_config(name_or_path: str, what: str = "model_name_or_path"):
    """The `BertConfig` of a local directory or hub id; anything that is not BERT is refused."""
    from transformers import AutoConfig

    config = load_pretrained(AutoConfig, name_or_path, what)
    check_bert(getattr(config, "model_type", None), f"{what} {name_or_path!r}")
    return config


def load_bert(name_or_path: str, what: str = "model_name_or_path"):
    """Pretrained `BertForMaskedLM`. Missing encoder weights are an error; a missing MLM head is a warning."""
    from transformers import BertForMaskedLM

    config = bert_config(name_or_path, what)
    model, info = load_pretrained(
        BertForMaskedLM, name_or_path, what, config=config, attn_implementation="sdpa", output_loading_info=True
    )
    missing = sorted(info.get("missing_keys", []))
    encoder = [k for k in missing if not k.startswith("cls.")]
    check(
        not encoder,
        f"{what} {name_or_path!r} lacks {len(encoder)} BERT encoder weights (e.g. {encoder[:1]}); it is not a"
        " complete BERT checkpoint",
    )
    if missing:
        log.warning("%s %r has no MLM head weights: the head starts from random values", what, name_or_path)
    return model


def bert_from_config(config: dict, source: str):
    """A `BertForMaskedLM` with random weights from a config dict read from a file (e.g. a checkpoint)."""
    from transformers import BertConfig, BertForMaskedLM

    check(isinstance(config, dict), f"{source} has no valid model config")
    check_bert(config.get("model_type", "bert"), source)
    try:
        bert_config = BertConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise MLMError(f"{source} has an invalid model config ({e})") from None
    return BertForMaskedLM._from_config(bert_config, attn_implementation="sdpa")


def new_bert(vocab: int, pad_token_id: int, **sizes):
    """A new `BertForMaskedLM` for a vocabulary of `vocab` tokens, with the sizes given (hidden_size, ...)."""
    from transformers import BertConfig, BertForMaskedLM

    check(
        sizes["hidden_size"] % sizes["num_attention_heads"] == 0,
        f"hidden_size {sizes['hidden_size']} must be a multiple of num_attention_heads {sizes['num_attention_heads']}",
    )
    dropout = sizes.pop("dropout")
    config = BertConfig(
        vocab_size=-(-vocab // 8) * 8,  # a multiple of 8 keeps the (tied) head matmul on fast GPU kernels
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=pad_token_id,
        **sizes,
    )
    model = BertForMaskedLM._from_config(config, attn_implementation="sdpa")
    with torch.no_grad():  # the padding ids are no tokens: never predicted, by fill-mask or a pipeline
        model.cls.predictions.bias[vocab:] = -1e4
    return model
