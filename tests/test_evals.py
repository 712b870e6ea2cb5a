"""Tests of gsae.evals against independent references: SAELens ``run_evals`` / ``get_recons_loss`` on the same
contexts, TransformerLens' own per-token loss with a hand-written splice hook, ``gsae.harvest.capture`` and
central finite differences for the gradient, and numpy hand computations of KL / FVU / MSE / L0."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import tiny_text
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import gsae.evals as E
from gsae.config import SAEConfig
from gsae.harvest import capture
from gsae.sae import GSAE

HOOK = "blocks.1.hook_resid_pre"
D, V, T = 32, 100, 32


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> HookedTransformer:
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=2, d_model=D, d_head=8, n_heads=4, d_mlp=64, d_vocab=V, n_ctx=T,
                                  act_fn="gelu", normalization_type="LN", dtype=dtype, seed=seed, device="cpu")
    return HookedTransformer(cfg)


def progressions(n: int, gen: torch.Generator) -> torch.Tensor:
    return tiny_text.progressions(n, gen, V, T)


@pytest.fixture(scope="module")
def lm():
    """A tiny LM trained for 100 Adam steps (CE on random LMs is degenerate), eval tokens and train activations."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster and immune to a busy second core
    gen = torch.Generator().manual_seed(0)
    model = tiny_text.fit(tiny_model(), 100, gen, V, T)
    train_tokens, tokens = progressions(64, gen), progressions(16, gen)
    cap = capture(model, train_tokens, HOOK)
    x_train = cap.x[:, 1:-1].reshape(-1, D)
    g_train = cap.g[:, 1:-1].reshape(-1, D)
    yield SimpleNamespace(model=model, tokens=tokens, x_train=x_train, mean_act=x_train.mean(0),
                          grad_scale=math.sqrt(D / g_train.pow(2).sum(-1).mean().item()))
    torch.set_num_threads(old_threads)


@pytest.fixture(scope="module")
def topk(lm) -> GSAE:
    """A TopK SAE (beta = 0) fitted for 100 steps to the train activations."""
    sae = GSAE(SAEConfig(d_in=D, d_sae=128, k=6), seed=0)
    sae.init_b_dec(lm.x_train)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(100):
        fvu = sae(lm.x_train).fvu
        opt.zero_grad()
        fvu.backward()
        opt.step()
        sae.set_decoder_norm_to_unit()
    return sae


@pytest.fixture(scope="module")
def gsae(lm, topk) -> GSAE:
    """The same weights with gradient-aware selection (beta = 2, dataset-scaled gradient)."""
    sae = GSAE(SAEConfig(d_in=D, d_sae=128, k=6, beta=2.0, grad_scale=lm.grad_scale))
    sae.load_state_dict(topk.state_dict())
    return sae


@pytest.fixture(scope="module")
def baselines(lm) -> E.AblationBaselines:
    return E.ablation_baselines(lm.model, lm.tokens, HOOK, mean_act=lm.mean_act, progress=False)


class IdentitySAE:
    """Encodes x as itself on d latents and decodes it back exactly."""

    cfg = SimpleNamespace(beta=0.0, d_sae=D)

    def encode(self, x, g=None):
        return x, torch.arange(D).expand_as(x)

    def decode(self, acts, idx):
        return acts


class ConstantSAE(IdentitySAE):
    """Decodes every token to one fixed vector (zeros -> zero ablation, the mean -> mean ablation)."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def decode(self, acts, idx):
        return self.value.expand_as(acts)


def tl_spliced_ce(model, tokens, x_hat, first: int) -> torch.Tensor:
    """Reference: TransformerLens' own per-token loss with a hand-written splice hook, mean over p >= first."""

    def splice(act, hook):
        out = act.clone()
        out[:, first:] = x_hat[:, first:]
        return out

    with torch.no_grad():
        per_tok = model.run_with_hooks(tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(HOOK, splice)])
    return per_tok[:, first:].double().mean()


