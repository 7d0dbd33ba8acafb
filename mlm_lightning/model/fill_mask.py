"""Fill-mask: the input is a sentence with masked parts; the model completes it.

`FillMasker` serves the `fill-mask` command (`commands.fill_mask`), the LightningCLI `predict` subcommand
and tests. Its output per mask uses the keys of transformers' fill-mask pipeline (`score`, `token`,
`token_str`, `sequence`), and `targets` (score only given words) has the pipeline's semantics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mlm_lightning.errors import MLMError, check
from mlm_lightning.model import arch

log = logging.getLogger("mlm_lightning")


@dataclass
class Encoded:
    index: int
    text: str
    ids: list[int]
    masks: list[int]  # positions of the mask tokens in `ids`


def truncation_notice(truncated: list[int], max_length: int) -> None:
    shown = ", ".join(map(str, truncated[:5])) + (", ..." if len(truncated) > 5 else "")
    log.warning("%d input(s) longer than the model's %d tokens were truncated to a window around their masks"
                " (input %s)", len(truncated), max_length, shown)


def max_tokens(model, tokenizer) -> int:
    """The most tokens (special ones included) one input may have: the tokenizer's and the model's limit."""
    return min(tokenizer.model_max_length, arch.position_limit(model.config))


class FillMasker:
    # True: a sentence with several masks gets the pipeline's exact `sequence` text, [CLS]/[SEP] included
    # (the server promises pipeline output); False: without them, easier to read in the terminal.
    pipeline_sequences = False

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", top_k: int = 5, batch_size: int = 64,
                 notice: bool = True):
        """`notice`: warn of truncated inputs after each call (False: a caller that fills in batches, like predict,
        reads `truncated` and says it once)."""
        check(top_k > 0, f"top_k must be positive, got {top_k}")
        check(tokenizer.mask_token is not None, "the tokenizer has no mask token; it cannot fill masks")
        arch.check_fits(model, tokenizer, "fill-mask")
        self.model, self.tokenizer, self.top_k, self.batch_size = model, tokenizer, top_k, batch_size
        self.device = torch.device(device)
        self.truncated: list[int] = []
        self.notice = notice
        self.max_length = max_tokens(model, tokenizer)

    def target_ids(self, targets: str | list[str] | None, where: str = "targets") -> torch.Tensor | None:
        """The token ids of `targets`, as transformers' fill-mask pipeline finds them (`get_target_ids`): a
        vocabulary entry as is, else the word's first token (a word of several tokens is scored by its first
        one, with a warning); duplicates once. None: no targets."""
        if targets is None:
            return None
        targets = [targets] if isinstance(targets, str) else list(targets)
        vocab, ids = self.tokenizer.get_vocab(), []
        for target in targets:
            id_ = vocab.get(target)
            if id_ is None:
                pieces = self.tokenizer(target, add_special_tokens=False, return_attention_mask=False,
                                        return_token_type_ids=False)["input_ids"]
                if not pieces:
                    log.warning("target %r has no token in the vocabulary; it is ignored", target)
                    continue
                id_ = pieces[0]
                log.warning("target %r is not one token of the vocabulary; it is scored by its first token %r",
                            target, self.tokenizer.convert_ids_to_tokens(id_))
            ids.append(id_)
        check(ids, f"none of the {where} {targets!r} is a word of the vocabulary; give other words")
        return torch.tensor(sorted(set(ids)))

    # -- input ------------------------------------------------------------------------------------------
    def encode(self, text: str, index: int = 0) -> Encoded:
        """Tokenize one sentence; `[MASK]` and the tokenizer's own mask token both work."""
        encoded = self.encode_many([text], [index])[0]
        if isinstance(encoded, MLMError):
            raise encoded
        return encoded

    def encode_many(self, texts: list[str], indices: list[int]) -> list[Encoded | MLMError]:
        """`encode` for many sentences in one call of the fast tokenizer (its Rust batch encoding: the server's
        batches and the terminal's files); a bad sentence gets its error in its slot, the others are unaffected."""
        tok, mask_id = self.tokenizer, self.tokenizer.mask_token_id
        if tok.mask_token != "[MASK]":
            texts = [t.replace("[MASK]", tok.mask_token) for t in texts]
        out: list[Encoded | MLMError] = [
            MLMError(f"input {i + 1} is empty; give a sentence with [MASK] where a word should go") for i in indices
        ]
        todo = [n for n, t in enumerate(texts) if t.strip()]
        for n, ids in zip(todo, self._token_ids([texts[n] for n in todo]), strict=True):
            where, text = f"input {indices[n] + 1}", texts[n]
            masks = [i for i, t in enumerate(ids) if t == mask_id]
            if not masks:
                out[n] = MLMError(f"{where} has no mask: {text[:80]!r}; write [MASK] where a word should be predicted")
                continue
            if len(ids) > self.max_length:
                try:
                    ids, masks = self._window(ids, masks, where)
                except MLMError as e:
                    out[n] = e
                    continue
                self.truncated.append(indices[n] + 1)
            out[n] = Encoded(indices[n], text, ids, masks)
        return out

    def _token_ids(self, texts: list[str], chunk: int = 4096):
        """Token ids of each text, tokenized `chunk` at a time (the fast tokenizer's full encodings are large)."""
        for start in range(0, len(texts), chunk):
            yield from self.tokenizer(texts[start : start + chunk], add_special_tokens=True, truncation=False,
                                      verbose=False)["input_ids"]

    def _window(self, ids: list[int], masks: list[int], where: str) -> tuple[list[int], list[int]]:
        """Truncate to the model's length, keeping the masks inside the kept window."""
        body, room = ids[1:-1], self.max_length - 2
        first, last = masks[0] - 1, masks[-1] - 1
        check(last - first < room, f"{where}: its masks are more than {room} tokens apart; split the sentence")
        start = max(0, min(first - (room - (last - first)) // 2, len(body) - room))
        window = [ids[0]] + body[start : start + room] + [ids[-1]]
        return window, [m - start for m in masks]

    # -- prediction -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _topk(self, batch: list[Encoded], k: int | None = None, targets: list[torch.Tensor | None] | None = None
              ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """For each sentence, for each mask: (probabilities, token ids) of the top-k (default `self.top_k`), among
        the sentence's `targets` ids where it has some (at most as many as there are targets)."""
        longest = max(len(e.ids) for e in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, e in enumerate(batch):
            input_ids[row, : len(e.ids)] = torch.tensor(e.ids)
            attention[row, : len(e.ids)] = 1
        rows = torch.tensor([r for r, e in enumerate(batch) for _ in e.masks])
        cols = torch.tensor([m for e in batch for m in e.masks])
        logits = self._logits(input_ids, attention, rows, cols)
        all_probs = logits.softmax(-1)
        # at most every token (as the pipeline); not the padding rows beyond the tokenizer's vocabulary
        probs, tokens = all_probs.topk(min(k or self.top_k, len(self.tokenizer), all_probs.shape[-1]), dim=-1)
        probs, tokens = list(probs.cpu()), list(tokens.cpu())
        row = 0
        for e, ids in zip(batch, targets or [None] * len(batch), strict=True):
            if ids is not None:  # the pipeline's way: probabilities over the whole vocabulary, then the targets'
                for r in range(row, row + len(e.masks)):
                    chosen, index = all_probs[r, ids.to(self.device)].topk(min(k or self.top_k, len(ids)))
                    probs[r], tokens[r] = chosen.cpu(), ids[index.cpu()]
            row += len(e.masks)
        out, row = [], 0
        for e in batch:
            out.append([(probs[row + j], tokens[row + j]) for j in range(len(e.masks))])
            row += len(e.masks)
        return out

    def _logits(self, input_ids, attention, rows, cols) -> torch.Tensor:
        """The MLM logits (float) at positions (rows, cols): the head runs on those rows only."""
        hidden = arch.encode(self.model, input_ids.to(self.device), attention.to(self.device))
        return arch.head(self.model, hidden[rows.to(self.device), cols.to(self.device)]).float()

    def _result(self, e: Encoded, per_mask) -> dict:
        tok = self.tokenizer
        predictions = []
        for j, (probs, tokens) in enumerate(per_mask):
            candidates = []
            for p, t in zip(probs.tolist(), tokens.tolist(), strict=True):
                ids = list(e.ids)
                ids[e.masks[j]] = t
                if len(e.masks) == 1 or self.pipeline_sequences:  # same text as transformers' pipeline
                    sequence = tok.decode(ids, skip_special_tokens=len(e.masks) == 1)
                else:
                    sequence = tok.decode(ids[1:-1])
                candidates.append({"score": p, "token": t, "token_str": tok.decode([t]), "sequence": sequence})
            predictions.append(candidates)
        filled = list(e.ids)
        for m, candidates in zip(e.masks, predictions, strict=True):
            filled[m] = candidates[0]["token"]
        return {"text": e.text, "filled": tok.decode(filled, skip_special_tokens=True), "predictions": predictions}

    def __call__(self, texts: list[str], joint: bool = False, indices: list[int] | None = None,
                 targets: str | list[str] | None = None) -> list[dict]:
        """Fill every sentence. `joint`: fill masks left to right, each choice fed back for the next.

        `indices` number the inputs in error messages (default 0, 1, ...); `targets`: score only these words."""
        check(len(texts) > 0, "no input sentences; pass sentences, --file FILE, or lines on stdin")
        ids = self.target_ids(targets)
        indices = list(range(len(texts))) if indices is None else indices
        self.truncated: list[int] = []
        encoded = self.encode_many(texts, indices)  # validate all first
        for e in encoded:
            if isinstance(e, MLMError):
                raise e
        if self.truncated and self.notice:
            truncation_notice(self.truncated, self.max_length)
        for position, e in enumerate(encoded):  # from here on, index is the slot of the result
            e.index = position
        results: list[dict | None] = [None] * len(encoded)
        order = sorted(encoded, key=lambda e: len(e.ids))  # similar lengths per batch: little padding
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            per_row = [ids] * len(batch)
            per_mask = self._joint(batch, per_row) if joint else self._topk(batch, targets=per_row)
            for e, pm in zip(batch, per_mask, strict=True):
                results[e.index] = self._result(e, pm)
        return results

    def fill(self, encoded: list[Encoded], top_k: list[int], targets: list[torch.Tensor | None] | None = None
             ) -> list[dict]:
        """Batch entry point (the server's): sentences already `encode`d, each with its own top_k (and target ids,
        from `target_ids`), results in input order. One forward per `batch_size` sentences of similar length."""
        targets = targets or [None] * len(encoded)
        results: list[dict | None] = [None] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            per_mask = self._topk([encoded[i] for i in rows], max(top_k[i] for i in rows), [targets[i] for i in rows])
            for i, masks in zip(rows, per_mask, strict=True):  # the top-k of a longer top list: cut it
                results[i] = self._result(encoded[i], [(p[: top_k[i]], t[: top_k[i]]) for p, t in masks])
        return results

    def _joint(self, batch: list[Encoded], targets: list[torch.Tensor | None]):
        out = [[] for _ in batch]
        current = [Encoded(e.index, e.text, list(e.ids), list(e.masks)) for e in batch]
        for step in range(max(len(e.masks) for e in batch)):
            live = [(i, e) for i, e in enumerate(current) if step < len(e.masks)]
            single = [Encoded(e.index, e.text, e.ids, [e.masks[step]]) for _, e in live]
            chosen = self._topk(single, targets=[targets[i] for i, _ in live])
            for (i, e), [(probs, tokens)] in zip(live, chosen, strict=True):
                out[i].append((probs, tokens))
                e.ids[e.masks[step]] = int(tokens[0])
        return out


def format_text(result: dict) -> str:
    """The terminal's view: a byte-level BPE token decodes with its leading space (" same", as Hugging Face's
    pipeline gives it, and the JSON keeps it); shown stripped, a whitespace-only token as its repr."""
    lines = [result["filled"].strip()]
    for j, candidates in enumerate(result["predictions"], start=1):
        tops = ", ".join(f"{c['token_str'].strip() or repr(c['token_str'])} {c['score']:.3f}" for c in candidates)
        lines.append(f"  mask {j}: {tops}")
    return "\n".join(lines)


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check(device != "cuda" or torch.cuda.is_available(), "--device cuda asked for but no CUDA GPU is available")
    return device
