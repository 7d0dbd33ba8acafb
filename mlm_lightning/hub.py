"""Loading Hugging Face models, configs and tokenizers: a local directory or a hub id, offline-aware."""

from __future__ import annotations

import os

from mlm_lightning.errors import MLMError, check, first_line


def quiet_transformers() -> None:
    """Silence transformers' progress bars and info chatter (warnings and errors still show): for the CLI."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_pretrained(cls, name_or_path: str, what: str, **kwargs):
    """`cls.from_pretrained`, with a one-line error when a hub id is not available offline.

    A local directory is used as is. A hub id is looked up in the local Hugging Face cache first, then
    on the network; when both fail the message says a network or a local directory is needed.
    """
    if os.path.isdir(name_or_path):
        try:
            return cls.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError) as e:
            raise MLMError(f"{what}: {name_or_path!r} is not a valid Hugging Face directory ({first_line(e)})") from e
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    check(
        not looks_like_path,
        f"{what}: {name_or_path!r} does not exist; pass a local directory or a hub id like bert-base-uncased",
    )
    try:
        return cls.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        try:
            return cls.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError):
            pass
    raise MLMError(
        f"{what}: {name_or_path!r} is not a local directory and is not in the Hugging Face cache, and it could"
        " not be downloaded; it needs a network, or pass a local directory (save_pretrained output)"
    )
