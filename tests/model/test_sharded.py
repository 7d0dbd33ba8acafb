"""Export from sharded checkpoint directories (FSDP's `torch.distributed.checkpoint` layout), safely."""

import os
import pickle

import pytest
import torch
import torch.multiprocessing as mp

from mlm_lightning.errors import MLMError
from mlm_lightning.model.checkpoint import load_checkpoint
from tests.support.cli import TINY_DATA, TINY_MODEL, error_line, free_port, run_cli
from tests.support.models import write_sharded_checkpoint


@pytest.fixture(scope="module")
def checkpoints(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    assert run_cli("fit", "--data.train_files", corpus, *TINY_MODEL, *TINY_DATA, "--trainer.max_steps", "3",
                   "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(root),
                   "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "3") == 0
    full = str(root / "checkpoints" / "last.ckpt")
    sharded = str(root / "sharded.ckpt")
    mp.spawn(write_sharded_checkpoint, args=(2, full, sharded, free_port()), nprocs=2, join=True)
    return full, sharded


@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_export_from_a_sharded_checkpoint_equals_the_full_one(checkpoints, tmp_path):
    full, sharded = checkpoints
    shards = sorted(n for n in os.listdir(sharded) if n.endswith(".distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"] and all(os.path.getsize(f"{sharded}/{n}") > 1000 for n in shards)
    a, _ = load_checkpoint(full)
    b, tokenizer = load_checkpoint(sharded)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert tokenizer.mask_token == "[MASK]"
    assert run_cli("export", "--ckpt_path", sharded, "--export_dir", str(tmp_path / "out")) == 0
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARK', '/tmp/mlm-evil-mark')}",))


def test_a_crafted_sharded_index_is_not_unpickled(checkpoints, tmp_path, monkeypatch):
    _, sharded = checkpoints
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    for name in os.listdir(sharded):
        (crafted / name).write_bytes(open(f"{sharded}/{name}", "rb").read())
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    (crafted / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(MLMError, match="not a readable sharded checkpoint"):
        load_checkpoint(str(crafted))
    assert not mark.exists()


def test_a_plain_directory_is_not_a_checkpoint(tmp_path, capsys):
    assert run_cli("export", "--ckpt_path", str(tmp_path), "--export_dir", str(tmp_path / "x")) == 2
    assert "is not a checkpoint" in error_line(capsys.readouterr().err)