# ------------------------------------------------------------------------------------------ ends of the scale
def test_lm_is_trained_well_below_uniform(baselines):
    assert baselines.ce_clean < 0.5 * math.log(V), baselines
    assert baselines.ce_zero > 2 * baselines.ce_clean and baselines.ce_mean > 2 * baselines.ce_clean
    assert baselines.n_tokens == 16 * (T - 2)


def test_identity_splice_recovers_everything(lm, baselines):
    r = E.evaluate_sae(lm.model, IdentitySAE(), lm.tokens, HOOK, encode_mode="plain", baselines=baselines,
                       progress=False)
    assert r.delta_ce == 0.0 and r.kl == 0.0 and r.fvu == 0.0 and r.mse == 0.0
    assert r.recovered_zero == 1.0 and r.recovered_mean == 1.0
    assert r.n_tokens == 16 * (T - 2) and r.l0 == D and r.dead_fraction == 0.0
    assert torch.equal(r.firing_counts, torch.full((D,), r.n_tokens))


def test_zero_and_mean_reconstructions_recover_nothing(lm, baselines):
    zero = E.evaluate_sae(lm.model, ConstantSAE(torch.zeros(D)), lm.tokens, HOOK, encode_mode="plain",
                          baselines=baselines, progress=False)
    mean = E.evaluate_sae(lm.model, ConstantSAE(lm.mean_act), lm.tokens, HOOK, encode_mode="plain",
                          baselines=baselines, progress=False)
    assert abs(zero.recovered_zero) < 1e-6 and abs(zero.ce_spliced - baselines.ce_zero) < 1e-6
    assert abs(mean.recovered_mean) < 1e-6 and abs(mean.ce_spliced - baselines.ce_mean) < 1e-6
    # FVU of a zero reconstruction is sum ||x||^2 / sum ||x - mean||^2 over the scored positions, by hand.
    x = lm.model.run_with_cache(lm.tokens, names_filter=[HOOK])[1][HOOK][:, 1:-1].reshape(-1, D).double()
    assert zero.fvu == pytest.approx((x.pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(), rel=1e-9)
    assert zero.mse == pytest.approx(x.pow(2).mean().item(), rel=1e-9)


def test_ablation_baselines_equal_patched_full_forwards_bit_for_bit(lm, baselines):
    # The ablations restart at the hook's block; the reference runs every block with a patching hook
    # (TransformerLens' hook path) and sums the per-token CE the same way, batch by batch.
    from gsae.lm import patched_logits, per_token_ce

    sums = {"clean": 0.0, "zero": 0.0, "mean": 0.0}
    for s in range(0, lm.tokens.shape[0], 8):
        tok = lm.tokens[s:s + 8]
        with torch.no_grad():
            sums["clean"] += per_token_ce(lm.model(tok, return_type="logits"), tok, 1).double().sum().item()
        for name, value in (("zero", torch.zeros(D)), ("mean", lm.mean_act)):
            logits = patched_logits(lm.model, tok, HOOK, 1, lambda act, v=value: v)
            sums[name] += per_token_ce(logits, tok, 1).double().sum().item()
    n = lm.tokens.shape[0] * (T - 2)
    assert (baselines.ce_clean, baselines.ce_zero, baselines.ce_mean) == (sums["clean"] / n, sums["zero"] / n,
                                                                         sums["mean"] / n)
    assert baselines.ce_zero > baselines.ce_clean  # the ablations change the logits: not vacuous


# ------------------------------------------------------------------------------------------ SAELens reference
@pytest.mark.filterwarnings("ignore::UserWarning")  # SAELens: "fewer samples than training tokens", tensor copy
def test_topk_matches_saelens_run_evals_on_the_same_contexts(lm, topk):
    import datasets
    from sae_lens import ActivationsStore, TopKSAE, TopKSAEConfig, run_evals
    from sae_lens.evals import EvalConfig, get_recons_loss
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.activation_scaler import ActivationScaler

    sl = TopKSAE(TopKSAEConfig(d_in=D, d_sae=128, k=6, apply_b_dec_to_input=True, normalize_activations="none",
                               rescale_acts_by_decoder_norm=False,
                               metadata=SAEMetadata(hook_name=HOOK, context_size=T, prepend_bos=False)))
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sl, name).copy_(getattr(topk, name))
    ds = datasets.Dataset.from_dict({"tokens": lm.tokens.tolist()})

    def store():  # buffer: n_batches_in_buffer * context_size must be >= train_batch_size_tokens
        return ActivationsStore.from_sae(lm.model, sl, ds, streaming=False, store_batch_size_prompts=8,
                                         n_batches_in_buffer=4, train_batch_size_tokens=64, device="cpu")

    assert torch.equal(store().get_batch_tokens(16), lm.tokens)  # run_evals will see exactly our contexts
    metrics, _ = run_evals(sl, store(), lm.model, ActivationScaler(),
                           EvalConfig(batch_size_prompts=8, n_eval_reconstruction_batches=2, compute_kl=True,
                                      compute_ce_loss=True), exclude_special_tokens=False)
    theirs = metrics["model_performance_preservation"]
    # SAELens splices every position and averages CE over predictions 0..T-2: our exclude_pos0=False.
    ours = E.splice_ce(lm.model, topk, lm.tokens, HOOK, encode_mode="plain", exclude_pos0=False, per_token=True,
                       progress=False)
    pairs = {"ce_clean": "ce_loss_without_sae", "ce_spliced": "ce_loss_with_sae", "ce_zero": "ce_loss_with_ablation",
             "recovered_zero": "ce_loss_score"}
    rel = {k: abs(getattr(ours, k) - theirs[v]) / abs(theirs[v]) for k, v in pairs.items()}
    print("relative |ours - SAELens|:", rel)
    assert max(rel.values()) < 1e-5, rel
    assert ours.delta_ce > 0.01  # a real, imperfect SAE: the comparison is not between two identities

    # Per token: SAELens' KL also covers the target-less last position; compare positions 0..T-2.
    ref = get_recons_loss(sl, lm.model, ActivationScaler(), lm.tokens, compute_kl=True, compute_ce_loss=True,
                          hook_name=HOOK)
    kl_diff = (ref["kl_div_with_sae"][:, :-1] - ours.per_token.kl).abs().max().item()
    ce_diff = (ref["ce_loss_with_sae"] - ours.per_token.ce_spliced).abs().max().item()
    print(f"per-token max |diff|: KL {kl_diff:.2e}, CE {ce_diff:.2e}")
    assert kl_diff < 1e-5 and ce_diff < 1e-5


