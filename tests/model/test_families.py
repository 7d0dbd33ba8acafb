"""Every supported model family: built from scratch and loaded pretrained, the sparse head, pipeline parity, what
skips weight decay, FLOPs, positions, refusals, headless encoders (tiny models, tokenizers trained locally)."""

import json

import pytest
import torch
import transformers
from torch import nn
from transformers import pipeline

from mlm_lightning.data.masking import MaskingCollator
from mlm_lightning.errors import MLMError
from mlm_lightning.export import save_hf
from mlm_lightning.model import arch
from mlm_lightning.model.checkpoint import load_model
from mlm_lightning.model.fill_mask import FillMasker
from mlm_lightning.serve.app import FillRequest, make_work
from tests.support.cli import fit_args, run_cli
from tests.support.models import family_export, family_tokenizer, module
from tests.support.runs import metric, state
from tests.support.server import assert_same_candidates
from tests.support.text import sentences

SCRATCH = list(arch.SCRATCH)


def test_six_families_train_from_scratch_and_two_more_load_pretrained():
    assert set(SCRATCH) == {"bert", "roberta", "distilbert", "albert", "electra", "modernbert"}
    assert {"xlm-roberta", "camembert"} <= set(arch.FAMILIES)


@pytest.mark.parametrize("architecture", SCRATCH)
def test_new_model_parity_with_the_pipeline(tmp_path, architecture):
    """The export in transformers' fill-mask pipeline gives fill-mask's and the server's top-k, with the family's own
    mask token and with [MASK]; the vocabulary is padded to 64 and the padding ids are never predicted."""
    path, model = family_export(tmp_path, architecture)
    net, tok = load_model(path)
    assert net.config.model_type == architecture and type(net).__name__ == arch.FAMILIES[architecture].model_class
    assert net.config.vocab_size % 64 == 0 and net.config.vocab_size > len(tok)
    if architecture != "bert" and architecture not in ("albert", "electra"):
        assert "token_type_ids" not in tok("a b")  # only the families that have token types get them
    text = f"the cat {tok.mask_token} the ball ."
    expected = pipeline("fill-mask", model=path, device="cpu")(text, top_k=5)
    masker = FillMasker(net, tok, top_k=5)
    for given in (text, "the cat [MASK] the ball ."):
        assert_same_candidates(masker([given])[0]["predictions"][0], expected)
    served = json.loads(make_work(masker)([FillRequest([text], True, 5, True)])[0])
    assert_same_candidates(served, expected)
    with torch.no_grad():
        ids = tok(text, return_tensors="pt")["input_ids"]
        logits = arch.head(net, arch.encode(net, ids))
    assert logits[..., len(tok):].max() < -1e3  # padding ids: never predicted


@pytest.mark.parametrize("architecture", SCRATCH)
def test_sparse_loss_equals_dense_loss(tmp_path, architecture):
    tok = family_tokenizer(tmp_path, architecture)
    collate = MaskingCollator(tok, mlm_probability=0.3)
    examples = [{"input_ids": tok(s)["input_ids"], "mask_seed": i} for i, s in enumerate(sentences(8))]
    batch = collate(examples)
    assert "attention_mask" in batch  # padded: the mask reaches every family's encoder
    losses = []
    for sparse in (True, False):
        m = module(tok, architecture=architecture, sparse_head=sparse)
        logits, labels = m(batch)
        losses.append(torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100))
    full = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert abs(losses[0] - losses[1]) < 1e-5 and abs(losses[1] - full.loss) < 1e-5


@pytest.mark.parametrize("architecture", ["roberta", "modernbert"])
def test_masking_never_picks_the_familys_special_tokens(tmp_path, architecture):
    tok = family_tokenizer(tmp_path, architecture)
    collate = MaskingCollator(tok, mlm_probability=0.9)
    batch = collate([{"input_ids": tok(s)["input_ids"], "mask_seed": i} for i, s in enumerate(sentences(16))])
    special = torch.tensor(tok.all_special_ids)
    assert not torch.isin(batch["masked_labels"], special).any()
    assert batch["masked_labels"].numel() > 50


