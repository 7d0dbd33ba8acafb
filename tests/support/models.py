"""Tiny models built offline: an `MLMModule` on a given tokenizer, exported model directories (BERT, each family),
the tokenizers they use, and a sharded checkpoint as Lightning's FSDP strategy writes it."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mlm_lightning.data.tokenizer import SPECIAL_TOKENS, train_wordpiece
from mlm_lightning.export import save_hf
from mlm_lightning.model import MLMModule, arch
from tests.support.text import sentences

# the sizes of `module`'s tiny BERT (no dropout: unit tests compare exact values)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, dropout=0.0)


def module(tokenizer, **kw):
    """A tiny `MLMModule` built on `tokenizer`, its weights seeded (unit tests of the LightningModule)."""
    torch.manual_seed(0)
    m = MLMModule(**{**TINY, **kw})
    m.tokenizer = tokenizer
    m.configure_model()
    return m


def tiny_model(tmp: Path, mask_token: str | None = None) -> str:
    """A random tiny BERT (vocab ~200, 24-token tokenizer limit) exported in Hugging Face format."""
    tok = train_wordpiece(sentences(300), str(tmp / "tok"), 200, 24)
    if mask_token:  # a tokenizer whose own mask token is not [MASK] (like RoBERTa's <mask>)
        tok.add_special_tokens({"mask_token": mask_token})
    m = MLMModule(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64)
    m.tokenizer = tok
    torch.manual_seed(0)
    m.configure_model()
    with torch.no_grad():  # random weights that propose whole words: tests read its fills back as words
        bias = dict(m.model.named_parameters())[arch.FAMILIES["bert"].output_bias]
        bias[[i for t, i in tok.get_vocab().items() if t.startswith("##")]] = -10.0
    return save_hf(m.model.eval(), tok, str(tmp / "export"))


def bert_dir(tmp: Path, positions: int = 512, **sizes) -> str:
    """A local pretrained-model directory (as `save_pretrained` writes) of a small random BERT with a WordPiece
    tokenizer: stands in for bert-base-uncased offline (`sizes`: BertConfig fields, e.g. bert-base's own)."""
    from transformers import BertConfig, BertForMaskedLM

    out = str(tmp / "bert")
    tok = train_wordpiece(sentences(300), str(tmp / "bert-tok"), 200, positions)
    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), max_position_embeddings=positions,
                                       pad_token_id=tok.pad_token_id, **{**config, **sizes}))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def family_tokenizer(tmp: Path, architecture: str, vocab: int = 400):
    """The tokenizer a new `architecture` model gets (its family's kind), trained on a few hundred sentences."""
    from mlm_lightning.data.tokenizer import train_tokenizer

    kind = arch.FAMILIES[architecture].tokenizer
    return train_tokenizer(kind, sentences(300), str(tmp / f"tok-{architecture}"), vocab, 64)


def family_export(tmp: Path, architecture: str) -> tuple[str, object]:
    """(export dir, model) of a random tiny `architecture` model with its family's tokenizer."""
    tok = family_tokenizer(tmp, architecture)
    m = module(tok, architecture=architecture)
    return save_hf(m.model.eval(), tok, str(tmp / f"export-{architecture}")), m.model.eval()


def bpe_tokenizer(texts) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (no `##` pieces) with BERT's special tokens, trained on `texts`."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def write_sharded_checkpoint(rank: int, world: int, ckpt_path: str, out_dir: str, port: int) -> None:
    """(torch.multiprocessing.spawn target) Write `ckpt_path` as a sharded `torch.distributed.checkpoint`
    directory from `world` gloo processes, laid out as Lightning's FSDP strategy does ("model" + meta.pt)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = torch.load(ckpt_path, weights_only=True)
        model = {
            k: distribute_tensor(v, mesh, [Shard(0)] if v.dim() and v.shape[0] >= world else [Replicate()])
            for k, v in full["state_dict"].items()
        }
        dcp.save({"model": model}, checkpoint_id=out_dir)
        if rank == 0:
            rest = {k: v for k, v in full.items() if k not in ("state_dict", "optimizer_states")}
            torch.save(rest, os.path.join(out_dir, "meta.pt"))
    finally:
        dist.destroy_process_group()
