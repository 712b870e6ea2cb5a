"""GSAE against independent references: SAELens' TopKSAE, a hand-written g-TopK, a dense decoder."""

import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig

from gsae.config import ConfigError, SAEConfig
from gsae.sae import GSAE, scale_grad

D_IN, D_SAE, K = 16, 64, 4


def make(beta=0.0, **kw) -> GSAE:
    sae = GSAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, beta=beta, **kw), seed=0)
    with torch.no_grad():  # non-trivial biases so b_dec / b_enc handling is exercised
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(1))
        sae.b_enc.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
    return sae


def data(n=200, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=gen), torch.randn(n, D_IN, generator=gen)


def saelens_topk(sae: GSAE) -> TopKSAE:
    sl = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, apply_b_dec_to_input=True,
                               rescale_acts_by_decoder_norm=False))
    sl.load_state_dict(sae.state_dict())
    return sl


def test_beta0_is_bit_identical_to_plain_topk_and_matches_saelens():
    x, g = data()
    topk, gsae0 = make(0.0), make(0.0)
    a, b = topk.encode(x), gsae0.encode(x, g)  # beta = 0 given a gradient vs no gradient at all
    assert torch.equal(topk.to_dense(a), gsae0.to_dense(b))
    assert torch.equal(topk.decode(*a[:2]), gsae0.decode(*b[:2]))
    sl = saelens_topk(topk)
    with torch.no_grad():
        ref_acts = sl.encode(x)
        ref_out = sl.decode(ref_acts)
    ours = topk.to_dense(a)
    assert (ours - ref_acts).abs().max().item() == 0.0
    assert (topk.decode(*a[:2]) - ref_out).abs().max().item() < 1e-6


def test_gtopk_selection_matches_hand_computation():
    x, g = data()
    for value_mode in ("z", "score"):
        sae = make(2.0, value_mode=value_mode, grad_scale=0.7)
        enc = sae.encode(x, g)
        W_enc, W_dec, b_enc, b_dec = (t.detach().double() for t in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec))
        xd, gd = x.double(), g.double()
        ref = torch.zeros(len(x), D_SAE, dtype=torch.float64)
        for i in range(len(x)):  # row by row, straight from the paper's equation
            z = (xd[i] - b_dec) @ W_enc + b_enc
            s = z + 2.0 * z * (W_dec @ (0.7 * gd[i])).abs()
            idx = torch.argsort(s, descending=True)[:K]
            vals = z[idx] if value_mode == "z" else s[idx]
            ref[i, idx] = vals.clamp_min(0)
        assert torch.allclose(sae.to_dense(enc).double(), ref, atol=1e-5), value_mode


def test_gradient_changes_selection_only_when_beta_positive():
    x, g = data()
    plain = make(3.0).encode(x)
    guided = make(3.0).encode(x, g)
    assert not torch.equal(plain.top_indices.sort(-1).values, guided.top_indices.sort(-1).values)


def test_any_leading_shape():
    x, g = data(24)
    sae = make(1.0)
    flat = sae.to_dense(sae.encode(x, g))
    shaped = sae.to_dense(sae.encode(x.reshape(2, 3, 4, D_IN), g.reshape(2, 3, 4, D_IN)))
    assert torch.equal(flat, shaped.reshape(24, D_SAE))
    enc = sae.encode(x.reshape(2, 12, D_IN))
    assert sae.decode(enc.top_acts, enc.top_indices).shape == (2, 12, D_IN)


def test_sparse_decode_matches_dense_reference_values_and_grads():
    x, g = data()
    sae = make(1.0)
    enc = sae.encode(x, g)
    a = sae.decode(enc.top_acts, enc.top_indices)
    b = sae.decode_dense(enc.top_acts, enc.top_indices)
    assert torch.allclose(a, b, atol=1e-5)
    ga = torch.autograd.grad(a.pow(2).sum(), sae.W_dec, retain_graph=True)[0]
    gb = torch.autograd.grad(b.pow(2).sum(), sae.W_dec)[0]
    assert torch.allclose(ga, gb, atol=1e-4)


def test_token_grad_norm_is_scale_free():
    x, g = data()
    sae = make(1.0, grad_norm="token")
    assert torch.equal(sae.encode(x, g).top_indices, sae.encode(x, 1000.0 * g).top_indices)
    assert torch.allclose(scale_grad(g, sae.cfg).pow(2).mean(-1), torch.ones(len(g)))


def test_decoder_constraints():
    sae = make(0.0)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.set_decoder_norm_to_unit()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_gradient_parallel_to_decoder()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    fresh = GSAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K), seed=0)
    assert torch.equal(fresh.W_enc, fresh.W_dec.T)  # encoder initialised as the decoder's transpose


def test_auxk_matches_saelens_formula():
    """Our AuxK, un-normalised, equals SAELens' TopKTrainingSAE aux loss (scale 1, all top dead values > 0)."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    x, _ = data()
    sae = make(0.0)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre-activation positive, so ReLU on the aux values is a no-op
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[: D_SAE // 2] = True  # 32 dead >= k_aux = d_in // 2 = 8, so SAELens' scale is 1
    out = sae(x, dead_mask=dead, k_aux=D_IN // 2)
    sl = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, apply_b_dec_to_input=True,
                                               rescale_acts_by_decoder_norm=False, aux_loss_coefficient=1.0))
    sl.load_state_dict(sae.state_dict(), strict=False)
    with torch.no_grad():
        z = sae.pre_acts(x)
        ref = sl.calculate_topk_aux_loss(x, out.x_hat, z, dead)
    resid = (x - out.x_hat).detach()
    ours_unnormalised = out.auxk_loss * (resid - resid.mean(0)).pow(2).sum() / len(x)
    assert torch.allclose(ours_unnormalised, ref, rtol=1e-5), (ours_unnormalised.item(), ref.item())


@pytest.mark.parametrize("kw", [dict(k=0), dict(k=D_SAE), dict(beta=-1.0), dict(value_mode="x"),
                                dict(grad_norm="layer")])
def test_bad_config_is_refused(kw):
    base = dict(d_in=D_IN, d_sae=D_SAE, k=K)
    with pytest.raises(ConfigError):
        SAEConfig(**{**base, **kw})


def test_bad_shapes_are_refused():
    sae = make(1.0)
    with pytest.raises(ValueError, match="d_in"):
        sae.encode(torch.randn(3, D_IN + 1))
    with pytest.raises(ValueError, match="gradient shape"):
        sae.encode(torch.randn(3, D_IN), torch.randn(4, D_IN))