# ------------------------------------------------------------------------------------------ splice rule, g-encode
def test_pos0_is_kept_clean_and_unscored(lm, topk, baselines):
    r = E.evaluate_sae(lm.model, topk, lm.tokens, HOOK, encode_mode="plain", baselines=baselines, per_token=True,
                       progress=False)
    x = lm.model.run_with_cache(lm.tokens, names_filter=[HOOK])[1][HOOK]
    enc = topk.encode(x)
    ref = tl_spliced_ce(lm.model, lm.tokens, topk.decode(enc.top_acts, enc.top_indices), first=1)
    assert r.ce_spliced == pytest.approx(ref.item(), rel=1e-6)
    assert r.per_token.ce_spliced.shape == (16, T - 2)
    assert r.l0 == pytest.approx((enc.top_acts[:, 1:-1] > 0).sum(-1).double().mean().item(), rel=1e-12)


def test_g_encode_differs_for_beta_positive_and_coincides_for_topk(lm, topk, gsae, baselines):
    res = E.evaluate_saes(lm.model, {"topk": topk, "g": gsae}, lm.tokens, HOOK, baselines=baselines, progress=False)
    t_g, t_plain = res["topk"]["g"], res["topk"]["plain"]
    assert {k: v for k, v in t_g.scalars().items() if k != "encode_mode"} == \
        {k: v for k, v in t_plain.scalars().items() if k != "encode_mode"}
    assert torch.equal(t_g.firing_counts, t_plain.firing_counts)
    g_g, g_plain = res["g"]["g"], res["g"]["plain"]
    assert g_plain.ce_spliced == t_plain.ce_spliced  # same weights, plain encoder: same SAE
    assert g_g.ce_spliced != g_plain.ce_spliced and not torch.equal(g_g.firing_counts, g_plain.firing_counts)

    # Reference for the g path: the harvest's capture gives (x, g); encode, decode and splice with TL's loss.
    cap = capture(lm.model, lm.tokens, HOOK)
    enc = gsae.encode(cap.x, cap.g)
    ref = tl_spliced_ce(lm.model, lm.tokens, gsae.decode(enc.top_acts, enc.top_indices), first=1)
    assert g_g.ce_spliced == pytest.approx(ref.item(), rel=1e-6)
    print(f"g-encode CE {g_g.ce_spliced:.5f} vs plain {g_plain.ce_spliced:.5f} (clean {g_g.ce_clean:.5f})")


