"""`--data.extend_vocab N`: domain words added to a pretrained model's vocabulary (WordPiece and byte-level BPE),
their rows started at the mean of their pieces' and trained at the head's rate, the export filling them as one
token in transformers' fill-mask pipeline, an exact resume, and the refusal from scratch."""

import signal

import pytest
import torch
from safetensors.torch import load_file

from mlm_lightning.data import MLMDataModule
from mlm_lightning.data.tokenizer import load_tokenizer, train_tokenizer
from mlm_lightning.export import save_hf
from mlm_lightning.model import MLMModule, arch
from tests.support.cli import error_line, run_cli
from tests.support.models import TINY, tiny_model
from tests.support.runs import assert_resumed_at
from tests.support.text import sentences

# made of the letters of `sentences`, so every family's small vocabulary cuts them into pieces (no [UNK])
WORDS = ["floribund", "sedimentology"]


def domain_lines(n: int = 400) -> list[str]:
    """Sentences where the domain words dominate one context: "the floribund sees the ball ." and the like."""
    out = []
    for i, line in enumerate(sentences(n, seed=1)):
        word = WORDS[i % 2]
        out.append(f"the {word} {line.split(' ', 2)[2]}" if i % 3 else f"{word} and {line}")
    return out


@pytest.fixture(scope="module")
def domain(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("domain") / "train.txt"
    path.write_text("\n".join(domain_lines()) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("roberta")
    tok = train_tokenizer("roberta", sentences(300), str(tmp / "tok"), 300, 64, lowercase=False)
    torch.manual_seed(0)
    model = arch.new_model("roberta", tok, **{**TINY, "max_position_embeddings": 64})
    return save_hf(model.eval(), tok, str(tmp / "export"))


def extended(model_dir: str, corpus: str, cache, n: int = 2) -> MLMDataModule:
    data = MLMDataModule(train_files=corpus, tokenizer=model_dir, extend_vocab=n, max_length=24,
                         cache_dir=str(cache))
    data.load_tokenizer()
    return data


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_each_word_is_one_token_anywhere_and_rows_start_at_their_pieces_mean(family, bert_dir, roberta_dir, domain,
                                                                             tmp_path):
    model_dir = bert_dir if family == "bert" else roberta_dir
    base = load_tokenizer(model_dir)
    data = extended(model_dir, domain, tmp_path)
    tok = data.tokenizer
    for word in WORDS:  # the original tokenizer cut them
        assert len(base(f"a {word}", add_special_tokens=False)["input_ids"]) > 2
    mask = tok.mask_token
    for word in WORDS:
        for text in (f"the {word} sees a tree .", f"{word} sees a tree .", f"a tree ,{word} .", f"( {word} )",
                     f"a tree.{word}"):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert sum(tok.decode([i]).strip() == word for i in ids) == 1, (text, tok.convert_ids_to_tokens(ids))
            assert tok.decode(ids) == text or family == "bert", text  # (BERT's decoder spaces punctuation)
        # longer words keep their own segmentation around it
        assert tok.decode(tok(f"the {word}s {mask} .")["input_ids"], skip_special_tokens=True).startswith(
            f"the {word}s")
    assert len(data.vocab_extension) == (2 if family == "bert" else 4)  # byte-level BPE: "Ġword" and "word"
    # the model: resized, each new row (input embedding, tied decoder, bias) the mean of its pieces' rows
    module = MLMModule(model_name_or_path=model_dir)
    original, _ = arch.load_pretrained_mlm(model_dir)
    model, _ = arch.build(module.hparams, tok, extension=data.vocab_extension)
    assert model.get_input_embeddings().num_embeddings >= len(tok) > len(base)
    arch.check_fits(model, tok, "extended")
    old_rows = original.get_input_embeddings().num_embeddings
    for old, new in zip(arch.new_row_parameters(original), arch.new_row_parameters(model), strict=True):
        assert torch.equal(new[:len(base)], old[:len(base)])
        for token_id, pieces in data.vocab_extension:
            assert len(pieces) >= 2 and max(pieces) < len(base)
            assert torch.allclose(new[token_id], old[pieces].mean(0)), token_id
    bias = model.get_parameter(arch.FAMILIES[family].output_bias)
    assert (bias[max(old_rows, len(tok)):] == arch.NEVER).all()


def test_the_extended_tokenizer_is_cached_and_keys_the_token_cache(bert_dir, domain, tmp_path, monkeypatch):
    from mlm_lightning.data import module as data_module

    first = extended(bert_dir, domain, tmp_path)
    plain = MLMDataModule(train_files=domain, tokenizer=bert_dir, max_length=24, cache_dir=str(tmp_path))
    assert first._data_dir() != plain._data_dir()  # the token cache is keyed by the extended tokenizer

    def counted(*a, **k):
        raise AssertionError("the corpus was counted again")

    monkeypatch.setattr(data_module, "domain_words", counted)
    again = extended(bert_dir, domain, tmp_path)
    assert again._data_dir() == first._data_dir() and again.vocab_extension == first.vocab_extension


def fit(model_dir, corpus, root, *extra, n: int = 2):
    return ["fit", "--data.train_files", corpus, "--model.model_name_or_path", model_dir, "--data.extend_vocab", str(n),
            "--data.batch_size", "8", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.log_every_n_steps", "1", "--model.warmup_steps", "0", *extra]


@pytest.mark.parametrize("fused", ["false", "true"])  # (true: the GPU's default, fused AdamW, run on the CPU)
def test_new_rows_train_at_the_head_rate_and_the_rest_at_the_encoders(bert_dir, domain, tmp_path, fused):
    root = tmp_path / "run"
    assert run_cli(*fit(bert_dir, domain, root, "--trainer.max_steps", "1", "--model.learning_rate", "1e-9",
                        "--model.head_learning_rate", "0.1", "--model.schedule", "constant",
                        "--model.fused_optimizer", fused)) == 0
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    after = state["state_dict"]["model.bert.embeddings.word_embeddings.weight"]
    bias = state["state_dict"]["model.cls.predictions.bias"]
    before = load_file(f"{bert_dir}/model.safetensors")["bert.embeddings.word_embeddings.weight"]
    n = len(load_tokenizer(bert_dir))  # (its embeddings have rows beyond its tokens: the new ids take those)
    tok = load_tokenizer(str(root / "export"))
    new = [tok.convert_tokens_to_ids(w) for w in WORDS]
    assert min(new) >= n and after.shape[0] >= len(tok)
    assert (after[:n] - before[:n]).abs().max() < 1e-6  # 1e-9 per step
    moved = [(after[i] - start).abs().mean().item() for i, start in zip(new, _starts(bert_dir, root, new),
                                                                          strict=True)]
    assert min(moved) > 0.02, moved  # AdamW's first step moves each element by about the rate (0.1)
    assert bias[new].abs().min() > 0  # (the bias entries move too)


def _starts(model_dir, root, new):
    """The new rows at step 0: the mean of their pieces' rows in the original model."""
    base = load_tokenizer(model_dir)
    weights = load_file(f"{model_dir}/model.safetensors")["bert.embeddings.word_embeddings.weight"]
    tok = load_tokenizer(str(root / "export"))
    return [weights[base(tok.convert_ids_to_tokens(i), add_special_tokens=False)["input_ids"]].mean(0) for i in new]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_the_export_fills_a_masked_domain_word_as_one_token_in_a_pipeline(family, bert_dir, roberta_dir, tmp_path):
    """A corpus where one domain word dominates: after a short training the export's pipeline fills a mask with
    it, as one whole (added) token, its sequence written as text. Without the extension the answer could at best
    be one of its pieces."""
    from transformers import pipeline

    word = WORDS[0]
    corpus = tmp_path / "dominated.txt"
    corpus.write_text(f"{word} {word} sees {word} .\n" * 300 + f"a {WORDS[1]} helps {word} .\n" * 100,
                      encoding="utf-8")
    model_dir = bert_dir if family == "bert" else roberta_dir
    root = tmp_path / "run"
    assert run_cli(*fit(model_dir, str(corpus), root, "--trainer.max_steps", "40", "--model.learning_rate", "3e-3",
                        "--model.head_learning_rate", "3e-2", "--data.mlm_probability", "0.3",
                        "--trainer.limit_val_batches", "0")) == 0
    fill = pipeline("fill-mask", model=str(root / "export"), device="cpu")
    best = fill(f"the {fill.tokenizer.mask_token} sees {word} .", top_k=3)[0]
    assert best["token_str"].strip() == word, best
    assert best["token"] >= len(load_tokenizer(model_dir))  # an added token, not a piece of the word
    assert best["sequence"].startswith(f"the {word} sees {word}"), best


@pytest.mark.slow
def test_interrupt_then_resume_with_an_extended_vocabulary_is_exact(bert_dir, domain, tmp_path, capsys):
    steps = ["--trainer.max_steps", "8", "--model.learning_rate", "1e-3", "--model.head_learning_rate", "1e-2"]
    straight, root = tmp_path / "straight", tmp_path / "run"
    assert run_cli(*fit(bert_dir, domain, straight, *steps)) == 0
    code = run_cli(*fit(bert_dir, domain, root, *steps, "--trainer.callbacks+=tests.support.callbacks.SignalAt",
                        "--trainer.callbacks.step", "4", "--trainer.callbacks.signum", str(int(signal.SIGTERM))))
    assert code == 143
    assert run_cli(*fit(bert_dir, domain, root, *steps, "--ckpt_path", "last")) == 0
    capsys.readouterr()
    assert_resumed_at(root, 4)
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # another count is another vocabulary: refused before any weight is loaded
    code = run_cli(*fit(bert_dir, domain, root, *steps, "--trainer.max_steps", "10", "--ckpt_path", "last", n=1))
    assert code != 0 and "another tokenizer" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("given", [[], ["--data.tokenizer", "TOKENIZER"]])
def test_extend_vocab_is_refused_from_scratch(given, bert_dir, domain, tmp_path, capsys):
    """With a vocabulary trained on the corpus, or another tokenizer given to a new model."""
    given = [bert_dir if a == "TOKENIZER" else a for a in given]
    code = run_cli("fit", "--data.train_files", domain, "--data.extend_vocab", "5", "--trainer.max_steps", "1",
                   "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.accelerator", "cpu", *given)
    assert code != 0
    line = error_line(capsys.readouterr().err)
    assert "--data.extend_vocab" in line and "--model.model_name_or_path" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_data_module_alone_refuses_to_extend_a_vocabulary_it_would_train(domain, tmp_path):
    from mlm_lightning.errors import MLMError

    data = MLMDataModule(train_files=domain, extend_vocab=3, cache_dir=str(tmp_path))
    with pytest.raises(MLMError, match="extend_vocab"):
        data.load_tokenizer(train_if_missing=True)
    assert not (tmp_path / "tokenizers").exists()


def test_the_words_chosen_most_frequent_first_ties_by_the_word_split_ones_only(bert_dir):
    from mlm_lightning.data.tokenizer import domain_words

    tok = load_tokenizer(bert_dir)
    texts = ["the the the floribund sedimentology", "Sedimentology , floribund ballcar 1234 1234",
             "floribund sedimentology ballcar once the"]
    # "the": one token already; "once", seen once; "1234": no letter; BERT lowercases
    assert domain_words(tok, texts, 3) == ["floribund", "sedimentology", "ballcar"]
    assert domain_words(tok, texts, 1) == ["floribund"]
    assert domain_words(tok, texts * 2, 5) == ["floribund", "sedimentology", "ballcar", "once"]


@pytest.mark.parametrize("family", arch.SCRATCH)
def test_every_family_resizes_its_tied_decoder_and_bias_and_starts_new_rows_at_the_pieces_mean(family, tokenizer):
    """`extend_embeddings` on each family's masked LM (its decoder tied or not, its bias where the family keeps
    it): room for every new id, the new rows the mean of their pieces', and the logits of every id."""
    torch.manual_seed(0)
    model = arch.new_model(family, tokenizer, **{**TINY, "max_position_embeddings": 64})
    before = [p.detach().clone() for p in arch.new_row_parameters(model)]
    rows = model.get_input_embeddings().num_embeddings
    extension = [(rows + 3, [5, 6, 7]), (len(tokenizer), [8, 9])]  # one beyond the rows, one in their padding
    arch.extend_embeddings(model, rows + 4, extension)
    assert model.get_input_embeddings().num_embeddings == model.config.vocab_size == rows + arch.VOCAB_MULTIPLE
    params = arch.new_row_parameters(model)
    assert len(params) == len(before)  # (tied stays tied: the decoder is the embedding matrix)
    for old, new in zip(before, params, strict=True):
        assert new.shape[0] == rows + arch.VOCAB_MULTIPLE and torch.equal(new[:len(tokenizer)], old[:len(tokenizer)])
        for token_id, pieces in extension:
            assert torch.allclose(new[token_id], old[pieces].mean(0))
    bias = model.get_parameter(arch.FAMILIES[family].output_bias)
    assert (bias[rows + 4:] == arch.NEVER).all()  # the padding ids are never predicted
    logits = arch.head(model, torch.randn(2, TINY["hidden_size"]))
    assert logits.shape == (2, rows + arch.VOCAB_MULTIPLE)
