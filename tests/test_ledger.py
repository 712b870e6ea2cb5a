"""The ledger against known answers: synthetic metrics.jsonl rows built with a chosen effect per k, and the
interval checked against scipy's paired t-test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from gsae.analysis import ledger, report

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
    assert c1.robustness_same_seeds == {"threads_1": "replicated"}  # the primary SAEs on the variant's 10 seeds
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
    md = report.render(ledger.evaluate(PREREG, rows), PREREG)
    assert "**C1** fidelity" in md and "**replicated**" in md and "k = 32" in md
    (tmp_path / "p.yaml").write_text("version: 1\n")
    with pytest.raises(ledger.LedgerError, match="version 2"):
        ledger.load_prereg(tmp_path / "p.yaml")


def test_secondary_tests_take_their_rule_from_the_claim_and_never_change_its_verdict():
    pre = {**PREREG, "claims": {"C1": {**PREREG["claims"]["C1"],
                                       "secondary": [{"metric": "delta_ce", "encode_mode": "g", "note": "labels"}]}}}
    plain = rows_for({"delta_ce": 0.0, "kl": 0.0}, 32, range(10))
    # The g-encode rows get a clear 20 % gain: the secondary reads it, the verdict (plain-encode) does not.
    for r in plain:
        if r["arm"] == "gsae" and r["encode_mode"] == "g":
            r["metrics"] = {**r["metrics"], "delta_ce": 0.8 * r["metrics"]["delta_ce"]}
    c1 = ledger.evaluate(pre, plain)[0]
    assert c1.verdict == "not replicated" and len(c1.secondary) == 1
    sec = c1.secondary[0]
    assert sec.test == "delta_ce (g)" and sec.verdict == "replicated" and sec.estimate > 0.15
    gains = [(t["metrics"]["delta_ce"] - g["metrics"]["delta_ce"]) for t, g in zip(
        [r for r in plain if r["arm"] == "topk" and r["encode_mode"] == "g"],
        [r for r in plain if r["arm"] == "gsae" and r["encode_mode"] == "g"], strict=True)]
    mean_t = np.mean([r["metrics"]["delta_ce"] for r in plain if r["arm"] == "topk" and r["encode_mode"] == "g"])
    lo, hi = sps.t.interval(0.95, 9, loc=np.mean(gains) / mean_t, scale=sps.sem(np.array(gains) / mean_t))
    assert sec.lower == pytest.approx(lo) and sec.upper == pytest.approx(hi)  # its own 95 %, no Bonferroni
    assert "never part of a verdict" in report.render_secondary([c1], pre) and "labels" in \
        report.render_secondary([c1], pre)
    with pytest.raises(ledger.LedgerError, match="no test of metric"):
        ledger.secondary_test(pre["claims"]["C1"], {"metric": "fvu", "encode_mode": "g"})


def test_curve_table_gives_each_k_its_minimum_detectable_effect():
    from gsae.analysis import decision

    rows = rows_for({"delta_ce": 0.1, "kl": 0.1}, 32, range(10), sd=0.02) + rows_for({}, 8, range(3), sd=0.05)
    c1 = ledger.evaluate(PREREG, rows)[0]
    table = report.render_curve([c1], PREREG)
    r8 = next(r for r in c1.curve if r.test == "delta_ce (plain)")
    gains = decision.relative_gains(*[{r["seed"]: r["metrics"]["delta_ce"] for r in rows
                                       if r["arm"] == a and r["k"] == 8 and r["encode_mode"] == "plain"}
                                      for a in ("topk", "gsae")], "lower").gains
    assert r8.sd == pytest.approx(np.std(gains, ddof=1))
    mde8 = decision.minimum_detectable_effect(r8.sd, 3, 0.05, 0.8, 2, 0.05)
    # More seeds and a smaller SD at the primary k make its MDE smaller than k = 8's.
    r32 = next(r for r in c1.primary if r.test == "delta_ce (plain)")
    assert decision.minimum_detectable_effect(r32.sd, 10, 0.05, 0.8, 2, 0.05) < mde8
    line8 = next(line for line in table.splitlines() if line.startswith("| 8 |"))
    assert f"{100 * mde8:.1f}%" in line8 and "| 32 (primary) | 10 |" in table


def test_curve_tests_replace_the_tests_on_the_curve_at_every_k():
    """PREREG v4: C1's verdict reads its registered tests (here metrics on all contexts, "_all"), the curve reads
    ``curve_tests`` at every k including the primary one, and a secondary test takes its rule from either."""
    tests = [{**t, "metric": t["metric"] + "_all"} for t in PREREG["claims"]["C1"]["tests"]]
    c1_pre = {**PREREG["claims"]["C1"], "tests": tests, "curve_tests": PREREG["claims"]["C1"]["tests"],
              "secondary": [{"metric": "delta_ce", "encode_mode": "g"}]}
    pre = {**PREREG, "version": 4, "claims": {"C1": c1_pre}}
    # On all contexts no gain, tightly; on the subset the curve reads, a clear 20 % gain at every k.
    rows = (rows_for({"delta_ce": 0.2, "kl": 0.2}, 32, range(10), base={"delta_ce": 0.3, "kl": 0.5})
            + rows_for({"delta_ce": 0.2, "kl": 0.2}, 8, range(3), base={"delta_ce": 0.3, "kl": 0.5}))
    full = rows_for({}, 32, range(10), sd=0.005, base={"delta_ce_all": 0.3, "kl_all": 0.5}, seed=7)
    for r, f in zip([r for r in rows if r["k"] == 32], full, strict=True):
        r["metrics"] = {**r["metrics"], **f["metrics"]}
    c1 = ledger.evaluate(pre, rows)[0]
    assert c1.verdict == "not replicated" and [r.test for r in c1.primary] == ["delta_ce_all (plain)", "kl_all (plain)"]
    assert sorted({(r.k, r.test) for r in c1.curve}) == [(k, t) for k in (8, 32) for t in ("delta_ce (plain)",
                                                                                            "kl (plain)")]
    assert all(r.verdict == "replicated" for r in c1.curve if r.k == 32)  # the subset's gain, 10 seeds
    assert c1.secondary[0].test == "delta_ce (g)" and c1.secondary[0].verdict == "replicated"
    table = report.render_curve([c1], pre)
    assert "| 32 (primary) | 10 |" in table and "delta_ce (plain): gain" in table and "_all" not in table


def test_the_superseded_version_is_read_on_the_same_rows_for_the_registered_profile_only(tmp_path):
    """PREREG §8: the ledger also shows C1 as the superseded pre-registration reads the same rows."""
    old = {**PREREG, "version": 3, "profile": "default"}
    rows = rows_for({"delta_ce": 0.15, "kl": 0.15}, 32, range(10))
    note = report.superseded_note("default", rows, old, "docs/prereg/v3.yaml")
    c1 = ledger.evaluate(PREREG, rows)[0]
    assert note.startswith("Under the superseded version 3 (docs/prereg/v3.yaml") and "C1 **replicated**" in note
    assert f"delta_ce (plain) {report.pct(c1.primary[0].estimate)}" in note and "n = 10" in note
    assert report.superseded_note("smoke", rows, old, "docs/prereg/v3.yaml") == ""
    assert report.superseded_note("default", rows, {}, "absent.yaml") == ""


def test_quality_table_by_hand():
    rows = [{"variant": "primary", "arm": arm, "k": 32, "seed": s, "encode_mode": "plain",
             "metrics": {"ce_loss_score": cs, "explained_variance": 0.8, "kl_div": 0.1, "l0": 32.0}}
            for arm, cs in (("topk", 0.90), ("gsae", 0.92)) for s in range(3)]
    rows[0]["metrics"] = {**rows[0]["metrics"], "ce_loss_score": 0.93}  # topk: 0.93, 0.90, 0.90 -> mean 0.91
    q = report.quality_rows(rows)[(32, "TopK")]
    assert q["kl_div"][0] == pytest.approx(0.1) and q["n"] == 3
    table = report.render_quality(rows)
    half = sps.t.ppf(0.975, 2) * np.std([0.93, 0.90, 0.90], ddof=1) / np.sqrt(3)
    assert f"| 32 | TopK | 3 | 0.910 ± {half:.3f} | 0.800 ± 0.000 | — | 0.100 ± 0.000 | 32 |" in table
    assert "| 32 | g-SAE, plain-encode | 3 | 0.920 ± 0.000 | 0.800 ± 0.000 | — |" in table  # "—": not measured


def test_robustness_is_compared_with_the_primary_on_the_same_seeds():
    """A variant with 3 seeds is compared with the primary SAEs' verdict on those 3 seeds (computed from the
    primary rows of seeds 0-2 alone), not with the 10-seed verdict."""
    primary = rows_for({"delta_ce": 0.15, "kl": 0.15}, 32, range(10), sd=0.05)
    variant = rows_for({"delta_ce": 0.15, "kl": 0.15}, 32, range(3), variant="threads_1", sd=0.05, seed=7)
    c1 = ledger.evaluate(PREREG, primary + variant)[0]
    alone = ledger.evaluate(PREREG, [r for r in primary if r["seed"] < 3])[0]
    assert c1.robustness_same_seeds["threads_1"] == alone.verdict
    assert c1.verdict == "replicated" and alone.primary[0].n == 3
    assert "primary SAEs on the same seeds: " + alone.verdict in report.render([c1], PREREG)


def test_claims_table_and_answer_quote_each_verdict_with_its_deciding_interval():
    rows = (rows_for({"delta_ce": 0.15, "kl": 0.15}, 32, range(10))
            + rows_for({"delta_ce": 0.0, "kl": 0.0}, 32, range(10), variant="threads_1"))
    rep = report.build({**PREREG, "power_target_half_width": 0.025}, rows)
    c1 = rep.results[0]
    r = c1.primary[0]
    effect = f"+{100 * r.estimate:.1f}% [+{100 * r.lower:.1f}%, +{100 * r.upper:.1f}%]"
    assert f"| **C1** fidelity | **{c1.verdict}** | delta_ce (plain) | {effect} |" in rep.claims_table
    assert f"gain {effect}" in rep.answer and len(rep.answer.splitlines()) <= 6
    assert "threads_1: not replicated (primary SAEs on the same seeds: replicated)" in rep.ledger_md


PREREG_V3 = {**PREREG, "version": 3, "length_check": {"variant": "length_2", "multiplier": 2, "margin": 0.05,
                                                      "claim": "C1"}}


def test_length_check_matches_a_hand_computed_paired_interval():
    rows = (rows_for({"delta_ce": 0.02, "kl": 0.0}, 32, range(8), sd=0.03, seed=1)
            + rows_for({"delta_ce": 0.08, "kl": 0.0}, 32, range(8), variant="length_2", sd=0.03, seed=2))
    c = ledger.evaluate_length_check(PREREG_V3, rows)[0]

    def gains(variant: str) -> np.ndarray:
        pick = {(x["arm"], x["seed"]): x["metrics"]["delta_ce"] for x in rows
                if x["variant"] == variant and x["encode_mode"] == "plain"}
        t = np.array([pick["topk", s] for s in range(8)])
        return (t - np.array([pick["gsae", s] for s in range(8)])) / t.mean()  # each group's own TopK mean

    change = gains("length_2") - gains("primary")
    ci = sps.ttest_rel(change, np.zeros(8)).confidence_interval(1 - 0.05 / 2)  # Bonferroni over C1's two tests
    assert (c.test, c.n) == ("delta_ce (plain)", 8)
    assert c.lower == pytest.approx(ci.low, rel=1e-9) and c.upper == pytest.approx(ci.high, rel=1e-9)
    assert c.estimate == pytest.approx(change.mean(), rel=1e-9)
    assert c.outcome == ledger.length_outcome(ci.low, ci.high, 0.05)


def test_length_check_on_registered_seeds_reads_only_those_seeds():
    """PREREG v5 names the length check's seeds: rows of other seeds (v4 trained all 16) are left out, and the
    result equals the check on rows of those seeds alone."""
    rows = (rows_for({"delta_ce": 0.02, "kl": 0.0}, 32, range(16), sd=0.03, seed=1)
            + rows_for({"delta_ce": 0.08, "kl": 0.0}, 32, range(16), variant="length_2", sd=0.03, seed=2))
    v5 = {**PREREG_V3, "version": 5, "length_check": {**PREREG_V3["length_check"], "seeds": list(range(8))}}
    named = ledger.evaluate_length_check(v5, rows)
    alone = ledger.evaluate_length_check(PREREG_V3, [r for r in rows if r["seed"] < 8])
    every = ledger.evaluate_length_check(PREREG_V3, rows)
    assert [c.n for c in named] == [8, 8] and named == alone
    assert every[0].n == 16 and every[0].estimate != named[0].estimate
    assert [g.seeds for g in ledger.length_check_gains(v5, rows)] == [tuple(range(8))] * 2


@pytest.mark.parametrize(("true_change", "lo", "hi"), [(0.0, 0.8, 1.0), (0.05, 0.0, 0.025), (0.10, 0.0, 0.0)])
def test_length_rule_rates_in_simulation(true_change, lo, hi):
    """PREREG v3 §2's planned design: 16 seeds, SD of the per-seed change 4.4 % of TopK's mean, Bonferroni over 2.
    No change: "length-stable" in most draws; a change as large as the margin: at most alpha/(2F) of the time."""
    rng = np.random.default_rng(0)
    n_sims, stable = 4000, 0
    for _ in range(n_sims):
        iv = ledger.decision.paired_interval(true_change + 0.044 * rng.standard_normal(16), 0.05, 2)
        stable += ledger.length_outcome(iv.lower, iv.upper, 0.05) == "length-stable"
    assert lo <= stable / n_sims <= hi


@pytest.mark.parametrize(("true_change", "lo", "hi"), [(0.0, 0.85, 0.95), (0.05, 0.0, 0.025), (0.10, 0.9, 1.0)])
def test_length_rule_rates_in_simulation_on_prereg_v5_design(true_change, lo, hi):
    """PREREG v5's design: 8 seeds, SD of the per-seed ΔCE change 2.94 % of TopK's mean (study v4, 16 seeds).
    No change: "length-stable" ~90 % of the time (else "undetermined"); a change as large as the margin: "stable"
    at most alpha/(2F); twice the margin: "length-dependent" almost always."""
    rng = np.random.default_rng(1)
    n_sims, hits = 4000, 0
    want = "length-dependent" if true_change > 0.05 else "length-stable"
    for _ in range(n_sims):
        iv = ledger.decision.paired_interval(true_change + 0.0294 * rng.standard_normal(8), 0.05, 2)
        hits += ledger.length_outcome(iv.lower, iv.upper, 0.05) == want
    assert lo <= hits / n_sims <= hi


def test_length_outcomes_at_the_edges():
    assert ledger.length_outcome(-0.01, 0.02, 0.05) == "length-stable"
    assert ledger.length_outcome(0.06, 0.09, 0.05) == "length-dependent"
    assert ledger.length_outcome(-0.12, -0.05, 0.05) == "length-dependent"
    assert ledger.length_outcome(-0.02, 0.06, 0.05) == "undetermined"


def test_length_check_without_the_variant_is_not_tested_and_bad_config_is_refused(tmp_path):
    assert ledger.evaluate_length_check(PREREG, rows_for({}, 32, range(4))) == []  # v2: no length check
    res = ledger.evaluate_length_check(PREREG_V3, rows_for({}, 32, range(4)))
    assert {c.outcome for c in res} == {"not tested"}
    import yaml
    bad = {**PREREG_V3, "length_check": {"variant": "length_2", "claim": "C9"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ledger.LedgerError, match="length_check"):
        ledger.load_prereg(tmp_path / "p.yaml")


@pytest.mark.parametrize("true_gain", [0.0, 0.03, 0.06])
def test_claim_rates_of_one_test_match_the_exact_verdict_probabilities(true_gain):
    """A claim of one test reads what its test reads: the simulated rates agree with the exact integral
    (``decision.verdict_probabilities``) within Monte Carlo error (20,000 draws: SE <= 0.4 points)."""
    from gsae.analysis import decision

    sim = ledger.claim_rates([true_gain], [0.03], 0.0, 10, [0.05], sims=20000, seed=1)
    exact = decision.verdict_probabilities(true_gain, 0.03, 10, 0.05)
    assert sim["replicated"] == pytest.approx(exact.replicated, abs=0.015)
    assert sim["not replicated"] == pytest.approx(exact.not_replicated, abs=0.015)
    assert sim["mixed"] == 0.0


def test_a_gain_above_the_minimum_on_one_test_only_reads_mixed_never_replicated():
    rates = ledger.claim_rates([0.10, 0.03], [0.023, 0.0075], 0.5, 16, [0.05, 0.05], sims=4000)
    assert rates["mixed"] > 0.99 and rates["replicated"] == 0.0
    same = ledger.claim_rates([0.10, 0.10], [0.023, 0.023], 1.0, 16, [0.05, 0.05], sims=4000)
    assert same["mixed"] == 0.0  # perfectly correlated identical tests always agree