def test_batching_and_reruns_do_not_change_results(lm, gsae, baselines):
    a = E.evaluate_sae(lm.model, gsae, lm.tokens, HOOK, encode_mode="g", baselines=baselines, progress=False)
    b = E.evaluate_sae(lm.model, gsae, lm.tokens, HOOK, encode_mode="g", baselines=baselines, progress=False)
    c = E.evaluate_sae(lm.model, gsae, lm.tokens, HOOK, encode_mode="g", baselines=baselines, batch_contexts=3,
                       progress=False)
    assert a.scalars() == b.scalars() and torch.equal(a.firing_counts, b.firing_counts)
    for k in ("ce_spliced", "kl", "fvu", "mse", "l0"):
        assert getattr(c, k) == pytest.approx(getattr(a, k), rel=1e-5), k


def test_a_killed_evaluation_resumes_from_its_checkpoint_to_the_same_bits(lm, topk, gsae, baselines, tmp_path,
                                                                          monkeypatch):
    """The checkpoint keeps the running sums after every batch: killed after 2 of 4 batches and rerun, the
    evaluation does only the last 2 batches' clean passes and returns exactly the uninterrupted numbers."""
    saes = {"topk": topk, "gsae": gsae}
    kw = dict(baselines=baselines, encode_modes=("plain", "g"), batch_contexts=4, progress=False)
    want = E.evaluate_saes(lm.model, saes, lm.tokens, HOOK, **kw)
    ckpt = tmp_path / "sums.pt"
    real, calls = E.clean_pass, []

    def dies_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "clean_pass", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        E.evaluate_saes(lm.model, saes, lm.tokens, HOOK, checkpoint=ckpt, **kw)
    assert ckpt.exists()
    calls.clear()
    got = E.evaluate_saes(lm.model, saes, lm.tokens, HOOK, checkpoint=ckpt, **kw)
    assert len(calls) == 2  # 16 contexts in batches of 4: batches 3 and 4 only
    for name in saes:
        for mode in ("plain", "g"):
            assert got[name][mode].scalars() == want[name][mode].scalars(), (name, mode)
            assert torch.equal(got[name][mode].firing_counts, want[name][mode].firing_counts)
    with pytest.raises(ValueError, match="another evaluation.*delete it"):  # other weights under the same name
        E.evaluate_saes(lm.model, {"topk": gsae, "gsae": gsae}, lm.tokens, HOOK, checkpoint=ckpt, **kw)
    with pytest.raises(ValueError, match="per_token"):
        E.evaluate_saes(lm.model, saes, lm.tokens, HOOK, checkpoint=ckpt, per_token=True, **kw)


def _counting_clean_pass(monkeypatch) -> list[int]:
    real, calls = E.clean_pass, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "clean_pass", counted)
    return calls


