"""`--mode probe`: a linear classifier on frozen, mean-pooled embeddings.

Each text is embedded once per model (the attention-mask-weighted mean of the encoder's last hidden states); a
multinomial logistic regression on the standardized embeddings is then fitted with L-BFGS (a convex problem: a
few hundred iterations on the CPU, in seconds). scikit-learn would do the same, but is not a dependency for this.
"""

from __future__ import annotations

import torch

from mlm_lightning.evaluate.classifier import loader


@torch.inference_mode()
def embed(encoder, examples: list[dict], tokenizer, batch_size: int, device: torch.device) -> torch.Tensor:
    """(rows, hidden) fp32 on the CPU: the mean of each row's last hidden states over its real tokens."""
    encoder.eval().to(device)
    out = []
    for batch in loader(examples, [0] * len(examples), tokenizer, batch_size):
        batch.pop("labels")
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = encoder(**batch)[0].float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
    return torch.cat(out) if out else torch.zeros(0, encoder.config.hidden_size)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int, l2: float,
              steps: int = 300) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    """(mean, std, linear layer) of a logistic regression on standardized `features`, seeded; `l2` penalizes the
    squared weights (not the bias) beside the mean cross-entropy."""
    mean, std = features.mean(0), features.std(0, unbiased=False).clamp(min=1e-6)
    x = ((features - mean) / std).double()
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], num_classes).double()
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(linear(x), labels) + l2 * linear.weight.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return mean, std, linear


def predict(probe: tuple[torch.Tensor, torch.Tensor, torch.nn.Linear], features: torch.Tensor) -> torch.Tensor:
    mean, std, linear = probe
    with torch.no_grad():
        return linear(((features - mean) / std).double()).argmax(-1)
