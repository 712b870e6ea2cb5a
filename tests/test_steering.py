"""gsae.steering against independent references: a hand-rolled hook + softmax loop, numpy argsort of a hand-written
direct path, the same model after TransformerLens' own weight processing, and numpy/statistics medians."""

from __future__ import annotations

import copy
import statistics

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from gsae.steering import (
    SteeringResult,
    median_activation_norm,
    promoted_tokens,
    sample_live_latents,
    steer,
)

HOOK = "blocks.1.hook_resid_pre"
T = 12


def tiny_model(normalization_type: str = "LN", seed: int = 0) -> HookedTransformer:
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=100, n_ctx=32,
                                  act_fn="gelu", normalization_type=normalization_type, seed=seed, device="cpu")
    model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial norm weights, so folding them (or not) matters
        for name, p in model.named_parameters():
            if ".ln" in name or name.startswith("ln"):
                p.copy_((1.0 if name.endswith(".w") else 0.0) + 0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return tiny_model()


def unit_directions(n: int, d: int = 32, seed: int = 2) -> torch.Tensor:
    v = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm(dim=-1, keepdim=True)


def contexts(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 100, (n, T), generator=torch.Generator().manual_seed(seed))


def hand_rolled(model, direction, context, hook, alpha, top, first=1):
    """One latent, one context: explicit hook, explicit softmax / KL formula, explicit loops over positions."""

    def add(act, hook):
        act = act.clone()
        act[:, first:] = act[:, first:] + alpha * direction
        return act

    with torch.no_grad():
        clean = model(context[None], return_type="logits")[0].double()
        steered = model.run_with_hooks(context[None], return_type="logits", fwd_hooks=[(hook, add)])[0].double()
    kls, gains = [], []
    for p in range(first, context.shape[0] - 1):
        lp = clean[p] - torch.logsumexp(clean[p], 0)
        lq = steered[p] - torch.logsumexp(steered[p], 0)
        kls.append(float((lp.exp() * (lp - lq)).sum()))
        gains.append(float(np.mean([float(lq[t] - lp[t]) for t in top])))
    return float(np.mean(kls)), float(np.mean(gains))


@pytest.mark.parametrize("hook, n_lat", [(HOOK, 3), ("blocks.0.hook_resid_post", 1), ("blocks.1.hook_resid_post", 1),
                                         ("blocks.1.hook_resid_mid", 1)])
def test_steer_matches_hand_rolled_loop(model, hook, n_lat):
    # resid_pre / resid_post restart the forward at the hook (start_at_layer); resid_mid takes the full-forward
    # hook path. Both must equal an explicit hook on the full forward.
    dirs, toks, alphas = unit_directions(n_lat), contexts(2), [0.5, 3.0]
    top = promoted_tokens(model, dirs, 4)
    res = steer(model, dirs, toks, hook, alphas, top_tokens=top, batch=3, progress=False)
    assert isinstance(res, SteeringResult) and res.kl.shape == (n_lat, 2) and res.logprob_gain.shape == (n_lat, 2)
    assert res.n_scored == 2 * (T - 2)
    for i in range(n_lat):
        for j, a in enumerate(alphas):
            per_ctx = [hand_rolled(model, dirs[i], toks[c], hook, a, top[i].tolist()) for c in range(2)]
            kl_ref, gain_ref = np.mean([k for k, _ in per_ctx]), np.mean([g for _, g in per_ctx])
            assert res.kl[i, j].item() == pytest.approx(kl_ref, abs=1e-5, rel=1e-5)
            assert res.logprob_gain[i, j].item() == pytest.approx(gain_ref, abs=1e-5, rel=1e-5)
    assert (res.kl > 1e-4).all()  # the comparison is not vacuous


def test_first_zero_steers_position_zero_too(model):
    dirs, toks = unit_directions(1), contexts(1)
    top = promoted_tokens(model, dirs, 3)
    res = steer(model, dirs, toks, HOOK, [2.0], first=0, top_tokens=top, progress=False)
    kl_ref, gain_ref = hand_rolled(model, dirs[0], toks[0], HOOK, 2.0, top[0].tolist(), first=0)
    assert res.kl.item() == pytest.approx(kl_ref, abs=1e-5, rel=1e-5)
    assert res.logprob_gain.item() == pytest.approx(gain_ref, abs=1e-5, rel=1e-5)
    assert res.n_scored == T - 1


def test_kl_zero_at_alpha_zero_and_grows(model):
    dirs, toks = unit_directions(4, seed=5), contexts(3)
    alphas = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    res = steer(model, dirs, toks, HOOK, alphas, top_tokens=promoted_tokens(model, dirs, 5), batch=7, progress=False)
    assert res.kl[:, 0].abs().max().item() < 1e-7
    assert res.logprob_gain[:, 0].abs().max().item() < 1e-6
    assert (res.kl[:, 1:] > 0).all()
    assert (torch.diff(res.kl, dim=1) > 0).all(), res.kl
    assert res.alphas.tolist() == alphas


def test_batching_invariance(model):
    dirs, toks = unit_directions(3), contexts(4)
    top = promoted_tokens(model, dirs, 5)
    results = [steer(model, dirs, toks, HOOK, [0.5, 2.0], top_tokens=top, batch=b, progress=False)
               for b in (1, 5, 8, 100)]
    for r in results[1:]:
        torch.testing.assert_close(r.kl, results[0].kl, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r.logprob_gain, results[0].logprob_gain, atol=1e-6, rtol=1e-6)


def test_no_top_tokens_gives_no_gain(model):
    res = steer(model, unit_directions(2), contexts(2), HOOK, [1.0], progress=False)
    assert res.logprob_gain is None and res.kl.shape == (2, 1)


def test_promoted_tokens_hand_direct_path():
    model = tiny_model("LN")
    dirs = unit_directions(6, seed=7)
    # Direct path by hand, in float64 numpy: LayerNorm centres d, then ln_final.w, then W_U.
    d = dirs.double().numpy()
    d = (d - d.mean(-1, keepdims=True)) * model.ln_final.w.detach().double().numpy()
    scores = d @ model.W_U.detach().double().numpy()
    expected = np.argsort(-scores, axis=-1, kind="stable")[:, :5]
    got = promoted_tokens(model, dirs, 5)
    assert got.dtype == torch.int64 and got.shape == (6, 5)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_promoted_tokens_rms_is_plain_matmul():
    model = tiny_model("RMS")
    dirs = unit_directions(4, seed=8)
    scores = (dirs.double().numpy() * model.ln_final.w.detach().double().numpy()) @ model.W_U.detach().double().numpy()
    expected = np.argsort(-scores, -1, kind="stable")[:, :7]
    np.testing.assert_array_equal(promoted_tokens(model, dirs, 7).numpy(), expected)


def test_promoted_tokens_invariant_under_weight_processing():
    # TransformerLens' fold_ln + centre_writing_weights + centre_unembed must not change what a direction
    # promotes: the same ranking from the raw and the processed model.
    raw = tiny_model("LN", seed=4)
    processed = copy.deepcopy(raw)
    processed.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    assert not hasattr(processed.ln_final, "w")  # really folded
    dirs = unit_directions(8, seed=9)
    np.testing.assert_array_equal(promoted_tokens(raw, dirs, 10).numpy(), promoted_tokens(processed, dirs, 10).numpy())


def test_sample_live_latents():
    counts = torch.zeros(50, dtype=torch.int64)
    live = torch.tensor([3, 7, 8, 20, 21, 30, 41, 42, 48, 49])
    counts[live] = torch.arange(1, 11)
    s = sample_live_latents(counts, 4, seed=0)
    assert s.dtype == torch.int64 and s.numel() == 4 and len(set(s.tolist())) == 4
    assert set(s.tolist()) <= set(live.tolist()) and s.tolist() == sorted(s.tolist())
    assert torch.equal(s, sample_live_latents(counts, 4, seed=0))  # deterministic
    assert sample_live_latents(counts, 100, seed=0).tolist() == live.tolist()  # fewer live than asked
    assert sample_live_latents(torch.zeros(5, dtype=torch.int64), 3, seed=0).numel() == 0
    # Uniform: over many seeds each live latent is picked with probability 4 / 10.
    hits = torch.zeros(50)
    n_seeds = 2000
    for seed in range(n_seeds):
        hits[sample_live_latents(counts, 4, seed)] += 1
    assert hits[counts == 0].sum() == 0
    freq = hits[live] / n_seeds
    assert (freq - 0.4).abs().max() < 0.05, freq  # binomial sd ~0.011
    assert len({tuple(sample_live_latents(counts, 4, seed).tolist()) for seed in range(10)}) > 1


@pytest.mark.parametrize("n", [7, 8])
def test_median_activation_norm(n):
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(n))
    norms = [sum(v * v for v in row) ** 0.5 for row in x.double().tolist()]
    assert median_activation_norm(x) == pytest.approx(statistics.median(norms), rel=1e-12)


def test_bad_inputs_raise(model):
    dirs, toks = unit_directions(2), contexts(2)
    with pytest.raises(ValueError, match="directions"):
        steer(model, dirs[:, :5], toks, HOOK, [1.0], progress=False)
    with pytest.raises(ValueError, match="no hook"):
        steer(model, dirs, toks, "blocks.9.hook_resid_pre", [1.0], progress=False)
    with pytest.raises(ValueError, match="alphas"):
        steer(model, dirs, toks, HOOK, [], progress=False)
    with pytest.raises(ValueError, match="top_tokens"):
        steer(model, dirs, toks, HOOK, [1.0], top_tokens=torch.zeros(3, 2, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="scored prediction"):
        steer(model, dirs, toks[:, :2], HOOK, [1.0], progress=False)
    with pytest.raises(ValueError, match="1-D"):
        sample_live_latents(torch.ones(2, 2), 1, 0)
    with pytest.raises(ValueError, match="n_top"):
        promoted_tokens(model, dirs, 0)
