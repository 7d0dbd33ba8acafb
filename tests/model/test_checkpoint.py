"""What a checkpoint may carry: its embedded tokenizer is refused when it asks for code."""

import copy
import json

import pytest
import torch

from mlm_lightning.errors import MLMError
from mlm_lightning.model.checkpoint import load_checkpoint
from tests.support.cli import fit_args, run_cli


@pytest.fixture(scope="module")
def ckpt(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    assert run_cli(*fit_args(corpus, root, "--trainer.max_steps", "2")) == 0
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)


def test_a_tokenizer_asking_for_custom_code_is_refused(ckpt, tmp_path):
    ckpt = copy.deepcopy(ckpt)
    files = ckpt["mlm_lightning"]["tokenizer_files"]
    config = json.loads(files["tokenizer_config.json"])
    files["tokenizer_config.json"] = json.dumps({**config, "auto_map": {"AutoTokenizer": ["evil.Tok", None]}})
    torch.save(ckpt, tmp_path / "c.ckpt")
    with pytest.raises(MLMError, match=r"asks for custom code \(auto_map\); refusing it"):
        load_checkpoint(str(tmp_path / "c.ckpt"))


def test_the_checkpoint_itself_loads(ckpt, tmp_path):
    torch.save(ckpt, tmp_path / "ok.ckpt")
    model, tokenizer = load_checkpoint(str(tmp_path / "ok.ckpt"))
    assert tokenizer.mask_token == "[MASK]" and not model.training
