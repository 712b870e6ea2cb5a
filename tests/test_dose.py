"""The dose-response ledger (PREREG v6 §5) and C2's scale rule (§4), against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from gsae.analysis import dose, ledger
from gsae.analysis.report import build
from gsae.paths import ROOT

PRE = ledger.load_prereg(ROOT / "prereg.yaml")
RNG = np.random.default_rng(0)
TOPK = {s: 0.2 + 0.01 * RNG.standard_normal() for s in range(8)}
GAIN = {"primary": 0.08, "beta_0.1": 0.01, "beta_3": -0.04}
"""True relative ΔCE gain of each group's g-SAE (the chosen beta, 1, is the primary group)."""


def rows() -> list[dict]:
    out = []
    for s, t in TOPK.items():
        out.append({"variant": "primary", "arm": "topk", "k": 32, "seed": s, "encode_mode": "plain",
                    "metrics": {"delta_ce_all": t, "kl_all": 2 * t, "dead_fraction_trainsplit": 0.006}})
    for variant, gain in GAIN.items():
        for s in (range(8) if variant == "primary" else range(4)):
            wiggle = 0.002 * RNG.standard_normal()
            for mode, extra in (("plain", 0.0), ("g", 0.05)):  # the g-encode helps 5 points more
                v = TOPK[s] * (1 - gain - extra) + wiggle
                out.append({"variant": variant, "arm": "gsae", "k": 32, "seed": s, "encode_mode": mode,
                            "metrics": {"delta_ce_all": v, "kl_all": 2 * v, "dead_fraction_trainsplit": 0.004,
                                        "selection_changed_share": 0.1 + gain}})
    return out


def hand_interval(t: dict[int, float], g: dict[int, float], family: int) -> tuple[float, float, float]:
    seeds = sorted(t)
    gains = np.array([(t[s] - g[s]) for s in seeds]) / np.mean([t[s] for s in seeds])
    half = stats.t.ppf(1 - 0.05 / (2 * family), len(seeds) - 1) * gains.std(ddof=1) / math.sqrt(len(seeds))
    return gains.mean(), gains.mean() - half, gains.mean() + half


def test_each_beta_is_paired_with_topk_on_the_dose_seeds_with_the_claims_rule():
    rs = rows()
    points = dose.evaluate_dose(PRE, rs, chosen_beta=1.0)
    assert [(pt.beta, pt.variant, pt.chosen) for pt in points] == [
        (0.0, "primary", False), (0.1, "beta_0.1", False), (1.0, "primary", True), (3.0, "beta_3", False)]
    assert all(pt.seeds == (0, 1, 2, 3) for pt in points)  # the chosen beta too: every point on the same seeds
    for pt in points[1:]:
        g = {r["seed"]: r["metrics"]["delta_ce_all"] for r in rs if r["variant"] == pt.variant
             and r["arm"] == "gsae" and r["encode_mode"] == "g" and r["seed"] < 4}
        est, lo, hi = hand_interval({s: TOPK[s] for s in range(4)}, g, family=2)
        r = next(r for r in pt.tests if r.test == "C1g: delta_ce_all (g)")
        assert (r.estimate, r.lower, r.upper, r.n) == pytest.approx((est, lo, hi, 4))
        assert pt.means["selection_changed_share (g)"] == pytest.approx(0.1 + GAIN[pt.variant])
    assert [r.test for r in points[2].tests] == ["C1: delta_ce_all (plain)", "C1: kl_all (plain)",
                                                 "C1g: delta_ce_all (g)", "C1g: kl_all (g)"]
    assert points[0].means["delta_ce_all (g)"] == pytest.approx(np.mean([TOPK[s] for s in range(4)]))  # TopK: plain


def test_no_dose_response_without_its_groups_or_the_chosen_beta():
    rs = [r for r in rows() if not r["variant"].startswith("beta_")]
    assert dose.evaluate_dose(PRE, rs, chosen_beta=1.0) == []
    assert dose.evaluate_dose(PRE, rows(), chosen_beta=None) == []


def test_c2_is_not_testable_at_this_scale_when_the_arms_differ_by_under_one_percent_of_the_dictionary():
    rs = rows()  # 0.6 % against 0.4 % dead: a 0.2-point difference, under the registered 1 point
    c2 = next(c for c in ledger.evaluate(PRE, rs) if c.claim == "C2")
    assert c2.verdict == "not testable at this scale" and math.isnan(c2.primary[0].estimate)
    for r in rs:
        if r["arm"] == "topk":
            r["metrics"]["dead_fraction_trainsplit"] = 0.05
    c2 = next(c for c in ledger.evaluate(PRE, rs) if c.claim == "C2")
    assert c2.verdict == "replicated" and c2.primary[0].estimate == pytest.approx(0.92)


def test_the_report_names_the_chosen_beta_and_the_dose_in_the_answer_and_the_ledger():
    rep = build(PRE, rows(), d_sae=2304, chosen_beta=1.0)
    assert "β = 1 was chosen on the validation split from 0.1, 1, 3" in rep.answer
    assert "changes 18% of the 32 selected latents" in rep.answer
    assert "Fidelity with labels at inference" in rep.answer and "(C1g)" in rep.answer
    assert "| **1** (chosen) | 4 |" in rep.ledger_md and "| 0 (TopK) | 4 |" in rep.ledger_md
    assert [pt["beta"] for pt in rep.record["dose"]] == [0.0, 0.1, 1.0, 3.0]
    fig = dose.plot_dose(dose.evaluate_dose(PRE, rows(), 1.0))
    assert len(fig.axes) == 2 and len(fig.axes[1].get_legend().get_texts()) == 5


def test_every_point_rests_on_the_seeds_all_groups_have():
    rs = [r for r in rows() if not (r["variant"] == "beta_3" and r["seed"] >= 2)]  # beta 3 trained seeds 0-1 only
    points = dose.evaluate_dose(PRE, rs, chosen_beta=1.0)
    assert {pt.seeds for pt in points} == {(0, 1)} and all(r.n == 2 for pt in points for r in pt.tests)


def test_another_arms_dose_groups_add_no_point():
    """A second gradient arm (the smoke profile's label-free one) that chose another beta has groups of its own."""
    other = [{**r, "arm": "gsae_free", "variant": "beta_0.3"} for r in rows() if r["variant"] == "beta_3"]
    points = dose.evaluate_dose(PRE, rows() + other, chosen_beta=1.0)
    assert [pt.beta for pt in points] == [0.0, 0.1, 1.0, 3.0] and {pt.seeds for pt in points} == {(0, 1, 2, 3)}
