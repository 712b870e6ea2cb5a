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


# ------------------------------------------------------------------------------------------------------
# The sparse training path (selection without autograd, gradients through the chosen entries only)
# against a dense fp32 reference written out here with plain autograd.
# ------------------------------------------------------------------------------------------------------


def dense_reference_loss(sae: GSAE, x, g, dead=None, k_aux=0, aux_coef=0.5):
    """fvu + aux_coef * auxk, straight from the module docstring and Gao et al., all dense [N, d_sae]."""
    c = sae.cfg
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    s = z
    if g is not None and c.beta > 0:
        with torch.no_grad():
            attr = (scale_grad(g, c) @ sae.W_dec.T).abs()
        s = z + c.beta * z * attr
    top_s, idx = s.detach().topk(c.k, dim=-1)
    kept = s if c.value_mode == "score" else z
    code = torch.zeros_like(z).scatter(-1, idx, torch.ones_like(top_s)) * kept.relu()
    x_hat = code @ sae.W_dec + sae.b_dec
    fvu = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    loss = fvu
    if dead is not None:
        kk = min(k_aux, int(dead.sum()))
        aux_idx = z.detach().masked_fill(~dead, -torch.inf).topk(kk, dim=-1).indices
        aux_code = torch.zeros_like(z).scatter(-1, aux_idx, 1.0) * z.relu()
        resid = (x - x_hat).detach()
        auxk = (aux_code @ sae.W_dec - resid).pow(2).sum() / (resid - resid.mean(0)).pow(2).sum()
        loss = loss + aux_coef * auxk
    return loss, idx


def fast_loss(sae: GSAE, x, g, dead=None, k_aux=0, aux_coef=0.5):
    out = sae(x, g, dead_mask=dead, k_aux=k_aux)
    return out.fvu + aux_coef * out.auxk_loss, out.top_indices


PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec")


def grads_of(loss_fn, sae, x):
    x = x.clone().requires_grad_(True)
    loss, idx = loss_fn(x)
    grads = torch.autograd.grad(loss, [getattr(sae, n) for n in PARAMS] + [x])
    return loss.detach(), idx, dict(zip(PARAMS + ("x",), grads, strict=True))


def dead_mask(n_dead: int, seed: int = 5) -> torch.Tensor:
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(seed))[:n_dead]] = True
    return dead


# n_dead vs k_aux = 8 and AUX_DENSE_MAX = 3: all dead taken (5), dense columns + top-k (20), sparse (40).
@pytest.mark.parametrize("beta,value_mode", [(0.0, "z"), (1.5, "z"), (1.5, "score")])
@pytest.mark.parametrize("n_dead", [0, 5, 20, 40])
def test_sparse_training_path_matches_dense_reference_values_and_grads(beta, value_mode, n_dead):
    from gsae import sae as sae_mod

    assert 5 <= 8 < 20 <= sae_mod.AUX_DENSE_MAX * 8 < 40  # the cases really cover the three AuxK paths
    x, g = data(300)
    sae = make(beta, value_mode=value_mode, grad_scale=0.6)
    with torch.no_grad():
        sae.b_enc.add_(0.5)  # most pre-activations positive, so AuxK gradients are non-zero
    dead = dead_mask(n_dead) if n_dead else None
    ref_loss, ref_idx, ref = grads_of(lambda xx: dense_reference_loss(sae, xx, g, dead, 8), sae, x)
    loss, idx, ours = grads_of(lambda xx: fast_loss(sae, xx, g, dead, 8), sae, x)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss.item(), ref_loss.item())
    for name, r in ref.items():
        scale = r.abs().max().item()
        assert scale > 0, name
        err = (ours[name] - r).abs().max().item()
        assert err < 1e-5 * scale + 1e-7, (name, err, scale)


def test_forward_values_are_bit_identical_to_dense_topk():
    """With autograd on, the values the sparse path produces are exactly those of the dense formulas."""
    x, g = data()
    for beta, mode in ((0.0, "z"), (2.0, "z"), (2.0, "score")):
        sae = make(beta, value_mode=mode)
        enc = sae.encode(x, g)
        assert enc.top_acts.requires_grad
        with torch.no_grad():
            z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
            s = z if beta == 0 else z + beta * z * (g @ sae.W_dec.T).abs()
            top_s, idx = s.topk(K, dim=-1, sorted=False)
            vals = (top_s if mode == "score" else z.gather(-1, idx)).relu()
        assert torch.equal(enc.top_indices, idx) and torch.equal(enc.top_acts, vals) and torch.equal(enc.pre_acts, z)
        with torch.no_grad():
            assert torch.equal(sae.encode(x, g).top_acts, vals)


def test_pre_acts_output_keeps_its_dense_gradient():
    """EncoderOutput.pre_acts stays differentiable: d sum(z) / d b_enc = N for every latent."""
    x, _ = data(50)
    sae = make(0.0)
    (gb,) = torch.autograd.grad(sae.encode(x).pre_acts.sum(), [sae.b_enc])
    assert torch.equal(gb, torch.full((D_SAE,), 50.0))


def test_sampled_dots_half_precision_fallback_matches_dense():
    from gsae.sae import _sampled_dots

    gen = torch.Generator().manual_seed(0)
    U, E = torch.randn(37, D_IN, generator=gen), torch.randn(D_SAE, D_IN, generator=gen)
    idx = torch.rand(37, D_SAE, generator=gen).topk(K, dim=-1).indices
    ref = (U.double() @ E.double().T).gather(-1, idx)
    assert torch.allclose(_sampled_dots(U, E, idx).double(), ref, atol=1e-5)
    assert torch.allclose(_sampled_dots(U.double(), E.double(), idx), ref, atol=1e-12)
    half = _sampled_dots(U.bfloat16(), E.bfloat16(), idx).double()
    assert torch.allclose(half, ref, atol=0.1 * ref.abs().max().item())