@pytest.mark.parametrize("family", ["xlm-roberta", "camembert"])
def test_pretrained_only_families_load_and_match_the_pipeline(tmp_path, family):
    tok = family_tokenizer(tmp_path, "roberta")
    config_class = {"xlm-roberta": transformers.XLMRobertaConfig, "camembert": transformers.CamembertConfig}[family]
    config = config_class(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=66, pad_token_id=tok.pad_token_id,
                          type_vocab_size=1)
    torch.manual_seed(0)
    model = getattr(transformers, arch.FAMILIES[family].model_class)(config)
    path = save_hf(model.eval(), tok, str(tmp_path / family))
    net, new = arch.load_pretrained_mlm(path)
    assert new == [] and arch.position_limit(net.config) == 64  # 66 RoBERTa positions hold 64 tokens
    text = f"the dog {tok.mask_token} a tree ."
    expected = pipeline("fill-mask", model=path, device="cpu")(text, top_k=3)
    assert_same_candidates(FillMasker(net, tok, top_k=3)([text])[0]["predictions"][0], expected)


def test_tokenizer_kinds_have_their_own_cache_keys(tmp_path, corpus):
    from mlm_lightning.data import MLMDataModule

    dirs = {}
    for kind in ("bert", "roberta"):
        dm = MLMDataModule(train_files=corpus, tokenizer_kind=kind, vocab_size=300, cache_dir=str(tmp_path))
        dm.prepare_data()
        dirs[kind] = (dm._tokenizer_dir(), dm._data_dir())
        assert dm.tokenizer.mask_token == {"bert": "[MASK]", "roberta": "<mask>"}[kind]
    assert dirs["bert"][0] != dirs["roberta"][0] and dirs["bert"][1] != dirs["roberta"][1]
    assert "wordpiece-" in dirs["bert"][0]  # BERT's caches written before the other kinds came stay valid
    with pytest.raises(MLMError, match="tokenizer_kind must be one of"):
        MLMDataModule(train_files=corpus, tokenizer_kind="gpt2")


def test_half_precision_dirs_load_with_fp32_weights(tmp_path):
    path, model = family_export(tmp_path, "roberta")
    model.to(torch.bfloat16).save_pretrained(path)
    assert json.loads((tmp_path / "export-roberta" / "config.json").read_text())["dtype"] == "bfloat16"
    net, _ = arch.load_pretrained_mlm(path)
    assert {p.dtype for p in net.parameters()} == {torch.float32}


@pytest.mark.parametrize("architecture", SCRATCH)
def test_no_weight_decay_on_norms_and_biases_by_module_type(tmp_path, architecture):
    m = module(family_tokenizer(tmp_path, architecture), architecture=architecture).model
    skip = arch.no_decay(m)
    for name, mod in m.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if isinstance(mod, nn.LayerNorm) or pname == "bias":
                assert id(p) in skip, f"{name}.{pname}"
            if isinstance(mod, (nn.Linear, nn.Embedding)) and pname == "weight":
                assert id(p) not in skip, f"{name}.{pname}"
    groups = arch.param_groups(m, 0.01)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.01] and all("lr" not in g for g in groups)


@pytest.mark.parametrize("architecture", ["bert", "roberta", "distilbert", "electra", "modernbert"])
def test_train_flops_count_every_matmul_weight(tmp_path, architecture):
    """The family's formula agrees with the model's own linear layers (layers unshared: each weight used once)."""
    m = module(family_tokenizer(tmp_path, architecture), architecture=architecture).model
    encoder = sum(mod.weight.numel() for mod in m.base_model.modules() if isinstance(mod, nn.Linear))
    head = sum(mod.weight.numel() for name in arch.family(m).head for mod in getattr(m, name).modules()
               if isinstance(mod, nn.Linear))
    width = m.config.to_dict().get("hidden_size") or m.config.dim
    layers = m.config.to_dict().get("num_hidden_layers") or m.config.n_layers
    seq, tokens, rows = 32, 64, 10
    expected = 3 * (tokens * (2 * encoder + 4 * seq * width * layers) + rows * 2 * head)
    assert arch.train_flops(m.config, seq, tokens, rows) == expected


