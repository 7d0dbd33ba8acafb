"""`export --format onnx`: model.onnx beside the Hugging Face files, with dynamic batch and sequence axes, equal to
PyTorch through onnxruntime on the CPU (1e-4) for every family; `serve --backend onnx` answers as torch does."""

import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers

from mlm_lightning.export import save_hf
from mlm_lightning.model import arch
from mlm_lightning.model.fill_mask import FillMasker
from mlm_lightning.model.score import Scorer
from mlm_lightning.onnx_export import save_onnx
from mlm_lightning.serve.onnx_backend import OnnxFillMasker
from tests.support.cli import error_line, run_cli
from tests.support.models import TINY, tiny_model
from tests.support.text import sentences

VOCAB = 128


def tiny(family: str):
    """A random tiny masked LM of `family` (pretrained-only families from their RoBERTa-shaped config)."""
    torch.manual_seed(0)
    ids = {"pad": 1, "cls": 0, "sep": 2}
    scratch = arch.FAMILIES[family].scratch or arch.FAMILIES["roberta"].scratch
    config = scratch(VOCAB, ids, TINY).to_dict()
    config["model_type"] = family
    return arch.from_config(config, "test").eval()


def inputs(batch: int, length: int, names: list[str]) -> dict:
    """Another batch and length than the export's example (2 x 16), with padding in one row."""
    gen = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, length // 2 :] = 0
    ids[0, length // 2 :] = 1
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {n: feed[n] for n in names}


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    """(dir, model, tokenizer): a tiny BERT exported with --format onnx, once for the fast tests (an export
    takes ~5 s on an idle 2-core machine)."""
    tmp = tmp_path_factory.mktemp("onnx")
    hf = tiny_model(tmp)
    model = transformers.AutoModelForMaskedLM.from_pretrained(hf).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    torch.manual_seed(1)
    with torch.no_grad():  # weights larger than the init's: scores far from uniform, so that padding shows
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return save_hf(model, tok, str(tmp / "onnx-export"), fmt="onnx"), model, tok


def assert_parity(model, path) -> list[str]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    graph = onnx.load(path, load_external_data=False).graph
    for value in [*graph.input, *graph.output]:  # batch and sequence are named (dynamic) axes
        assert all(d.dim_param for d in value.type.tensor_type.shape.dim[:2]), value
    for batch, length in ((1, 7), (3, 23), (5, 40)):
        feed = inputs(batch, length, names)
        (logits,) = session.run(["logits"], {k: v.numpy() for k, v in feed.items()})
        with torch.no_grad():
            expected = model(**feed).logits.numpy()
        real = feed["attention_mask"].numpy().astype(bool)  # (a padded position's logits are no answer)
        assert logits.shape == expected.shape
        np.testing.assert_allclose(logits[real], expected[real], atol=1e-4, rtol=0)
    return names


def test_bert_exports_to_onnx_with_token_types_and_the_same_logits(bert_onnx):
    out, model, _ = bert_onnx
    names = assert_parity(model, os.path.join(out, "model.onnx"))
    assert names == ["input_ids", "attention_mask", "token_type_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in arch.FAMILIES if f != "bert"])
def test_every_family_exports_to_onnx_with_the_same_logits(family, tmp_path):
    model = tiny(family)
    names = assert_parity(model, save_onnx(model, str(tmp_path)))
    assert ("token_type_ids" in names) == (family in ("albert", "electra"))


def test_export_format_onnx_writes_model_onnx_in_the_manifest(bert_onnx, tmp_path):
    out, model, tok = bert_onnx
    names = sorted(os.listdir(out))
    assert "model.onnx" in names and "README.md" in names and "config.json" in names
    with open(os.path.join(out, ".mlm-lightning-export")) as f:
        assert "model.onnx" in json.load(f)["files"]  # a later export replaces it; nothing else is touched
    again = str(tmp_path / "again")
    shutil.copytree(out, again)
    save_hf(model, tok, again)  # an hf export over it: model.onnx (its own) is gone
    assert "model.onnx" not in os.listdir(again)


def test_the_onnx_backend_answers_as_torch(bert_onnx):
    out, model, tok = bert_onnx
    texts = [s.replace("dog", "[MASK]").replace("ball", "[MASK]") for s in sentences(40, seed=3)]
    texts = [t if "[MASK]" in t else "[MASK] " + t for t in texts] + ["[MASK] " * 3 + "sees a tree ."]
    for kwargs in ({}, {"targets": ["cat", "bird", "tree"]}):  # (one batch of unequal lengths: padding)
        ours = OnnxFillMasker(out, top_k=7, batch_size=64)(texts, **kwargs)
        expected = FillMasker(model, tok, top_k=7, batch_size=64)(texts, **kwargs)
        for a, b in zip(ours, expected, strict=True):
            for pa, pb in zip(a["predictions"], b["predictions"], strict=True):
                assert [c["token"] for c in pa] == [c["token"] for c in pb]
                np.testing.assert_allclose([c["score"] for c in pa], [c["score"] for c in pb], atol=1e-4, rtol=0)


def test_score_on_the_onnx_backend_equals_torchs(bert_onnx):
    """`/api/score` scores with the serving backend's logits: ONNX Runtime's under --backend onnx."""
    out, model, tok = bert_onnx
    texts = sentences(12, seed=5)
    onnx_masker = OnnxFillMasker(out)
    ours = Scorer(onnx_masker.model, onnx_masker.tokenizer, "cpu", batch_size=16, logits=onnx_masker._logits)
    expected = Scorer(model, tok, "cpu", batch_size=16)
    for variant in ("original", "word_l2r"):
        for a, b in zip(ours(texts, variant), expected(texts, variant), strict=True):
            np.testing.assert_allclose([t["log_prob"] for t in a["tokens"]], [t["log_prob"] for t in b["tokens"]],
                                       atol=1e-4, rtol=0)


@pytest.mark.parametrize("extra, message", [
    ((), "has no model.onnx: export it with mlm-lightning export --format onnx"),
    (("--device", "cuda"), "--backend onnx runs on the CPU"),
])
def test_serve_backend_onnx_refusals_are_one_line(tmp_path, capsys, extra, message):
    out = tiny_model(tmp_path)
    assert run_cli("serve", "--model", out, "--backend", "onnx", "--port", "0", *extra) != 0
    assert message in error_line(capsys.readouterr().err)
