"""Token sequences a tiny LM learns in a few Adam steps, shared by the tests that need a trained (not random) LM."""

from __future__ import annotations

import torch


def progressions(n: int, gen: torch.Generator, vocab: int, length: int) -> torch.Tensor:
    """``n`` arithmetic progressions mod ``vocab`` of ``length`` tokens, with a random start and step 1..5:
    predictable after two tokens."""
    start = torch.randint(0, vocab, (n, 1), generator=gen)
    step = torch.randint(1, 6, (n, 1), generator=gen)
    return (start + step * torch.arange(length)) % vocab


def fit(model: torch.nn.Module, steps: int, gen: torch.Generator, vocab: int, length: int, lr: float = 3e-3,
        batch: int = 32) -> torch.nn.Module:
    """Train ``model`` (a HookedTransformer) for ``steps`` Adam steps on ``progressions``, then freeze it."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(progressions(batch, gen, vocab, length), return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return model
