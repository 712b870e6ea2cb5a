"""``gsae.sae.selection_changed_share``: the share of the k latents the g-SAE rule selects that plain TopK(z) does
not, against explicit per-row sets, at beta = 0 (exactly 0) and on a hand-built example at large beta."""

from __future__ import annotations

import pytest
import torch

from gsae.config import SAEConfig
from gsae.sae import GSAE, changed_count, scale_grad, selected_latents, selection_changed_share


def _random(beta: float = 1.5, seed: int = 0, n: int = 300):
    gen = torch.Generator().manual_seed(seed)
    sae = GSAE(SAEConfig(d_in=12, d_sae=48, k=5, beta=beta, grad_scale=3.0), seed=seed)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=gen)
    return sae, torch.randn(n, 12, generator=gen), 0.5 * torch.randn(n, 12, generator=gen)


def _brute_force(sae: GSAE, x, g, beta: float) -> float:
    """Dense score, one explicit set per row."""
    with torch.no_grad():
        z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        s = z + beta * z * (scale_grad(g, sae.cfg) @ sae.W_dec.T).abs()
    k, shares = sae.cfg.k, []
    for zr, sr in zip(z, s, strict=True):
        plain = set(zr.topk(k).indices.tolist())
        chosen = set(sr.topk(k).indices.tolist())
        assert len(plain) == len(chosen) == k
        shares.append(len(chosen - plain) / k)
    return sum(shares) / len(shares)


@pytest.mark.parametrize("beta", [0.3, 1.5, 8.0, 100.0])
def test_matches_explicit_sets(beta):
    sae, x, g = _random()
    got = selection_changed_share(sae, x, g, beta=beta, chunk=64)
    assert got == pytest.approx(_brute_force(sae, x, g, beta), abs=1e-12)
    assert 0 < got <= 1


def test_own_beta_is_the_encode_selection_and_beta_zero_changes_nothing():
    sae, x, g = _random(beta=1.5)
    own = selected_latents(sae, x, g)
    assert torch.equal(own, sae.encode(x, g).top_indices)
    assert torch.equal(selected_latents(sae, x, None), sae.encode(x).top_indices)
    assert selection_changed_share(sae, x, g) == selection_changed_share(sae, x, g, beta=1.5)
    assert selection_changed_share(sae, x, g, beta=0.0) == 0.0
    assert selection_changed_share(GSAE(SAEConfig(d_in=12, d_sae=48, k=5), seed=0), x, g) == 0.0  # a TopK SAE
    # chunking does not change the count
    assert selection_changed_share(sae, x, g, chunk=7) == selection_changed_share(sae, x, g, chunk=1000)


def test_changed_count_ignores_order():
    sel = torch.tensor([[3, 1, 2], [4, 5, 6], [7, 8, 9]])
    ref = torch.tensor([[1, 2, 3], [6, 0, 4], [1, 2, 3]])
    assert changed_count(sel, ref).tolist() == [0, 1, 3]


def test_hand_built_example_at_large_beta():
    """Identity encoder and decoder (z = x, |W_dec g~| = |g|): at beta = 100 row 0's gradient lifts two latents with
    z = 1 above z = 5 and 4 (both chosen latents change), row 1's lifts latent 0 (kept) and 2 (one change): the
    share is (2/2 + 1/2) / 2 = 0.75; at beta = 0.1 the gradient is too weak to change anything."""
    sae = GSAE(SAEConfig(d_in=8, d_sae=8, k=2, beta=1.0, grad_scale=1.0))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(8))
        sae.W_dec.copy_(torch.eye(8))
    z = torch.tensor([5.0, 4.0, 1.0, 1.0, 0.5, 0.5, 0.2, 0.1])
    x = torch.stack([z, z])
    g = torch.tensor([[0.0, 0, 1, 1, 0, 0, 0, 0], [1.0, 0, 1, 0, 0, 0, 0, 0]])
    assert selection_changed_share(sae, x, g, beta=100.0) == 0.75
    assert selection_changed_share(sae, x, g, beta=0.1) == 0.0
    assert selection_changed_share(sae, x, g, beta=0.0) == 0.0