def test_roberta_positions_hold_two_fewer_tokens(tmp_path):
    m = module(family_tokenizer(tmp_path, "roberta"), architecture="roberta").model
    assert m.config.max_position_embeddings == 64 + m.config.pad_token_id + 1
    assert arch.position_limit(m.config) == 64
    config = transformers.RobertaConfig(max_position_embeddings=514, pad_token_id=1)
    assert arch.position_limit(config) == 512


@pytest.mark.parametrize("config, reason", [
    ({"model_type": "deberta-v2"}, "no MLM head"),
    ({"model_type": "bert", "auto_map": {"AutoModel": "x.Y"}}, "custom code"),
    ({"model_type": "gpt2"}, "decoder-only"),
    ({"model_type": "t5", "is_encoder_decoder": True}, "encoder-decoder"),
    ({"model_type": "big_bird"}, "not supported"),
    ({"model_type": "bert", "is_decoder": True}, "decoder"),
])
def test_refused_families_say_why(config, reason):
    with pytest.raises(MLMError, match=reason):
        arch.family_of(config, "model_name_or_path 'x'")


@pytest.mark.parametrize("config, reason", [
    (transformers.DebertaV2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2), "no MLM head"),
    (transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2), "decoder-only"),
])
def test_refused_models_exit_2_with_one_line(tmp_path, capsys, corpus, config, reason):
    path = tmp_path / "model"
    config.save_pretrained(path)
    assert run_cli(*fit_args(corpus, tmp_path / "run", "--model.model_name_or_path", str(path))) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and reason in errors[0], errors
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "my-bert", "auto_map": {"AutoConfig": "a.B"}}))
    assert run_cli("fill-mask", "--model", str(custom), "a [MASK] .") == 2
    assert "custom code" in capsys.readouterr().err


def test_headless_encoder_gets_a_head_at_its_own_rate(tmp_path, caplog):
    tok = family_tokenizer(tmp_path, "bert")
    encoder = module(tok).model.bert  # a BertModel: what sentence-transformers and headless dirs hold
    path = save_hf(encoder, tok, str(tmp_path / "headless"))
    with caplog.at_level("INFO", logger="mlm_lightning"):
        m = module(tok, model_name_or_path=path, learning_rate=5e-5, head_learning_rate=2e-3)
    assert m.new_parameters and all(n.startswith("cls.") for n in m.new_parameters)
    assert "cls.predictions.transform.dense.weight" in m.new_parameters
    line = next(r.getMessage() for r in caplog.records if "new parameters" in r.getMessage())
    assert "cls.predictions.transform.dense.weight" in line and "head_learning_rate" in line
    groups = arch.param_groups(m.model, 0.01, m.new_parameters, m.hparams.head_learning_rate)
    optimizer = torch.optim.AdamW(groups, lr=5e-5)
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(m.model.named_parameters())
    assert rates[id(named["cls.predictions.transform.dense.weight"])] == 2e-3
    assert rates[id(named["bert.encoder.layer.0.attention.self.query.weight"])] == 5e-5
    assert sum(p.numel() for g in groups if g.get("lr") == 2e-3 for p in g["params"]) == sum(
        named[n].numel() for n in m.new_parameters)


def test_unknown_architecture_and_flash_without_the_package():
    with pytest.raises(MLMError, match="architecture must be one of"):
        module(None, architecture="gpt2")
    if transformers.utils.is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(MLMError, match="flash-attn"):
        module(None, attn_implementation="flash_attention_2")


