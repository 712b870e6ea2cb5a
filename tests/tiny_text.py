"""Token sequences a tiny LM learns in a few Adam steps, shared by the tests that need a trained (not random) LM."""

from __future__ import annotations

import torch


def progressions(n: int, gen: torch.Generator, vocab: int, length: int) -> torch.Tensor:
    """``n`` arithmetic progressions mod ``vocab`` of ``length`` tokens, with a random start and step 1..5:
    predictable after two tokens."""
    start = torch.randint(0, vocab, (n, 1), generator=gen)
    step = torch.randint(1, 6, (n, 1), generator=gen)
    return (start + step * torch.arange(length)) % vocab
