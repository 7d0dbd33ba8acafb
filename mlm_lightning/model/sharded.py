"""Reading checkpoint *directories*: sharded `torch.distributed.checkpoint` ones (Lightning's FSDP with
`state_dict_type="sharded"`) and DeepSpeed ones, into the plain checkpoint dict a `.ckpt` file holds.

Why not Lightning's `consolidate_checkpoint`: `torch.distributed.checkpoint` unpickles the `.metadata` file
and every non-tensor entry with plain `pickle` (`weights_only=False`), so a crafted directory could run code.
Here the metadata goes through a restricted unpickler that allows only the index's own classes (torch's
weights-only unpickler cannot read the pickle protocol it is written with), only the model's tensors are read
(not the optimizer state), and Lightning's `meta.pt` is loaded with `weights_only=True`.
"""

from __future__ import annotations

import os

import torch

from mlm_lightning.errors import MLMError, check

META_FILE = "meta.pt"  # what Lightning's FSDP strategy writes beside the shards (everything but tensors)


def kind(path: str) -> str | None:
    """'dcp' or 'deepspeed' for a checkpoint directory, else None."""
    if os.path.isfile(os.path.join(path, ".metadata")):
        return "dcp"
    if os.path.isfile(os.path.join(path, "latest")) or os.path.isdir(os.path.join(path, "checkpoint")):
        return "deepspeed"
    return None


def _safe_reader(path: str):
    import pickle

    from torch.distributed.checkpoint import FileSystemReader, metadata

    # everything a `.metadata` index holds (torch 2.4-2.13), and nothing that can run code
    allowed = {
        ("torch.distributed.checkpoint.metadata", n) for n in (
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
            "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
    } | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
         ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "Path")}

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in allowed or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(os.path.join(path, ".metadata"), "rb") as f:
                meta = Restricted(f).load()
            check(isinstance(meta, metadata.Metadata), f"{path!r}: its .metadata is not a checkpoint index")
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = metadata.StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    return SafeReader(path)


def load_dcp(path: str) -> dict:
    """A Lightning FSDP sharded checkpoint directory -> {'state_dict': full tensors, **meta.pt}."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class ModelOnly(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item, value):  # (no bytes entries are expected under "model")
            raise MLMError(f"{path!r} holds non-tensor data among the model weights; refusing to unpickle it")

    from torch.distributed.checkpoint.api import CheckpointException  # (a BaseException)

    state: dict = {}
    try:
        _load_state_dict(state, storage_reader=_safe_reader(path), planner=ModelOnly(keys={"model"}), no_dist=True)
    except (Exception, CheckpointException) as e:  # e.g. the unpickler refused a class
        reason = " ".join(str(e).split())[:200]
        raise MLMError(f"{path!r} is not a readable sharded checkpoint ({reason})") from None
    check("model" in state, f"{path!r} holds no model weights (no 'model' entry)")
    extra_file = os.path.join(path, META_FILE)
    extra = torch.load(extra_file, map_location="cpu", weights_only=True) if os.path.isfile(extra_file) else {}
    check(isinstance(extra, dict), f"{path!r}: its {META_FILE} is not a checkpoint")
    return {**extra, "state_dict": state["model"]}


def load_deepspeed(path: str) -> dict:
    """A DeepSpeed checkpoint directory -> a plain checkpoint dict, with Lightning's converter.

    DeepSpeed's own reader unpickles its files: use it on checkpoints you wrote yourself."""
    try:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    except ImportError as e:  # pragma: no cover - needs deepspeed
        raise MLMError(f"{path!r} is a DeepSpeed checkpoint; reading it needs `pip install deepspeed`") from e
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "model.ckpt")
        try:
            convert_zero_checkpoint_to_fp32_state_dict(path, out)
        except ImportError as e:
            raise MLMError(f"{path!r} is a DeepSpeed checkpoint; reading it needs `pip install deepspeed`") from e
        return torch.load(out, map_location="cpu", weights_only=True)


def load_directory(path: str) -> dict:
    found = kind(path)
    check(
        found is not None,
        f"{path!r} is a directory but not a checkpoint (expected a .ckpt file, or a sharded FSDP/DeepSpeed"
        " checkpoint directory)",
    )
    return load_dcp(path) if found == "dcp" else load_deepspeed(path)