def test_auto_attention_takes_flash_for_modernbert_only_where_it_is_installed(monkeypatch, caplog):
    """Item 8: ModernBERT's unpadded flash path where flash-attn (and a CUDA GPU) is there, SDPA otherwise; BERT and
    RoBERTa keep SDPA; an explicit choice is kept."""
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert {f: arch.resolve_attention(f, "auto") for f in ("bert", "roberta", "modernbert")} == dict.fromkeys(
        ("bert", "roberta", "modernbert"), "sdpa")
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    with caplog.at_level("INFO", logger="mlm_lightning"):
        assert arch.resolve_attention("modernbert", "auto", half_on_cuda=True) == "flash_attention_2"
    assert "flash_attention_2" in caplog.text and "--model.attn_implementation sdpa" in caplog.text
    assert arch.resolve_attention("modernbert", "auto", half_on_cuda=False) == "sdpa"  # fp32 or CPU: flash refuses
    assert [arch.resolve_attention(f, "auto", True) for f in ("bert", "roberta", "electra")] == ["sdpa"] * 3
    assert arch.resolve_attention("modernbert", "sdpa", True) == "sdpa"
    assert arch.resolve_attention("bert", "eager") == "eager"
    from mlm_lightning.model.module import MLMModule

    assert MLMModule(architecture="modernbert")._half_on_cuda() is False  # no trainer (a unit test): never flash


def test_auto_attention_builds_sdpa_here(tmp_path):
    """The default (`auto`) on this machine (no flash-attn, no GPU) builds every family with SDPA."""
    if transformers.utils.is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    for architecture in ("bert", "modernbert"):
        m = module(family_tokenizer(tmp_path, architecture), architecture=architecture)
        assert m.hparams.attn_implementation == "auto"
        assert m.model.config._attn_implementation == "sdpa"


@pytest.mark.slow
@pytest.mark.parametrize("architecture", SCRATCH)
def test_fit_export_and_continue_each_family(tmp_path, capsys, corpus, architecture):
    """From scratch 20 steps: the loss falls; the checkpoint exports and matches the pipeline; the export continues
    as a pretrained model, its first loss below the new model's."""
    run = tmp_path / "scratch"
    args = fit_args(corpus, run, "--model.architecture", architecture, "--trainer.max_steps", "20",
                    "--trainer.limit_val_batches", "2",
                    "--model.learning_rate", "3e-3")
    assert run_cli(*args) == 0
    loss = metric(run, "train/loss")
    assert sum(list(loss.values())[-5:]) / 5 < sum(list(loss.values())[:3]) / 3 - 0.3
    assert state(run)["mlm_lightning"]["bert_config"]["model_type"] == architecture
    out = tmp_path / "export"
    assert run_cli("export", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--export_dir", str(out)) == 0
    net, tok = load_model(str(out))
    assert tok.mask_token == ("<mask>" if architecture == "roberta" else "[MASK]")  # the family's own tokenizer
    text = f"the dog {tok.mask_token} a tree ."
    expected = pipeline("fill-mask", model=str(out), device="cpu")(text, top_k=4)
    capsys.readouterr()
    assert run_cli("fill-mask", "--model", str(run / "checkpoints" / "last.ckpt"), "--top_k", "4", "--json",
                   text) == 0
    assert_same_candidates(json.loads(capsys.readouterr().out)["predictions"][0], expected)
    more = tmp_path / "continued"
    assert run_cli(*fit_args(corpus, more, "--model.model_name_or_path", str(out), "--trainer.max_steps", "1",
                             "--trainer.limit_val_batches", "1", "--data.max_length", "32")) == 0
    assert metric(more, "train/loss")[0] < loss[0] - 0.3


@pytest.mark.slow
def test_fit_from_a_headless_encoder(tmp_path, capsys, corpus):
    """`fit` says which parameters are new and its optimizer runs them at head_learning_rate."""
    tok = family_tokenizer(tmp_path, "roberta")
    encoder = module(tok, architecture="roberta").model.roberta  # a RobertaModel, no MLM head
    path = save_hf(encoder, tok, str(tmp_path / "headless"))
    run = tmp_path / "run"
    assert run_cli(*fit_args(corpus, run, "--model.model_name_or_path", path, "--trainer.max_steps", "2",
                             "--trainer.limit_val_batches", "1", "--data.max_length", "32",
                             "--model.head_learning_rate", "0.002")) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if "new parameters" in x)
    assert "lm_head.dense.weight" in line and "0.002" in line
    groups = state(run)["optimizer_states"][0]["param_groups"]
    assert sorted({g["initial_lr"] for g in groups}) == [5e-5, 0.002]
