"""KL fine-tuning beside the g-SAE (PREREG v6 §7): shares of TopK's loss closed and the interaction, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from gsae.analysis import kl, ledger
from gsae.analysis.report import build
from gsae.paths import ROOT

PRE = ledger.load_prereg(ROOT / "prereg.yaml")
TOPK = [0.20, 0.22, 0.21, 0.19]


def rows(g_gain: float, kl_gain: float, overlap: float) -> list[dict]:
    """Per seed: TopK, g-SAE (TopK x (1 - g_gain)), TopK+KL (x (1 - kl_gain)) and g-SAE+KL, whose loss is the
    additive prediction plus ``overlap`` x TopK (0: the gains add up), with a small per-seed wiggle."""
    out = []
    for s, t in enumerate(TOPK):
        w = 0.001 * (s - 1.5)
        values = {"topk": t, "gsae": t * (1 - g_gain) + w, "topk_kl": t * (1 - kl_gain) - w,
                  "gsae_kl": t * (1 - g_gain - kl_gain + overlap) + 2 * w}
        for arm, v in values.items():
            out.append({"variant": "primary", "arm": arm, "k": 32, "seed": s, "encode_mode": "plain",
                        "metrics": {"delta_ce_all": v, "kl_all": 2 * v}})
    return out


def test_shares_closed_are_paired_gains_over_topk_with_the_claims_interval():
    gains, _ = kl.evaluate_kl(PRE, rows(0.01, 0.3, 0.0))
    assert [r.test for r in gains] == [f"{a}: {m} (plain)" for a in kl.ARMS for m in kl.METRICS]
    r = next(r for r in gains if r.test == "topk_kl: delta_ce_all (plain)")
    per_seed = np.array([(t - (t * 0.7 - 0.001 * (s - 1.5))) for s, t in enumerate(TOPK)]) / np.mean(TOPK)
    half = stats.t.ppf(1 - 0.05 / 4, 3) * per_seed.std(ddof=1) / 2
    assert (r.estimate, r.lower, r.upper, r.n) == pytest.approx((per_seed.mean(), per_seed.mean() - half,
                                                                 per_seed.mean() + half, 4))


def test_the_interaction_is_zero_when_the_gains_add_up_and_the_overlap_when_they_do_not():
    _, inter = kl.evaluate_kl(PRE, rows(0.05, 0.3, 0.0))
    assert all(abs(i.estimate) < 1e-12 for i in inter)  # the wiggles leave 2w per seed, which averages to 0
    _, inter = kl.evaluate_kl(PRE, rows(0.05, 0.3, 0.04))
    assert inter[0].estimate == pytest.approx(0.04) and inter[0].lower > 0 and inter[0].n == 4


def test_no_kl_section_without_kl_arms_and_one_in_the_ledger_with_them():
    base = [r for r in rows(0.05, 0.3, 0.0) if r["arm"] in ("topk", "gsae")]
    assert kl.evaluate_kl(PRE, base) == ([], [])
    assert "KL fine-tuning" not in build(PRE, base).ledger_md
    rep = build(PRE, rows(0.05, 0.3, 0.0))
    assert "| topk_kl: delta_ce_all (plain) |" in rep.ledger_md and "Do the gains add up?" in rep.ledger_md
    assert len(rep.record["kl_finetune"]["gains"]) == 6 and not math.isnan(
        rep.record["kl_finetune"]["interaction"][0]["estimate"])