def test_an_evaluation_starts_after_a_subset_evaluation_of_its_first_contexts_to_the_same_bits(
        lm, topk, gsae, baselines, tmp_path, monkeypatch):
    """full_test's shortcut: two groups evaluated on the first 8 of 16 contexts (one with the gradient encoders,
    as the evaluate stage splits them) stand for the first 2 of 4 batches of a plain evaluation of both SAEs,
    which then splices only the last 2 batches and returns exactly the numbers of a run from its first batch."""
    saes, kw = {"topk": topk, "gsae": gsae}, dict(batch_contexts=4, progress=False)
    want = E.evaluate_saes(lm.model, saes, lm.tokens, HOOK, baselines=baselines, encode_modes=("plain",), **kw)
    first8 = E.ablation_baselines(lm.model, lm.tokens[:8], HOOK, mean_act=lm.mean_act, **kw)
    E.evaluate_saes(lm.model, {"gsae": gsae}, lm.tokens[:8], HOOK, baselines=first8, encode_modes=("plain", "g"),
                    checkpoint=tmp_path / "a.pt", **kw)
    E.evaluate_saes(lm.model, {"topk": topk}, lm.tokens[:8], HOOK, baselines=first8, encode_modes=("plain",),
                    checkpoint=tmp_path / "b.pt", **kw)
    calls = _counting_clean_pass(monkeypatch)

    def full(sources, ckpt, models=saes):
        calls.clear()
        return E.evaluate_saes(lm.model, models, lm.tokens, HOOK, baselines=baselines, encode_modes=("plain",),
                               checkpoint=tmp_path / ckpt, resume_from=sources, **kw)

    got = full([tmp_path / "a.pt", tmp_path / "b.pt"], "c.pt")
    assert len(calls) == 2  # batches 3 and 4 only
    for name in saes:
        assert got[name]["plain"].scalars() == want[name]["plain"].scalars(), name
        assert torch.equal(got[name]["plain"].firing_counts, want[name]["plain"].firing_counts)
    # Sources that do not cover every run, or hold other weights under a name, are passed over.
    full([tmp_path / "a.pt"], "d.pt")
    assert len(calls) == 4
    other = GSAE(SAEConfig(d_in=D, d_sae=128, k=6), seed=1)
    assert full([tmp_path / "a.pt", tmp_path / "b.pt"], "e.pt", {"topk": other, "gsae": gsae})["gsae"]["plain"] \
        .scalars() == want["gsae"]["plain"].scalars()
    assert len(calls) == 4
    # Other contexts first, or other batches: passed over.
    E.evaluate_saes(lm.model, saes, lm.tokens[8:], HOOK, baselines=E.ablation_baselines(
        lm.model, lm.tokens[8:], HOOK, **kw), encode_modes=("plain",), checkpoint=tmp_path / "f.pt", **kw)
    full([tmp_path / "f.pt"], "g.pt")
    assert len(calls) == 4
    calls.clear()
    E.evaluate_saes(lm.model, saes, lm.tokens, HOOK, baselines=baselines, encode_modes=("plain",), batch_contexts=8,
                    progress=False, checkpoint=tmp_path / "h.pt", resume_from=[tmp_path / "a.pt", tmp_path / "b.pt"])
    assert len(calls) == 2  # 16 contexts in batches of 8, from the first
    # Two sources that disagree on the clean CE of the same contexts are never mixed.
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    state["ce_clean_sum"] += 1e-9
    torch.save(state, tmp_path / "b.pt")
    with pytest.warns(UserWarning, match="disagree on the clean CE"):
        full([tmp_path / "a.pt", tmp_path / "b.pt"], "i.pt")
    assert len(calls) == 4
    with pytest.raises(ValueError, match="resume_from needs a checkpoint"):
        E.evaluate_saes(lm.model, saes, lm.tokens, HOOK, baselines=baselines, resume_from=[tmp_path / "a.pt"], **kw)


