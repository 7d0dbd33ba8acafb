"""The only code that knows a model family's internals: how to build, load and call it, and what it costs.

Every supported family is a transformers `*ForMaskedLM` whose encoder is its `base_model` and whose MLM head is
a chain of its own submodules: the encoder, then the head on chosen rows only (the masked positions), gives the
same logits as the model's own forward at those rows, so every family has the sparse head. One row of
`FAMILIES` per family says how to build it, its head, its output bias, its FLOPs, its position limit, its norms.
Everything else (the LightningModule, checkpoints, fill-mask, throughput) goes through the functions below:
- building: `build` (pretrained or from scratch), `load_pretrained_mlm`, `from_config` (a config read from a
  checkpoint), `new_model`; `family_of` decides what is accepted;
- calling: `encode`, `head`, `compile_encoder`, `head_module` (the head's first layer);
- costs and rules: `train_flops`, `param_groups` (weight decay by module type; new parameters at their own
  rate), `position_limit` / `usable_positions`.

What is refused, with the reason: DeBERTa-v2/v3 (pre-trained with replaced-token detection; hub checkpoints carry
no MLM head weights), configs that need custom code (`auto_map`: trust_remote_code stays off), decoder-only and
encoder-decoder models, and any other model type (listed with the supported ones).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from mlm_lightning.arguments import option
from mlm_lightning.errors import MLMError, check
from mlm_lightning.hub import load_pretrained

log = logging.getLogger("mlm_lightning")

VOCAB_MULTIPLE = 64  # new vocabularies are padded to this: the decoder matmul stays on aligned GPU tiles
NEVER = -1e4  # output bias of the padding ids: softmax gives them ~0, so nothing ever predicts them
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class Family:
    """How one model family is built and called."""

    model_class: str  # the transformers *ForMaskedLM class
    head: tuple[str, ...]  # the MLM head: these submodules applied in turn to the encoder's hidden states
    output_bias: str | None  # the head's vocabulary bias (padding ids get NEVER there), if it has one
    flops: Callable  # (config) -> (weights per token in the encoder, attention width, weights per head row)
    scratch: Callable | None = None  # (vocab, special ids, sizes) -> config of a new model; None: pretrained only
    tokenizer: str = "bert"  # the kind of tokenizer trained for a new model (data/tokenizer.py)
    position_offset: Callable = lambda config: 0  # positions a model reserves (RoBERTa: padding_idx + 1)
    norms: tuple[str, ...] = ()  # the family's own norm classes (no weight decay) beside torch's
    flash: bool = False  # `auto` attention takes flash_attention_2 where it is installed (it skips padding)
    notes: str = ""


def _bert_flops(c):
    h, i, n = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    e = getattr(c, "embedding_size", h)
    project = e * h if e != h else 0  # ALBERT/ELECTRA: embeddings projected to the hidden width
    return n * (4 * h * h + 2 * h * i) + project, n * h, h * e + e * c.vocab_size


def _distilbert_flops(c):
    h = c.dim
    return c.n_layers * (4 * h * h + 2 * h * c.hidden_dim), c.n_layers * h, h * h + h * c.vocab_size


def _modernbert_flops(c):
    h, i = c.hidden_size, c.intermediate_size
    # Wqkv + Wo, gated MLP (Wi is h -> 2i, Wo i -> h); SDPA runs the local layers' attention over the whole
    # sequence too (their window is a mask), so every layer counts the full width
    return c.num_hidden_layers * (4 * h * h + 3 * h * i), c.num_hidden_layers * h, h * h + h * c.vocab_size


def _bert_config(cls_name, **extra):
    def make(vocab, ids, s):
        return getattr(transformers, cls_name)(
            vocab_size=vocab, hidden_size=s["hidden_size"], num_hidden_layers=s["num_hidden_layers"],
            num_attention_heads=s["num_attention_heads"], intermediate_size=s["intermediate_size"],
            hidden_dropout_prob=s["dropout"], attention_probs_dropout_prob=s["dropout"], pad_token_id=ids["pad"],
            max_position_embeddings=s["max_position_embeddings"], **{k: f(s) for k, f in extra.items()},
        )
    return make


def _roberta_config(vocab, ids, s):
    config = _bert_config("RobertaConfig", type_vocab_size=lambda s: 1)(vocab, ids, s)
    # RoBERTa numbers positions from padding_idx + 1: n tokens need n + padding_idx + 1 embeddings
    config.max_position_embeddings = s["max_position_embeddings"] + ids["pad"] + 1
    config.bos_token_id, config.eos_token_id = ids["cls"], ids["sep"]
    return config


def _distilbert_config(vocab, ids, s):
    return transformers.DistilBertConfig(
        vocab_size=vocab, dim=s["hidden_size"], n_layers=s["num_hidden_layers"], n_heads=s["num_attention_heads"],
        hidden_dim=s["intermediate_size"], dropout=s["dropout"], attention_dropout=s["dropout"],
        max_position_embeddings=s["max_position_embeddings"], pad_token_id=ids["pad"],
    )


def _modernbert_config(vocab, ids, s):
    return transformers.ModernBertConfig(
        vocab_size=vocab, hidden_size=s["hidden_size"], num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"], intermediate_size=s["intermediate_size"],
        max_position_embeddings=s["max_position_embeddings"], attention_dropout=s["dropout"],
        mlp_dropout=s["dropout"], embedding_dropout=s["dropout"], pad_token_id=ids["pad"],
        cls_token_id=ids["cls"], sep_token_id=ids["sep"], bos_token_id=ids["cls"], eos_token_id=ids["sep"],
    )


def _roberta_offset(config):
    return (config.pad_token_id or 0) + 1


_ROBERTA = dict(head=("lm_head",), output_bias="lm_head.bias", flops=_bert_flops, position_offset=_roberta_offset)

FAMILIES: dict[str, Family] = {
    "bert": Family("BertForMaskedLM", ("cls",), "cls.predictions.bias", _bert_flops, _bert_config("BertConfig")),
    "roberta": Family("RobertaForMaskedLM", scratch=_roberta_config, tokenizer="roberta", **_ROBERTA),
    "xlm-roberta": Family("XLMRobertaForMaskedLM", **_ROBERTA, notes="pretrained only (as RoBERTa)"),
    "camembert": Family("CamembertForMaskedLM", **_ROBERTA, notes="pretrained only (as RoBERTa)"),
    "distilbert": Family(
        "DistilBertForMaskedLM", ("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
        "vocab_projector.bias", _distilbert_flops, _distilbert_config, tokenizer="distilbert",
    ),
    "albert": Family(
        "AlbertForMaskedLM", ("predictions",), "predictions.bias", _bert_flops,
        _bert_config("AlbertConfig", embedding_size=lambda s: min(128, s["hidden_size"])),
        notes="one layer's weights shared by all layers; factorized embeddings (128 wide)",
    ),
    "electra": Family(
        "ElectraForMaskedLM", ("generator_predictions", "generator_lm_head"), "generator_lm_head.bias",
        _bert_flops, _bert_config("ElectraConfig", embedding_size=lambda s: s["hidden_size"]),
        notes="the generator (an MLM); a discriminator checkpoint loads as a headless encoder",
    ),
    "modernbert": Family(
        "ModernBertForMaskedLM", ("head", "decoder"), "decoder.bias", _modernbert_flops, _modernbert_config,
        tokenizer="modernbert", flash=True,
        notes="rotary positions, local/global attention; flash_attention_2 (padding skipped) on a GPU with flash-attn",
    ),
}
SCRATCH = tuple(name for name, f in FAMILIES.items() if f.scratch is not None)
REFUSED = {
    "deberta-v2": "DeBERTa-v2/v3 was pre-trained with replaced-token detection and its checkpoints carry no MLM head"
    " weights (microsoft/DeBERTa#151): it would train a random head; continue a RoBERTa or ModernBERT instead",
}


# -- which family -------------------------------------------------------------------------------------------
class _ConfigDict:
    """`load_pretrained` for config.json as a plain dict: nothing is instantiated before it is checked."""

    @staticmethod
    def from_pretrained(name_or_path, **kwargs):
        return transformers.PretrainedConfig.get_config_dict(name_or_path, **kwargs)[0]


def family_of(config: dict, source: str) -> str:
    """The family name of a config dict read from a file (untrusted), or a one-line refusal saying why."""
    check(isinstance(config, dict), f"{source} has no valid model config")
    model_type = config.get("model_type")
    check(
        "auto_map" not in config,
        f"{source} needs custom code (auto_map in its config), which mlm-lightning does not run"
        " (trust_remote_code stays off); use a model that transformers supports natively",
    )
    check(model_type not in REFUSED, f"{source} is {model_type!r}: {REFUSED.get(model_type)}")
    supported = ", ".join(FAMILIES)
    check(
        not config.get("is_encoder_decoder"),
        f"{source} is an encoder-decoder (seq2seq) model ({model_type!r}); mlm-lightning trains masked-LM encoders:"
        f" {supported}",
    )
    check(
        model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        f"{source} is a decoder-only (causal) model ({model_type!r}) with no masked-LM head; mlm-lightning trains"
        f" masked-LM encoders: {supported}",
    )
    check(model_type in FAMILIES, f"{source} holds a {model_type!r} model, which is not supported; supported:"
          f" {supported}")
    check(not config.get("is_decoder"), f"{source} is configured as a decoder (is_decoder true); use an encoder config")
    return model_type


def family(model) -> Family:
    return FAMILIES[model.config.model_type]


def pretrained_config(name_or_path: str, what: str = "model_name_or_path"):
    """The config of a local dir or hub id, checked (refused families say why) before transformers reads it."""
    source = f"{what} {name_or_path!r}"
    family_of(load_pretrained(_ConfigDict, name_or_path, what), source)
    return load_pretrained(transformers.AutoConfig, name_or_path, what, trust_remote_code=False)


# -- building ------------------------------------------------------------------------------------------------
def check_attention(attn_implementation: str) -> None:
    check(attn_implementation in ATTENTION,
          f"attn_implementation must be one of {', '.join(ATTENTION)}, got {attn_implementation!r}")
    check(
        attn_implementation != "flash_attention_2" or importlib.util.find_spec("flash_attn") is not None,
        "attn_implementation flash_attention_2 needs the flash-attn package (a CUDA GPU):"
        " pip install 'mlm-lightning[flash]', or use sdpa",
    )


def resolve_attention(family: str, attn_implementation: str, half_on_cuda: bool = False) -> str:
    """`auto`: flash_attention_2 for a family that gains from it (ModernBERT: the kernel skips padding) when the
    run is on a CUDA GPU in 16/bf16 precision (flash-attn refuses fp32) and flash-attn is installed, else SDPA;
    any other choice stays as given."""
    if attn_implementation != "auto":
        return attn_implementation
    if half_on_cuda and FAMILIES[family].flash and transformers.utils.is_flash_attn_2_available():
        log.info("%s attention: flash_attention_2 (flash-attn is installed; padding is skipped);"
                 " --model.attn_implementation sdpa to turn it off", family)
        return "flash_attention_2"
    return "sdpa"


def load_pretrained_mlm(name_or_path: str, what: str = "model_name_or_path", attn_implementation: str = "sdpa",
                        half_on_cuda: bool = False):
    """(model, new parameter names): a pretrained masked LM in fp32 whatever dtype it was saved in.

    Missing encoder weights are an error; a missing MLM head (a headless encoder, a sentence-transformers model)
    is built new: its parameter names come back so that they can train at their own rate."""
    check_attention(attn_implementation)
    config = pretrained_config(name_or_path, what)
    fam = FAMILIES[config.model_type]
    cls = getattr(transformers, fam.model_class)
    model, info = load_pretrained(
        cls, name_or_path, what, config=config, attn_implementation=resolve_attention(config.model_type,
                                                                                      attn_implementation,
                                                                                      half_on_cuda),
        dtype=torch.float32, output_loading_info=True,
    )
    missing = sorted(info.get("missing_keys", []))
    head = tuple(f"{name}." for name in fam.head)
    encoder = [k for k in missing if not k.startswith(head)]
    check(
        not encoder,
        f"{what} {name_or_path!r} lacks {len(encoder)} {config.model_type} encoder weights (e.g. {encoder[:1]}); it"
        " is not a complete checkpoint",
    )
    new = new_parameter_names(model, missing)
    if new:
        log.warning("%s %r has no MLM head weights: the head starts from random values", what, name_or_path)
    return model, new


def new_parameter_names(model, missing) -> list[str]:
    """The names (as `named_parameters` gives them) of the parameters behind `missing` state-dict keys."""
    ids = set()
    for key in missing:
        try:
            ids.add(id(model.get_parameter(key)))
        except AttributeError:  # a buffer
            pass
    return [name for name, p in model.named_parameters() if id(p) in ids]


def from_config(config: dict, source: str, attn_implementation: str = "sdpa"):
    """A masked LM with random weights from a config dict read from a file (e.g. a checkpoint)."""
    fam = FAMILIES[family_of(config, source)]
    cls = getattr(transformers, fam.model_class)
    try:
        parsed = cls.config_class.from_dict(config)
    except (TypeError, ValueError) as e:
        raise MLMError(f"{source} has an invalid model config ({e})") from None
    return cls._from_config(parsed, attn_implementation=attn_implementation, dtype=torch.float32)


def new_model(architecture: str, tokenizer, attn_implementation: str = "sdpa", half_on_cuda: bool = False,
              **sizes):
    """A new masked LM of `architecture` for `tokenizer`, with the sizes given (hidden_size, ...)."""
    check(architecture in SCRATCH, f"architecture must be one of {', '.join(SCRATCH)}, got {architecture!r}")
    check_attention(attn_implementation)
    check(
        sizes["hidden_size"] % sizes["num_attention_heads"] == 0,
        f"hidden_size {sizes['hidden_size']} must be a multiple of num_attention_heads {sizes['num_attention_heads']}",
    )
    fam = FAMILIES[architecture]
    vocab = len(tokenizer)
    ids = {"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id}
    config = fam.scratch(-(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE, ids, sizes)
    model = getattr(transformers, fam.model_class)._from_config(
        config, attn_implementation=resolve_attention(architecture, attn_implementation, half_on_cuda))
    with torch.no_grad():  # the padding ids are no tokens: never predicted, by fill-mask or a pipeline
        model.get_parameter(fam.output_bias)[vocab:] = NEVER
    return model


def check_fits(model, tokenizer, source: str, fix: str = "use the tokenizer saved with the model") -> None:
    """The one load check of a (model, tokenizer) pair, for every command and loader: every id the tokenizer can
    produce (its vocabulary, its mask and other special tokens) must have a row in the model's embeddings; an id
    beyond them would fail deep inside the forward pass (IndexError), or train rows that do not exist. `model`: a
    model, or its config (every family's embeddings have `config.vocab_size` rows), to check before loading."""
    rows = model.vocab_size if isinstance(model, transformers.PretrainedConfig) else \
        model.get_input_embeddings().num_embeddings
    vocab = len(tokenizer)
    check(vocab <= rows, f"{source}: the tokenizer has {vocab} tokens but the model's embeddings hold {rows};"
                         f" the two do not belong together: {fix}")
    specials = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("mask", "pad", "cls", "sep", "unk")}
    specials.update({repr(t): i for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=True)})
    for name, token_id in specials.items():
        check(token_id is None or 0 <= token_id < rows,
              f"{source}: the tokenizer's {name} token has id {token_id}, beyond the model's {rows} embeddings;"
              f" the two do not belong together: {fix}")


SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings",
         "dropout")


def build(hparams, tokenizer, half_on_cuda: bool = False, extension=()):
    """(model, names of its new parameters): `model_name_or_path` (any supported family), or a new
    `architecture` with the sizes in `hparams` (all its parameters are new, but none is "new" next to others).
    `extension`: (id, piece ids) of the words `--data.extend_vocab` added to the pretrained model's tokenizer
    (`extend_embeddings`)."""
    attention = hparams.get("attn_implementation", "auto")
    if hparams.model_name_or_path:
        model, new = load_pretrained_mlm(hparams.model_name_or_path, attn_implementation=attention,
                                         half_on_cuda=half_on_cuda)
        if extension:
            extend_embeddings(model, len(tokenizer), extension)
        check_fits(model, tokenizer, option("model.model_name_or_path", hparams.model_name_or_path),
                   f"use the model's own tokenizer (leave {option('data.tokenizer')} unset)")
        return model, new
    model = new_model(hparams.get("architecture", "bert"), tokenizer, attention, half_on_cuda,
                      **{k: hparams[k] for k in SIZES})
    return model, []


def extend_embeddings(model, vocab: int, extension) -> None:
    """Room for a tokenizer of `vocab` ids (`resize_token_embeddings`, padded to `VOCAB_MULTIPLE`: every family's
    input embeddings, its decoder, tied or not, and the decoder's bias), and each added word's rows started at
    the mean of its pieces' rows (`extension`: (id, piece ids)): the input embedding row, the decoder row where
    it is not tied to it, and the bias entry. A new word then starts as the model's blend of what it read for
    the word so far, not as noise (transformers #33325 discusses the choices)."""
    fam, rows = family(model), model.get_input_embeddings().num_embeddings
    if vocab > rows:
        model.resize_token_embeddings(-(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE, mean_resizing=False)
    bias = model.get_parameter(fam.output_bias)
    with torch.no_grad():
        bias[max(rows, vocab):] = NEVER  # the padding ids are no tokens (as in `new_model`)
        for param in new_row_parameters(model):
            for token_id, pieces in extension:
                param[token_id] = param[pieces].mean(0)


def new_row_parameters(model) -> list[nn.Parameter]:
    """The parameters with one row (or entry) per vocabulary id: the input embeddings, the decoder where it is
    not tied to them, and the decoder's bias."""
    out = [model.get_input_embeddings().weight, model.get_parameter(family(model).output_bias)]
    decoder = model.get_output_embeddings()
    if decoder is not None and all(decoder.weight is not p for p in out):
        out.insert(1, decoder.weight)
    return out


def usable_positions(name_or_path: str) -> int:
    """How many tokens a pretrained model takes; an unsupported family is refused here, before any work."""
    return position_limit(pretrained_config(name_or_path))


# -- calling -------------------------------------------------------------------------------------------------

def encode(model, input_ids, attention_mask=None) -> torch.Tensor:
    """The encoder's last hidden states (no token_type_ids: a single segment is all zeros where they exist)."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]


def head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The MLM head's logits for hidden states of any leading shape (all positions, or the masked rows only)."""
    for name in family(model).head:
        hidden = getattr(model, name)(hidden)
    return hidden


def compile_encoder(model) -> None:
    model.base_model.compile(dynamic=None)


def head_module(model) -> nn.Module:
    """The MLM head's first linear layer (tests poison it to make a loss NaN)."""
    first = getattr(model, family(model).head[0])
    return next(m for m in first.modules() if isinstance(m, nn.Linear))


def position_limit(config) -> int:
    """The most tokens one sequence may have (RoBERTa's 514 position embeddings hold 512 tokens)."""
    return config.max_position_embeddings - FAMILIES[config.model_type].position_offset(config)


# -- optimization --------------------------------------------------------------------------------------------
def _norm_types(model) -> tuple[type, ...]:
    module = importlib.import_module(type(model).__module__)
    return (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, *(getattr(module, n) for n in family(model).norms))


def no_decay(model) -> set[int]:
    """ids of the parameters that get no weight decay: those of normalization modules (by type) and biases."""
    norms, out = _norm_types(model), set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, norms) or name == "bias" or name.endswith("_bias"):
                out.add(id(p))
    return out


