"""The model card (`README.md`) every export writes: the hub's metadata and how the model was made and is used.

The card is published with the model, so nothing local goes into it: corpora by file or dataset name, a model
continued from a local directory by that directory's name only, and the command line with its paths cut to their
last part and secret-looking values masked (the rule of `data.corpus.redacted`, which also keeps them out of
`config.yaml` and the checkpoints). Everything read from a checkpoint is data: used only where its type is right.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex

from huggingface_hub import ModelCardData

from mlm_lightning.data.remote import SECRET, is_url, redacted
from mlm_lightning.metrics import VAL_ACC, VAL_LOSS, VAL_PPL

CARD = "README.md"
TAGS = ["mlm-lightning", "fill-mask"]
# a hub id: `name` or `owner/name`, letters, digits and -_. only (what the hub accepts)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def public_name(value: str) -> str:
    """What of a path or URL may be published: its last part (a file's or a directory's name)."""
    value = str(value)
    if is_url(value):
        value = re.sub(r"[?#].*", "", value.split("://", 1)[1])  # no query (signed URLs carry tokens there)
    return os.path.basename(os.path.normpath(value.replace("\\", "/"))) or value


def _looks_local(value: str) -> bool:
    return not is_url(value) and (value.startswith(("/", "./", "../", "~", "file:")) or os.path.exists(value)
                                  or "\\" in value)


def hub_id(name_or_path: str | None) -> str | None:
    """`name_or_path` if it is a hub id (not a local directory), else None."""
    if not isinstance(name_or_path, str) or not HUB_ID.fullmatch(name_or_path) or _looks_local(name_or_path):
        return None
    return name_or_path


def masked_command(args: list[str]) -> str:
    """`mlm-lightning ARGS` as published: secret-looking option values (`--...key value`, `--x.token=...`, and
    the keys of a JSON/YAML mapping such as `--data.storage_options`) masked, local paths cut to their names."""
    out, hide_next = [], False
    for arg in map(str, args):
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if SECRET.search(name.rsplit(".", 1)[-1]):
                out.append(f"{name}=***" if eq else name)
                hide_next = not eq
                continue
            out.append(f"{name}={_published_value(value)}" if eq else arg)
        else:
            out.append(_published_value(arg))
    return shlex.join(["mlm-lightning", *out])


def _published_value(value: str) -> str:
    if value[:1] in "{[":
        try:
            return json.dumps(_public_mapping(redacted(json.loads(value))))
        except ValueError:
            pass
    if re.search(r"://[^/@]*:[^/@]*@", value):  # credentials in a URL (s3://key:secret@host/...)
        value = re.sub(r"://[^/@]*@", "://***@", value)
    return public_name(value) if _looks_local(value) else value


def _public_mapping(value):
    if isinstance(value, dict):
        return {k: _public_mapping(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public_mapping(v) for v in value]
    return public_name(value) if isinstance(value, str) and _looks_local(value) else value


def corpus_names(data: dict) -> list[str]:
    """The corpora of a run's data options (a checkpoint's `datamodule_hyper_parameters`), by name only."""
    names = []
    dataset = data.get("dataset_name")
    if isinstance(dataset, str) and dataset:
        names.append(hub_id(dataset) or public_name(dataset))
    sources = data.get("train_files")
    sources = sources if isinstance(sources, list) else [sources]
    for source in sources:
        if isinstance(source, dict):
            name = source.get("name") if isinstance(source.get("name"), str) else source.get("path")
            if isinstance(name, str) and name:
                names.append(public_name(name))
        elif isinstance(source, str) and source:
            names.append(public_name(source))
    if data and not names:
        names.append("the offline default corpus (CPython's language reference and standard-library docstrings)")
    return names


def checkpoint_facts(checkpoint: dict) -> dict:
    """What a checkpoint (its dict, read with `weights_only=True`) says of how its model was trained."""
    facts: dict = {}
    hparams = checkpoint.get("hyper_parameters")
    data = checkpoint.get("datamodule_hyper_parameters")
    facts["model_options"] = hparams if isinstance(hparams, dict) else {}
    facts["data_options"] = data if isinstance(data, dict) else {}
    step = checkpoint.get("global_step")
    if isinstance(step, int) and not isinstance(step, bool):
        facts["steps"] = step
    for state in (checkpoint.get("callbacks") or {}).values() if isinstance(checkpoint.get("callbacks"), dict) else ():
        if isinstance(state, dict) and state.get("monitor") == VAL_LOSS:
            score = state.get("best_model_score")
            try:
                facts[VAL_LOSS] = float(score)
            except (TypeError, ValueError):
                pass
    return facts


def render(model, tokenizer, facts: dict | None = None, license: str | None = None) -> str:
    """The card's text: YAML metadata the hub reads, then how the model was trained and how to use it."""
    facts = facts or {}
    options, data = facts.get("model_options") or {}, facts.get("data_options") or {}
    config = model.config
    family = config.model_type
    start = options.get("model_name_or_path")
    base = hub_id(start)
    metadata = ModelCardData(library_name="transformers", pipeline_tag="fill-mask", license=license or None,
                             base_model=base, tags=[*TAGS, family])
    hidden = getattr(config, "hidden_size", getattr(config, "dim", None))
    layers = getattr(config, "num_hidden_layers", getattr(config, "n_layers", None))
    params = sum(p.numel() for p in model.parameters())
    lines = ["# Masked-language model", "", f"A {family} masked-language model trained with mlm-lightning"
             " (PyTorch Lightning).", "", "## Training", ""]
    if start:
        lines.append(f"- Continued from: `{base or public_name(start)}`" + ("" if base else " (a local model)"))
    else:
        lines.append("- Trained from scratch")
    lines.append(f"- Family: {family}; {layers} layers, hidden size {hidden}, {_count(params)} parameters")
    kind = "the base model's own" if start and not data.get("tokenizer") else data.get("tokenizer_kind")
    lines.append(f"- Vocabulary: {len(tokenizer)} tokens ({kind or type(tokenizer).__name__}"
                 f"{', trained on the corpus' if not start and not data.get('tokenizer') and data else ''})")
    if data:
        lines.append(f"- Corpus: {', '.join(corpus_names(data))}")
        if isinstance(data.get("max_length"), int):
            lines.append(f"- Sequence length: {data['max_length']} tokens; mask probability"
                         f" {data.get('mlm_probability', 0.15)}")
    if isinstance(facts.get("tokens"), int):
        lines.append(f"- Tokens seen: {facts['tokens']:,}")
    if isinstance(facts.get("steps"), int):
        lines.append(f"- Optimizer steps: {facts['steps']:,}")
    results = [f"{key} {facts[key]:.4g}" for key in (VAL_PPL, VAL_ACC) if _finite(facts.get(key))]
    if results:
        lines.append(f"- Last validation: {', '.join(results)}")
    if _finite(facts.get(VAL_LOSS)):
        loss = facts[VAL_LOSS]
        lines.append(f"- This checkpoint's {VAL_LOSS}: {loss:.4g} ({VAL_PPL} {math.exp(min(loss, 700)):.4g})")
    if facts.get("command"):
        lines += ["", "Command:", "", "```bash", facts["command"], "```"]
    mask = tokenizer.mask_token
    example = f"The capital of France is {mask}."
    lines += ["", "## Use", "", "```python", "from transformers import pipeline", "",
              'fill = pipeline("fill-mask", model="path/to/this/directory")',
              f"print(fill({example!r}))", "```", "",
              f"The mask token is `{mask}`. From the command line: `mlm-lightning fill-mask --model DIR"
              f" {shlex.quote(example)}`."]
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
