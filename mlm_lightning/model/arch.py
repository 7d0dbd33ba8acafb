"""The only code that knows a model family's internals: how to build, load and call it, and what it costs.

Everything else (the LightningModule, checkpoints, fill-mask, throughput) goes through these functions:
- building: `new_bert` (from scratch), `load_bert` (pretrained), `bert_from_config` (a config read from a
  checkpoint), and what is accepted: BERT only. Another architecture (RoBERTa, DistilBERT, ...) loaded into
  `BertForMaskedLM` gets no matching weights, and transformers would only log that they were "newly
  initialized": a user would train a random model believing they continue a pretrained one;
- calling: `encode` (the encoder's hidden states) and `head` (the MLM head on any rows of them), so the
  head can run on the masked positions only; `compile_encoder`; `head_module` (the head's first layer);
- costs and rules: `train_flops`, `decay_groups` (which weights skip weight decay), `usable_positions`.
"""

from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, BertConfig, BertForMaskedLM

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
    config = load_pretrained(AutoConfig, name_or_path, what)
    check_bert(getattr(config, "model_type", None), f"{what} {name_or_path!r}")
    return config


def load_bert(name_or_path: str, what: str = "model_name_or_path"):
    """Pretrained `BertForMaskedLM`. Missing encoder weights are an error; a missing MLM head is a warning."""
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
    check(isinstance(config, dict), f"{source} has no valid model config")
    check_bert(config.get("model_type", "bert"), source)
    try:
        bert_config = BertConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise MLMError(f"{source} has an invalid model config ({e})") from None
    return BertForMaskedLM._from_config(bert_config, attn_implementation="sdpa")


def new_bert(vocab: int, pad_token_id: int, **sizes):
    """A new `BertForMaskedLM` for a vocabulary of `vocab` tokens, with the sizes given (hidden_size, ...)."""
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


def build(hparams, tokenizer):
    """A `BertForMaskedLM` from `model_name_or_path` (BERT only), or from scratch with the sizes in `hparams`."""
    vocab = len(tokenizer)
    if hparams.model_name_or_path:
        model = load_bert(hparams.model_name_or_path)
        check(
            vocab <= model.config.vocab_size,
            f"the tokenizer has {vocab} tokens but the model only {model.config.vocab_size}; use the model's"
            " own tokenizer (leave --data.tokenizer unset)",
        )
        return model
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "dropout")
    return new_bert(vocab, tokenizer.pad_token_id, **{k: hparams[k] for k in sizes})


def usable_positions(name_or_path: str) -> int:
    """How many tokens a pretrained model's position embeddings hold; anything that is not BERT is refused here."""
    return bert_config(name_or_path).max_position_embeddings


# -- calling the network ---------------------------------------------------------------------------------------
def encode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The encoder's last hidden states, (batch, length, hidden)."""
    return model.bert(input_ids=input_ids, attention_mask=attention_mask)[0]


def head(model, hidden: torch.Tensor) -> torch.Tensor:
    """MLM logits for any rows of hidden states (all positions, or the masked ones only)."""
    return model.cls(hidden)


def compile_encoder(model) -> None:
    model.bert.compile(dynamic=None)


def head_module(model) -> torch.nn.Module:
    """The MLM head's first layer (tests poison it to make a loss NaN)."""
    return model.cls.predictions.transform.dense


# -- costs and rules -----------------------------------------------------------------------------------------
def decay_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices only, never on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "LayerNorm" in name or name.endswith("bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_flops(config, seq_len: int, n_tokens: int, n_head_rows: int) -> int:
    """Matmul FLOPs of one training step (forward + backward) of a `BertForMaskedLM` with this `config`.

    Per token and layer the forward pass multiplies by the Q, K, V, O projections (4 h^2 weights) and the
    feed-forward pair (2 h * intermediate_size weights): 2 FLOPs per weight (multiply + add); attention adds
    scores (QK^T) and values (AV), 2 * 2 * seq_len * h. The MLM head (transform h^2 + decoder h * vocab) runs
    on `n_head_rows` rows: the masked positions with `sparse_head`, every position without. Embeddings are
    lookups (no FLOPs) and `BertForMaskedLM` has no pooler. The backward pass costs twice the forward
    (gradients of inputs and of weights), so training = 3 x forward (the usual 6 x parameters per token).
    Softmax, LayerNorm and GELU are not matmuls and are left out, as in MFU figures elsewhere.

    Args:
        config: A `BertConfig` (hidden_size, intermediate_size, num_hidden_layers, vocab_size).
        seq_len: The (padded) sequence length the attention runs over.
        n_tokens: Tokens through the encoder.
        n_head_rows: Rows through the MLM head.
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    per_token_layer = 2 * (4 * h * h + 2 * h * config.intermediate_size) + 2 * 2 * seq_len * h
    head_row = 2 * (h * h + h * config.vocab_size)
    return 3 * (n_tokens * layers * per_token_layer + n_head_rows * head_row)


def layer_classes(model: torch.nn.Module) -> set[type]:
    """The class of the model's repeated encoder layers, found by structure (any family): the elements of the
    `ModuleList` that holds the most parameters (BERT's `encoder.layer`, ModernBERT's `layers`, ...)."""
    best, size = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module):
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = {type(m) for m in module}, n
    return best