def test_clean_pass_gradient_matches_finite_differences_and_the_harvest():
    model = tiny_model(torch.float64, seed=3)
    model.requires_grad_(False)
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    cp = E.clean_pass(model, tokens, HOOK, first=1, need_grad=True)
    assert torch.allclose(cp.g, capture(model, tokens, HOOK).g, rtol=1e-10, atol=1e-12)
    direction = torch.randn(cp.x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def summed_ce(eps: float) -> float:
        def nudge(act, hook):
            return act + eps * direction

        with torch.no_grad():
            per_tok = model.run_with_hooks(tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(HOOK, nudge)])
        return per_tok.sum().item()

    fd = (summed_ce(1e-5) - summed_ce(-1e-5)) / 2e-5
    assert (cp.g * direction).sum().item() == pytest.approx(fd, rel=1e-6)


# ------------------------------------------------------------------------------------------ hand computations
def test_kl_by_hand():
    from gsae.lm import kl_per_token

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 7, generator=gen), torch.randn(3, 4, 7, generator=gen) * 2
    p = np.exp(a.double().numpy())
    p /= p.sum(-1, keepdims=True)
    q = np.exp(b.double().numpy())
    q /= q.sum(-1, keepdims=True)
    ref = (p * (np.log(p) - np.log(q))).sum(-1)
    ours = kl_per_token(torch.log_softmax(a, -1), b)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-7)
    assert kl_per_token(torch.log_softmax(a, -1), a).abs().max() < 1e-6


def test_reconstruction_stats_by_hand_over_uneven_batches():
    gen = torch.Generator().manual_seed(1)
    d, d_sae, k = 5, 9, 3
    xs = [torch.randn(n, d, generator=gen) * 0.1 + 100.0 for n in (4, 1, 7)]  # large mean: merge must not cancel
    stats = E.ReconstructionStats(d_sae)
    acts, idxs = [], []
    for x in xs:
        x_hat = x + torch.randn(x.shape, generator=gen) * 0.05
        a = torch.relu(torch.randn(x.shape[0], k, generator=gen))
        i = torch.stack([torch.randperm(d_sae, generator=gen)[:k] for _ in range(x.shape[0])])
        stats.add(x, x_hat, a, i)
        acts.append((x.double().numpy(), x_hat.double().numpy()))
        idxs.append((a.numpy(), i.numpy()))
    x = np.concatenate([u for u, _ in acts])
    xh = np.concatenate([v for _, v in acts])
    sse = ((x - xh) ** 2).sum()
    assert stats.fvu == pytest.approx(sse / ((x - x.mean(0)) ** 2).sum(), rel=1e-9)
    assert stats.mse == pytest.approx(sse / x.size, rel=1e-12)
    a = np.concatenate([u for u, _ in idxs])
    i = np.concatenate([v for _, v in idxs])
    assert stats.l0 == pytest.approx((a > 0).sum(1).mean(), rel=1e-12)
    counts = np.zeros(d_sae, dtype=np.int64)
    np.add.at(counts, i[a > 0], 1)
    np.testing.assert_array_equal(stats.counts.numpy(), counts)


def test_latent_frequency_histogram():
    h = E.latent_frequency_histogram(torch.tensor([0, 1, 10, 0, 100]), n_tokens=100)
    np.testing.assert_allclose(h.log10_freq, [-2.0, -1.0, 0.0])
    np.testing.assert_array_equal(h.alive_index, [1, 2, 4])
    assert h.n_dead == 2 and h.dead_fraction == 0.4 and h.n_tokens == 100
    with pytest.raises(ValueError, match="n_tokens"):
        E.latent_frequency_histogram(torch.tensor([5, 200]), n_tokens=100)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors(lm, topk, baselines):
    with pytest.raises(ValueError, match="encode_mode"):
        E.evaluate_sae(lm.model, topk, lm.tokens, HOOK, encode_mode="grad", baselines=baselines, progress=False)
    with pytest.raises(ValueError, match="ablation_baselines"):
        E.evaluate_sae(lm.model, topk, lm.tokens[:8], HOOK, encode_mode="plain", baselines=baselines, progress=False)
    with pytest.raises(ValueError, match="no hook"):
        E.ablation_baselines(lm.model, lm.tokens, "blocks.9.hook_resid_pre", progress=False)
    with pytest.raises(ValueError, match="integer tensor"):
        E.ablation_baselines(lm.model, lm.tokens[0], HOOK, progress=False)
    with pytest.raises(ValueError, match="mean_act"):
        E.ablation_baselines(lm.model, lm.tokens, HOOK, mean_act=torch.zeros(D + 1), progress=False)
    with pytest.raises(ValueError, match="exclude_pos0"):
        E.splice_ce(lm.model, topk, lm.tokens, HOOK, encode_mode="plain", exclude_pos0=False, baselines=baselines,
                    progress=False)


