"""Score sentences with a masked LM: the pseudo-log-likelihood (PLL) of each, token by token.

PLL (Salazar et al. 2020, "Masked Language Model Scoring"): mask each token of the sentence in turn (the special
tokens such as [CLS]/[SEP] stay and are not scored) and sum log P(the true token | the rest). The `word_l2r`
variant (Kauf & Ivanova 2023, "A Better Way to Do Masked Language Model Scoring") also masks the pieces of the
same word to the right of the scored one, so that a word split into several pieces does not get most of its
probability from its own other pieces. Words are the tokenizer's `word_ids()` (the fast tokenizer's
pre-tokenization: WordPiece's words and punctuation, byte-level BPE's space-led words, SentencePiece's
whitespace-led pieces).

`Scorer` serves the `score` command (`commands.score`), `MLMModule.score` and the server's `POST /api/score`. Every
masked copy of every sentence goes through the model in a few forward passes: `batch_size` copies per pass, the
copies ordered by length (little padding), the MLM head on the scored row of each copy only. Hand-written because
neither transformers nor torchmetrics has MLM scoring (awslabs/mlm-scoring and minicons are separate packages on
older stacks, with one forward per sentence's copies).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from mlm_lightning.errors import MLMError, check
from mlm_lightning.model import arch
from mlm_lightning.model.fill_mask import max_tokens

log = logging.getLogger("mlm_lightning")

VARIANTS = ("original", "word_l2r")


@dataclass
class Sentence:
    index: int
    text: str
    ids: list[int]
    words: list[int | None]  # the word of each token; None: a special token, never masked nor scored
    truncated: bool = False

    @property
    def scored(self) -> list[int]:
        return [i for i, w in enumerate(self.words) if w is not None]


def check_variant(variant: str, where: str = "--variant") -> None:
    check(variant in VARIANTS, f"{where} must be one of {', '.join(VARIANTS)}, got {variant!r}")


class Scorer:
    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", batch_size: int = 256,
                 notice: bool = True, logits=None):
        """`batch_size`: masked copies per forward pass. `notice`: warn of truncated sentences after each call.
        `logits(input_ids, attention, rows, cols)`: the MLM logits at those positions, by another runtime than the
        torch model (the server's ONNX backend passes its masker's); default: the model's encoder and head."""
        check(batch_size >= 1, f"batch_size must be at least 1 (masked copies per forward pass), got {batch_size}")
        check(tokenizer.mask_token is not None, "the tokenizer has no mask token; it cannot score sentences")
        check(tokenizer.is_fast, "scoring needs a fast tokenizer (its word_ids() give the words); save the model"
              " with its tokenizer.json")
        arch.check_fits(model, tokenizer, "score")
        self.model, self.tokenizer, self.batch_size, self.notice = model, tokenizer, batch_size, notice
        self.device = torch.device(device)
        self.logits = logits or self._torch_logits
        self.max_length = max_tokens(model, tokenizer)
        self.truncated: list[int] = []

    # -- input ------------------------------------------------------------------------------------------
    def encode_many(self, texts: list[str], indices: list[int]) -> list[Sentence | MLMError]:
        """Tokenize many sentences in one call of the fast tokenizer; a bad sentence gets its error in its slot.
        A sentence longer than the model is cut to its first tokens (noted in `truncated`)."""
        out: list[Sentence | MLMError] = [
            MLMError(f"input {i + 1} is empty; give a sentence to score") for i in indices
        ]
        todo = [n for n, t in enumerate(texts) if t.strip()]
        if not todo:
            return out
        tok = self.tokenizer
        encoded = tok([texts[n] for n in todo], add_special_tokens=True, truncation=False, verbose=False)
        over = [k for k, ids in enumerate(encoded["input_ids"]) if len(ids) > self.max_length]
        long = {k: r for r, k in enumerate(over)}  # position among the texts -> row of the truncated encoding
        cut = tok([texts[todo[k]] for k in long], add_special_tokens=True, truncation=True,
                  max_length=self.max_length) if long else None
        special = set(tok.all_special_ids)
        for k, n in enumerate(todo):
            source, row = (cut, long[k]) if k in long else (encoded, k)
            ids = source["input_ids"][row]
            # a special token written in the text (a literal [MASK]) stays as context, unscored
            words = [None if t in special else w for t, w in zip(ids, source.word_ids(row), strict=True)]
            if all(w is None for w in words):
                out[n] = MLMError(f"input {indices[n] + 1} has no token to score: {texts[n][:80]!r}")
                continue
            if k in long:
                self.truncated.append(indices[n] + 1)
            out[n] = Sentence(indices[n], texts[n], ids, words, truncated=k in long)
        return out

    # -- scoring ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _log_probs(self, sentences: list[Sentence], variant: str) -> list[list[float]]:
        """log P(token | its masked copy) of every scored token of every sentence: one forward pass per
        `batch_size` copies, the copies of sentences of similar lengths together; one host sync at the end."""
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i].ids))
        copies = [(s, p) for s in order for p in sentences[s].scored]
        mask_id, pad = self.tokenizer.mask_token_id, self.tokenizer.pad_token_id
        pad = mask_id if pad is None else pad  # (a tokenizer without padding: padded positions are never attended)
        results = []
        for start in range(0, len(copies), self.batch_size):
            chunk = copies[start : start + self.batch_size]
            local = {s: k for k, s in enumerate(dict.fromkeys(s for s, _ in chunk))}
            longest = max(len(sentences[s].ids) for s in local)
            ids = torch.full((len(local), longest), pad, dtype=torch.long)
            words = torch.full((len(local), longest), -1, dtype=torch.long)  # -1: special or padding
            for s, k in local.items():
                n = len(sentences[s].ids)
                ids[k, :n] = torch.tensor(sentences[s].ids)
                words[k, :n] = torch.tensor([-1 if w is None else w for w in sentences[s].words])
            lengths = torch.tensor([len(sentences[s].ids) for s in local])
            row = torch.tensor([local[s] for s, _ in chunk])
            pos = torch.tensor([p for _, p in chunk])
            cols = torch.arange(longest)
            batch_ids, batch_words = ids[row], words[row]
            masked = cols == pos[:, None]
            if variant == "word_l2r":  # and the pieces of the same word to the right
                masked |= (batch_words == batch_words[torch.arange(len(chunk)), pos][:, None]) & (cols > pos[:, None])
            true = batch_ids[torch.arange(len(chunk)), pos]
            attention = (cols < lengths[row][:, None]).long()
            logits = self.logits(batch_ids.masked_fill(masked, mask_id), attention, torch.arange(len(chunk)), pos)
            results.append(logits.float().log_softmax(-1).gather(1, true.to(logits.device)[:, None]).squeeze(1))
        values = torch.cat(results).tolist() if results else []
        out: list[list[float]] = [[] for _ in sentences]
        for (s, _), value in zip(copies, values, strict=True):  # copies of a sentence come in position order
            out[s].append(value)
        return out

    def _torch_logits(self, input_ids, attention, rows, cols) -> torch.Tensor:
        """The MLM logits at positions (rows, cols): the head runs on those rows only."""
        hidden = arch.encode(self.model, input_ids.to(self.device), attention.to(self.device))
        return arch.head(self.model, hidden[rows.to(self.device), cols.to(self.device)])

    def _result(self, sentence: Sentence, log_probs: list[float]) -> dict:
        positions = sentence.scored
        names = self.tokenizer.convert_ids_to_tokens([sentence.ids[p] for p in positions])
        tokens = [{"token": name, "id": sentence.ids[p], "word": sentence.words[p], "log_prob": lp}
                  for name, p, lp in zip(names, positions, log_probs, strict=True)]
        pll = math.fsum(log_probs)
        return {"text": sentence.text, "pll": pll, "n_tokens": len(tokens), "pppl": math.exp(-pll / len(tokens)),
                "tokens": tokens, "truncated": sentence.truncated}

    def score(self, sentences: list[Sentence], variant: str = "original") -> list[dict]:
        """Batch entry point (the server's): sentences already `encode_many`d, results in their order."""
        check_variant(variant, "variant")
        per_sentence = self._log_probs(sentences, variant)
        return [self._result(s, lp) for s, lp in zip(sentences, per_sentence, strict=True)]

    def __call__(self, texts: list[str], variant: str = "original", indices: list[int] | None = None) -> list[dict]:
        """Score every sentence (results in input order); `indices` number the inputs in error messages."""
        check(len(texts) > 0, "no input sentences; pass sentences, --file FILE, or lines on stdin")
        check_variant(variant, "variant")
        indices = list(range(len(texts))) if indices is None else indices
        self.truncated = []
        encoded = self.encode_many(texts, indices)
        for e in encoded:  # all checked before any work
            if isinstance(e, MLMError):
                raise e
        if self.truncated and self.notice:
            shown = ", ".join(map(str, self.truncated[:5])) + (", ..." if len(self.truncated) > 5 else "")
            log.warning("%d input(s) longer than the model's %d tokens were scored on their first %d tokens"
                        " (input %s)", len(self.truncated), self.max_length, self.max_length, shown)
        return self.score(encoded, variant)
