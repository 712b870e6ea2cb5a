"""The v2 ledger against known answers: synthetic metrics.jsonl rows built with a chosen effect per k, and the
interval checked against scipy's paired t-test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from gsae import ledger

PREREG = {
    "version": 2, "alpha": 0.05, "primary_k": [32], "k_grid": [8, 32],
    "claims": {
        "C1": {"title": "fidelity", "robustness": ["threads_1"],
               "tests": [{"metric": "delta_ce", "encode_mode": "plain", "better": "lower", "rule": "relative",
                          "min_rel_effect": 0.05},
                         {"metric": "kl", "encode_mode": "plain", "better": "lower", "rule": "relative",
                          "min_rel_effect": 0.05}]},
        "C2": {"title": "dead", "floor": 0.001,
               "tests": [{"metric": "dead", "encode_mode": "g", "better": "lower", "rule": "relative",
                          "min_rel_effect": 0.2}]},
        "C4": {"title": "probing",
               "tests": [{"metric": "auc", "encode_mode": "g", "better": "higher", "rule": "equivalence",
                          "margin": 0.02}]},
    },
}


def rows_for(effects: dict[str, float], k: int, seeds: range, variant: str = "primary", sd: float = 0.01,
             base: dict[str, float] | None = None, seed: int = 0) -> list[dict]:
    """TopK and g-SAE rows: the g-SAE's metric = TopK's x (1 - effect) + noise (sd relative to TopK's value)."""
    base = base or {"delta_ce": 0.3, "kl": 0.5, "dead": 0.0005, "auc": 0.8}
    rng = np.random.default_rng(seed + k)
    rows = []
    for s in seeds:
        t = {m: v * (1 + 0.05 * rng.standard_normal()) for m, v in base.items()}
        g = {m: t[m] * (1 - effects.get(m, 0.0)) + sd * base[m] * rng.standard_normal() for m in base}
        for arm, m in (("topk", t), ("gsae", g)):
            for mode in ("g", "plain"):
                rows.append({"variant": variant, "arm": arm, "k": k, "seed": s, "encode_mode": mode, "metrics": m})
    return rows


def test_known_effects_give_the_expected_verdicts():
    rows = (rows_for({"delta_ce": 0.15, "kl": 0.15}, 32, range(10))      # a clear 15 % gain, 10 seeds
            + rows_for({"delta_ce": 0.15, "kl": 0.15}, 8, range(3), sd=0.2)  # the curve: 3 noisy seeds
            + rows_for({"delta_ce": 0.0, "kl": 0.0}, 32, range(10), variant="threads_1"))
    res = {c.claim: c for c in ledger.evaluate(PREREG, rows)}
    c1 = res["C1"]
    assert c1.verdict == "replicated" and [r.verdict for r in c1.primary] == ["replicated", "replicated"]
    assert [r.verdict for r in c1.curve] == ["underpowered", "underpowered"]
    assert c1.robustness == {"threads_1": "not replicated"}
    assert res["C2"].verdict == "not testable (floor)"  # both arms at ~0.05 % dead
    assert res["C4"].verdict == "replicated"  # same AUC up to 1 % noise: comparable within 0.02


def test_interval_matches_scipy_paired_t_with_bonferroni():
    rows = rows_for({"delta_ce": 0.1, "kl": 0.0}, 32, range(6), sd=0.03)
    r = ledger.evaluate(PREREG, rows)[0].primary[0]
    t = {x["seed"]: x["metrics"]["delta_ce"] for x in rows if x["arm"] == "topk" and x["encode_mode"] == "plain"}
    g = {x["seed"]: x["metrics"]["delta_ce"] for x in rows if x["arm"] == "gsae" and x["encode_mode"] == "plain"}
    diff = np.array([t[s] - g[s] for s in range(6)]) / np.mean(list(t.values()))
    ci = sps.ttest_rel(diff, np.zeros(6)).confidence_interval(1 - 0.05 / 2)  # family of 2 co-primary tests
    assert r.lower == pytest.approx(ci.low, rel=1e-9) and r.upper == pytest.approx(ci.high, rel=1e-9)
    plain = sps.ttest_rel(diff, np.zeros(6)).confidence_interval(0.95)
    assert r.half_width_pct == pytest.approx(100 * (plain.high - plain.low) / 2, rel=1e-9)


def test_mixed_and_not_replicated_and_not_tested():
    rows = rows_for({"delta_ce": 0.2, "kl": -0.2}, 32, range(10))
    assert ledger.evaluate(PREREG, rows)[0].verdict == "mixed"
    rows = rows_for({"delta_ce": 0.0, "kl": 0.0}, 32, range(10), sd=0.005)
    assert ledger.evaluate(PREREG, rows)[0].verdict == "not replicated"
    assert ledger.evaluate(PREREG, rows_for({}, 8, range(3)))[0].verdict == "not tested"  # nothing at k = 32


def test_equivalence_below_the_margin_is_not_replicated():
    rows = rows_for({"auc": 0.1}, 32, range(8), sd=0.002)  # g-SAE 0.08 AUC worse, tightly
    c4 = [c for c in ledger.evaluate(PREREG, rows) if c.claim == "C4"][0]
    assert c4.verdict == "not replicated" and c4.primary[0].upper < -0.02


def test_render_names_every_claim_and_bad_prereg_is_refused(tmp_path):
    rows = rows_for({"delta_ce": 0.15, "kl": 0.15}, 32, range(10))
    md = ledger.render(ledger.evaluate(PREREG, rows), PREREG)
    assert "**C1** fidelity" in md and "**replicated**" in md and "k = 32" in md
    (tmp_path / "p.yaml").write_text("version: 1\n")
    with pytest.raises(ledger.LedgerError, match="version 2"):
        ledger.load_prereg_v2(tmp_path / "p.yaml")
