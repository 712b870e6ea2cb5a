"""gsae.stages.evaluate's C2 window: the dead fractions of several SAEs read in one pass over a harvested split equal
a direct count over every row, and one SAE's number does not depend on the SAEs read beside it."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from gsae import harvest as H
from gsae.config import HarvestConfig, SAEConfig
from gsae.reader import ActivationReader
from gsae.sae import GSAE
from gsae.stages.evaluate import dead_fractions_over

HOOK = "blocks.1.hook_resid_pre"
D_IN, D_SAE, K = 16, 64, 3


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=D_IN, d_head=4, n_heads=4, d_mlp=32,
                                                      d_vocab=50, n_ctx=16, act_fn="gelu", normalization_type="LN",
                                                      seed=0, device="cpu"))
    tokens = torch.randint(0, 50, (30, 12), generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("h")
    H.harvest(model, tokens, HOOK, out, n_tokens=250, cfg=HarvestConfig(batch_contexts=2, shard_tokens=30),
              progress=False, label_free=True)
    return ActivationReader(out)


def _sae(beta: float, seed: int, n_off: int) -> GSAE:
    sae = GSAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, beta=beta, grad_scale=50.0), seed=seed)
    with torch.no_grad():
        sae.b_enc[:n_off] = -1e4  # these latents can never fire: a floor the count must find
    return sae


def _direct(sae: GSAE, rows, mode: str) -> float:
    """Every row at once: the latents that never appear in a code with a positive activation."""
    with torch.no_grad():
        enc = sae.encode(rows.x, None if mode == "plain" else rows.gradient(mode))
    fired = torch.zeros(D_SAE, dtype=torch.bool)
    fired[enc.top_indices[enc.top_acts > 0]] = True
    return float((~fired).double().mean())


def test_one_pass_over_the_split_equals_a_direct_count(harvested):
    encoders = {"topk": (_sae(0.0, 0, 10), "plain"), "g": (_sae(2.0, 1, 20), "g"),
                "g_free": (_sae(2.0, 2, 5), "g_free")}
    got = dead_fractions_over(encoders, harvested, batch=64)
    rows = harvested.load_all()
    want = {name: _direct(sae, rows, mode) for name, (sae, mode) in encoders.items()}
    assert got == pytest.approx(want, abs=1e-12)
    assert got["g"] >= 20 / D_SAE and got["topk"] >= 10 / D_SAE


def test_a_number_does_not_depend_on_its_companions(harvested):
    alone = dead_fractions_over({"g": (_sae(2.0, 1, 20), "g")}, harvested, batch=64)
    together = dead_fractions_over({"topk": (_sae(0.0, 0, 10), "plain"), "g": (_sae(2.0, 1, 20), "g"),
                                    "g_free": (_sae(2.0, 2, 5), "g_free")}, harvested, batch=64)
    assert alone["g"] == together["g"]


def test_activation_metrics_report_the_share_of_selection_the_gradient_changes(harvested):
    from gsae.sae import selection_changed_share
    from gsae.stages.evaluate import ActivationMetrics, activation_metrics

    rows = harvested.load_all()
    sae = _sae(2.0, 1, 0)
    for mode in ("g", "g_free"):
        got = activation_metrics(sae, rows.x, rows.gradient(mode), mode, chunk=64)["selection_changed_share"]
        assert got == pytest.approx(selection_changed_share(sae, rows.x, rows.gradient(mode)), abs=1e-12)
        assert 0 < got < 1
    assert "selection_changed_share" not in activation_metrics(sae, rows.x, None, "plain")
    # the stage's accumulation (plain-encode first, its selection passed on) gives the same number
    plain, g_acc = ActivationMetrics(sae, "plain"), ActivationMetrics(sae, "g")
    for i in range(0, len(rows.x), 50):
        g_acc.add(rows.x[i:i + 50], rows.g[i:i + 50], reference=plain.add(rows.x[i:i + 50], None))
    assert g_acc.result()["selection_changed_share"] == pytest.approx(
        selection_changed_share(sae, rows.x, rows.g), abs=1e-12)
    assert activation_metrics(_sae(0.0, 0, 0), rows.x, rows.g, "g")["selection_changed_share"] == 0.0