def test_fvu_typical_leaves_out_massive_rows_by_hand():
    """stages.evaluate.activation_metrics: the pooled FVU over all rows and over rows with norm <= cap, by numpy."""
    from gsae.stages.evaluate import MASSIVE_NORM_FACTOR, activation_metrics, massive_norm_cap

    gen = torch.Generator().manual_seed(3)
    d = 8
    x = torch.randn(200, d, generator=gen) + 2.0
    x[[5, 77, 150]] *= 300.0  # three massive tokens, as in SmolLM2's residual stream
    sae = GSAE(SAEConfig(d_in=d, d_sae=32, k=4))
    cap = massive_norm_cap(x[:120])
    assert cap == pytest.approx(MASSIVE_NORM_FACTOR * float(np.median(x[:120].double().norm(dim=-1).numpy())))
    out = activation_metrics(sae, x, torch.zeros_like(x), "plain", chunk=64, norm_cap=cap)
    with torch.no_grad():
        enc = sae.encode(x)
        xh = sae.decode(enc.top_acts, enc.top_indices).double().numpy()
    xn = x.double().numpy()
    keep = np.linalg.norm(xn, axis=1) <= cap

    def fvu(a, b):
        return ((a - b) ** 2).sum() / ((a - a.mean(0)) ** 2).sum()

    assert out["n_massive"] == 3 and int((~keep).sum()) == 3
    assert out["fvu"] == pytest.approx(fvu(xn, xh), rel=1e-9)
    assert out["fvu_typical"] == pytest.approx(fvu(xn[keep], xh[keep]), rel=1e-9)
    assert "fvu_typical" not in activation_metrics(sae, x, torch.zeros_like(x), "plain")


def test_clean_above_keeps_massive_positions_clean_in_the_splice(lm, baselines):
    """With every position above the cap the splice is the clean forward (delta_ce 0, KL 0); with none above it,
    the result equals the plain evaluation."""
    sae = GSAE(SAEConfig(d_in=D, d_sae=128, k=6), seed=0)
    all_clean = E.evaluate_saes(lm.model, {"s": sae}, lm.tokens, HOOK, baselines=baselines, encode_modes=("plain",),
                                clean_above=-1.0, progress=False)["s"]["plain"]
    assert abs(all_clean.delta_ce) < 1e-6 and all_clean.kl < 1e-6
    none = E.evaluate_saes(lm.model, {"s": sae}, lm.tokens, HOOK, baselines=baselines, encode_modes=("plain",),
                           clean_above=1e9, progress=False)["s"]["plain"]
    plain = E.evaluate_saes(lm.model, {"s": sae}, lm.tokens, HOOK, baselines=baselines, encode_modes=("plain",),
                            progress=False)["s"]["plain"]
    assert none.delta_ce == plain.delta_ce and none.fvu == plain.fvu


def test_ce_and_kl_from_one_log_softmax_are_the_separate_functions_bit_for_bit():
    """The splice evaluation's shared log-softmax (``lm.ce_and_kl``) must not move a single number."""
    from gsae.lm import ce_and_kl, kl_per_token, per_token_ce

    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 9, 50, generator=gen)
    tokens = torch.randint(0, 50, (3, 9), generator=gen)
    logp_ref = torch.log_softmax(3 * torch.randn(3, 7, 50, generator=gen), dim=-1)
    ce, kl = ce_and_kl(logits, tokens, 1, logp_ref)
    assert torch.equal(ce, per_token_ce(logits, tokens, 1))
    assert torch.equal(kl, kl_per_token(logp_ref, logits[:, 1:8]))
