"""gsae.stages.release (the dashboards half): one page per arm from the pipeline's data sources (replaced here by
tiny in-memory ones), checked against hand computations of what the pages must show: the "changed" group of TopK from
the g-SAE's selection rule on TopK's weights, the nearest decoder direction of the other arm, >= 64 latents per
arm."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer, HookedTransformerConfig

from gsae.analysis.dashboard_html import find_chromium
from gsae.config import SAEConfig, TrainConfig, load_profile
from gsae.harvest import HarvestRows
from gsae.sae import GSAE
from gsae.specs import SAESpec
from gsae.stages import release as dashboards

D, D_SAE, K, N_CTX, T, BETA = 32, 160, 8, 40, 16, 0.5


class ToyTokenizer:
    def decode(self, ids):
        return "".join(f" w{i}" for i in ids)


def sae(beta: float, seed: int) -> GSAE:
    m = GSAE(SAEConfig(d_in=D, d_sae=D_SAE, k=K, beta=beta, grad_scale=0.7), seed=seed)
    with torch.no_grad():
        m.b_enc.normal_(std=0.05, generator=torch.Generator().manual_seed(seed))
    return m


@pytest.fixture
def setup(monkeypatch, tmp_path):
    p = load_profile("smoke")
    k, seed = p.experiment.beta_select_k, p.experiment.seeds[0]
    gen = torch.Generator().manual_seed(0)
    ctx_tokens = torch.randint(0, 100, (N_CTX, T), generator=gen)
    row_ctx = torch.arange(N_CTX).repeat_interleave(T - 1)
    row_pos = torch.arange(1, T).repeat(N_CTX)
    n = row_ctx.numel()
    rows = HarvestRows(torch.randn(n, D, generator=gen), 3 * torch.randn(n, D, generator=gen),
                       {"ctx_index": row_ctx, "pos": row_pos, "tokens": ctx_tokens[row_ctx, row_pos]})
    pos = torch.randint(-1, 4, (n,), generator=gen)
    saes = {"topk": sae(0.0, 1), "gsae": sae(BETA, 2)}
    specs = [SAESpec("primary", arm, k, seed, m.cfg, TrainConfig()) for arm, m in saes.items()]
    specs.append(SAESpec("primary", "topk", k, seed + 1, saes["topk"].cfg, TrainConfig()))  # not shown
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=D, d_head=8, n_heads=4, d_mlp=64,
                                                      d_vocab=100, n_ctx=T, act_fn="gelu", normalization_type="LN"))
    lm = SimpleNamespace(model=model, tokenizer=ToyTokenizer(), info={"model_hash": "test"})
    monkeypatch.setattr(dashboards, "load_trained", lambda p_, s, mh: saes[s.arm])
    monkeypatch.setattr(dashboards, "probe_labels",
                        lambda p_, lm_: {"pos": pos, "tag_vocab": ("nn", "vb", "jj", "at")})
    monkeypatch.setattr(dashboards, "reader", lambda p_, split, mh: SimpleNamespace(load_all=lambda: rows))
    monkeypatch.setattr(dashboards, "contexts", lambda p_, tok, mh: {"test": SimpleNamespace(tokens=ctx_tokens)})
    monkeypatch.setattr(dashboards, "results_dir", lambda p_: tmp_path / "results")
    monkeypatch.setattr(dashboards, "figures_dir", lambda p_: tmp_path / "figures")
    return SimpleNamespace(p=p, lm=lm, specs=specs, saes=saes, rows=rows, tmp=tmp_path, k=k, seed=seed)


def firing(m: GSAE, x, g=None) -> torch.Tensor:
    with torch.no_grad():
        return m.to_dense(m.encode(x, g)) > 0


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    both, either = (a & b).sum(0).double(), (a | b).sum(0).double()
    return torch.where(either > 0, 1 - both / either.clamp_min(1), torch.zeros_like(either))


def test_pages_for_both_arms_match_hand_computations(setup):
    s = setup
    out = dashboards.write_dashboards(s.p, s.lm, s.specs, screenshots=False)
    assert set(out.pages) == {"topk", "gsae"}
    for arm, page in out.pages.items():
        assert page == s.tmp / "results" / "dashboards" / f"{arm}-k{s.k}-s{s.seed}.html"
        assert out.n_latents[arm] == 72 and len(out.dashboards[arm].cards) == 72
        groups = [c.group for c in out.dashboards[arm].cards]
        assert groups.count("frequent") == groups.count("changed") == groups.count("random") == 24

    # TopK's "changed" group: the g-SAE's rule (its beta) on TopK's own weights and grad_scale, by hand.
    topk, g_sae = s.saes["topk"], s.saes["gsae"]
    by_hand = GSAE(SAEConfig(d_in=D, d_sae=D_SAE, k=K, beta=BETA, grad_scale=topk.cfg.grad_scale))
    by_hand.load_state_dict(topk.state_dict())
    x, g = s.rows.x, s.rows.g
    plain, gsel = firing(topk, x), firing(by_hand, x, g)
    dist = jaccard(plain, gsel)
    assert dist.max() > 0.2  # the gradient really changes TopK's selection here
    cards = out.dashboards["topk"].cards
    changed = [c for c in cards if c.group == "changed"]
    for c in changed:
        assert c.change[3] == pytest.approx(float(dist[c.latent]))
        assert c.change[:3] == (int(plain[:, c.latent].sum()), int(gsel[:, c.latent].sum()),
                                int((plain & gsel)[:, c.latent].sum()))
    frequent = {c.latent for c in cards if c.group == "frequent"}
    union = (plain | gsel).sum(0)
    eligible = [j for j in range(D_SAE) if j not in frequent and plain[:, j].any() and union[j] >= 10]
    assert changed[0].change[3] == pytest.approx(max(float(dist[j]) for j in eligible))
    assert "applied to this SAE's weights" in out.changed_from["topk"]

    # The g-SAE's own g-encode, and the nearest TopK decoder direction of each shown latent.
    g_plain, g_g = firing(g_sae, x), firing(g_sae, x, g)
    gdist = jaccard(g_plain, g_g)
    for c in out.dashboards["gsae"].cards:
        assert c.change[3] == pytest.approx(float(gdist[c.latent]))
        cos = F.cosine_similarity(g_sae.W_dec[c.latent].detach()[None], topk.W_dec.detach(), dim=1)
        assert c.nearest == (int(cos.argmax()), pytest.approx(float(cos.max()), abs=1e-5))
    assert "own g-encode" in out.changed_from["gsae"]
    html = out.pages["topk"].read_text()
    assert "applied to this SAE&#x27;s weights" in html and "g-SAE (k = 8, seed 0)" in html


def test_without_a_gradient_arm_random_latents_fill_the_changed_slots(setup):
    s = setup
    out = dashboards.write_dashboards(s.p, s.lm, [sp for sp in s.specs if sp.arm == "topk"], screenshots=False)
    groups = [c.group for c in out.dashboards["topk"].cards]
    assert (groups.count("frequent"), groups.count("changed"), groups.count("random")) == (24, 0, 48)
    assert out.changed_from["topk"].startswith("nothing")
    assert all(c.nearest is None for c in out.dashboards["topk"].cards)  # no other arm to compare with


def test_missing_primary_sae_is_a_clear_error(setup):
    with pytest.raises(FileNotFoundError, match="run the train stage"):
        dashboards.write_dashboards(setup.p, setup.lm, setup.specs[2:], screenshots=False)


def test_encode_rows_in_chunks_equals_one_pass(setup):
    m, x, g = setup.saes["gsae"], setup.rows.x, setup.rows.g
    codes = dashboards.encode_rows(m, x, g, chunk_rows=7)
    with torch.no_grad():
        ref = m.encode(x, g)
    dense = torch.zeros(x.shape[0], D_SAE).scatter_(1, codes.top_indices, codes.top_acts)
    # equal up to float rounding: BLAS blocks a 7-row product differently from a 600-row one
    assert torch.allclose(dense, m.to_dense(ref), rtol=1e-5, atol=1e-6)
    assert dashboards.gradient_view(m, None) is m
    assert dashboards.gradient_view(setup.saes["topk"], None) is None


@pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH")
def test_screenshots_are_pngs_with_provenance(setup):
    s = setup
    out = dashboards.write_dashboards(s.p, s.lm, s.specs, provenance={"run": "test"})
    for arm, png in out.screenshots.items():
        assert png == s.tmp / "figures" / f"dashboard_{arm}-k{s.k}-s{s.seed}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    prov = json.loads((s.tmp / "figures" / "provenance.json").read_text())
    assert prov == {f"dashboard_{a}-k{s.k}-s{s.seed}.png": {"run": "test"} for a in ("topk", "gsae")}
