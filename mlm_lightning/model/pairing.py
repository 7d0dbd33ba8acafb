"""What a model brings to its data, for every entry point (the CLI, Python scripts, notebooks).

- A pretrained model brings its own tokenizer (`data.tokenizer`), its length (`data.max_length`: its positions,
  at most 512, or fewer where its tokenizer says it was trained on shorter examples) and a fine-tuning learning
  rate (`model.learning_rate` 5e-5: the from-scratch 1e-3 wrecks pretrained weights).
- A new model's architecture brings its tokenizer kind (`data.tokenizer_kind`: RoBERTa a byte-level BPE with
  <mask>, ModernBERT its own BPE, DistilBERT a WordPiece without token types).
- `torch.compile` on line-by-line batches pads lengths to multiples of 64 (a handful of shapes to compile).
Options the caller gave always win. A tokenizer that is not the pretrained model's own must have its vocabulary:
anything else is refused in one line, in the caller's terms (`arguments.option`).

The CLI applies `paired_options` when it parses (so `--print_config` shows the result); `MLMDataModule` applies
it before it trains or loads a tokenizer, from what the Python caller passed (`given_arguments`).
"""

from __future__ import annotations

from collections.abc import Callable

from mlm_lightning.arguments import option
from mlm_lightning.errors import check

FINETUNE_LEARNING_RATE = 5e-5
MAX_PRETRAINED_LENGTH = 512  # BERT's own; longer models cost quadratic attention for a default
COMPILE_PAD_MULTIPLE = 64


def paired_options(model: dict, data: dict, given: Callable[[str], bool],
                   positions: Callable[[str], int] | None = None) -> dict[str, tuple[object, str]]:
    """{"data.tokenizer": (value, why), ...}: what the model brings to options not `given` (a dotted key test).

    `positions(name_or_path)`: the examples' length a pretrained model takes by default (None: leave it)."""
    from mlm_lightning.model.arch import FAMILIES  # (transformers: only once options are paired)

    changes: dict[str, tuple[object, str]] = {}
    pretrained = model.get("model_name_or_path")
    check(pretrained or not data.get("extend_vocab"),
          f"{option('data.extend_vocab')} adds domain words to a pretrained model's vocabulary: it needs"
          f" {option('model.model_name_or_path')}; a model trained from scratch gets a vocabulary trained on its"
          " corpus, which fits it already")
    if pretrained:
        if not given("data.tokenizer"):
            changes["data.tokenizer"] = (pretrained, "the model's own tokenizer")
        if not given("model.learning_rate"):
            changes["model.learning_rate"] = (FINETUNE_LEARNING_RATE, "fine-tuning a pretrained model")
        if not given("data.max_length") and positions is not None:
            length = int(positions(pretrained))
            changes["data.max_length"] = (min(length, MAX_PRETRAINED_LENGTH), f"the model's {length} positions")
    elif model.get("architecture") in FAMILIES and not given("data.tokenizer_kind"):
        kind = FAMILIES[model["architecture"]].tokenizer
        changes["data.tokenizer_kind"] = (kind, f"a new {model['architecture']}'s tokenizer")
    if model.get("compile") and data.get("line_by_line") and not given("data.pad_to_multiple_of"):
        changes["data.pad_to_multiple_of"] = (COMPILE_PAD_MULTIPLE, "torch.compile: few distinct batch shapes")
    return {k: v for k, v in changes.items() if _current(model, data, k) != v[0]}


def default_length(name_or_path: str) -> int:
    """The positions a pretrained model's examples may use by default: its position embeddings', or fewer where its
    tokenizer says it was trained on shorter examples (an export of a model trained from scratch)."""
    from mlm_lightning.data.tokenizer import tokenizer_length_limit
    from mlm_lightning.model.arch import usable_positions

    positions = usable_positions(name_or_path)
    limit = tokenizer_length_limit(name_or_path)
    return min(positions, limit) if limit else positions


def _current(model: dict, data: dict, key: str):
    group, _, name = key.partition(".")
    return (model if group == "model" else data).get(name)


def check_tokenizer_fits(tokenizer, model_name_or_path: str, tokenizer_source: str | None,
                         added: frozenset[int] = frozenset()) -> None:
    """Refuse a tokenizer the pretrained model was not trained with: where the model has a tokenizer of its own to
    compare with, another vocabulary (one trained on the corpus, or another dir). `added`: the ids of domain words
    `--data.extend_vocab` added to the model's own (the rest must be the model's own). (A tokenizer larger than the
    embeddings is refused earlier, by `arch.check_fits`; the model's own may be smaller than its embeddings:
    vocabularies padded to a multiple of 64, ModernBERT's.)"""
    if tokenizer_source == model_name_or_path and not added:
        return
    own = _own_vocab(model_name_or_path)
    shown = repr(tokenizer_source) if tokenizer_source else "trained on the corpus"
    vocab = {t: i for t, i in tokenizer.get_vocab().items() if i not in added}
    check(own is None or own == vocab,
          f"the tokenizer ({shown}) has another vocabulary than the model {model_name_or_path!r} was trained with"
          f" (its ids would index the wrong embeddings); use the model's own: leave {option('data.tokenizer')}"
          f" unset (or set it to {model_name_or_path!r})")


def _own_vocab(name_or_path: str) -> dict | None:
    """The vocabulary of the tokenizer stored with a pretrained model, or None where it has none (a headless
    encoder, an unreadable one)."""
    from transformers import AutoTokenizer

    from mlm_lightning.hub import load_pretrained

    try:
        return load_pretrained(AutoTokenizer, name_or_path, "tokenizer").get_vocab()
    except Exception:  # noqa: BLE001 - no tokenizer of its own: nothing to compare with
        return None