def param_groups(model, weight_decay: float, new=(), head_learning_rate: float | None = None) -> list[dict]:
    """AdamW groups: weight decay or not (`no_decay`), and the `new` parameters (by name: random ones, e.g. a
    headless encoder's head) at `head_learning_rate`; the others get the optimizer's rate."""
    skip, new = no_decay(model), set(new)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name in new, id(p) in skip), []).append(p)
    out = []
    for (fresh, nodecay), params in sorted(groups.items()):
        group = {"params": params, "weight_decay": 0.0 if nodecay else weight_decay}
        if fresh and head_learning_rate is not None:
            group["lr"] = head_learning_rate
        out.append(group)
    return out


def train_flops(config, seq_len: int, n_tokens: int, n_head_rows: int) -> int:
    """Matmul FLOPs of one training step (forward + backward) of a masked LM with this `config`.

    Per token, the encoder multiplies by its weight matrices (the family's `flops` counts them: Q, K, V, O and
    the feed-forward per layer, plus any embedding projection), 2 FLOPs per weight (multiply + add); attention
    adds scores (QK^T) and values (AV), 2 * 2 * seq_len * width per layer. The MLM head (its transform and the
    decoder) runs on `n_head_rows` rows: the masked positions with `sparse_head`, every position without.
    Embeddings are lookups (no FLOPs). The backward pass costs twice the forward, so training = 3 x forward.
    Softmax, norms and activations are not matmuls and are left out, as in MFU figures elsewhere.
    """
    weights, width, head_weights = FAMILIES[config.model_type].flops(config)
    return 3 * (n_tokens * (2 * weights + 4 * seq_len * width) + n_head_rows * 2 * head_weights)


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
