"""Pre-registered decision rules: statistics against hand computations, verdicts on synthetic results whose
answer is known by construction, robustness labels, and the README round trip."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from gsae import claims as C
from gsae import report as R

REPO = Path(__file__).resolve().parent.parent
K_GRID = (8, 16, 32, 64)
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def prereg():
    return C.load_prereg(REPO / "prereg.yaml")


class Results:
    """Builds metrics.jsonl rows: ``set(metric, topk=..., gsae=...)`` fills one metric for every k and seed."""

    def __init__(self):
        self.rows: dict[tuple, dict] = {}

    def _put(self, variant, arm, mode, k, seed, metric, value):
        key = (variant, arm, mode, k, seed)
        row = self.rows.setdefault(key, {"variant": variant, "arm": arm, "k": k, "seed": seed,
                                         "encode_mode": mode, "metrics": {}})
        row["metrics"][metric] = value

    def set(self, metric, topk, gsae, variant="primary", topk_variant=None, ks=K_GRID, g_mode="g",
            topk_modes=("g", "plain")):
        """``topk`` / ``gsae``: a function (k, seed) -> value."""
        for k in ks:
            for s in SEEDS:
                for mode in topk_modes:
                    self._put(topk_variant or variant, "topk", mode, k, s, metric, topk(k, s))
                self._put(variant, "gsae", g_mode, k, s, metric, gsae(k, s))
        return self

    def list(self):
        return list(self.rows.values())


def jitter(scale, salt=0):
    """Deterministic per-(k, seed) noise."""
    return lambda k, s: float(np.random.default_rng([k, s, salt]).normal(0, scale))


def shift(base, delta, noise=0.0, salt=0, worse_at=None, worse_delta=None):
    """base(k) + delta (+ noise); at k == worse_at use worse_delta instead."""
    n = jitter(noise, salt)
    return lambda k, s: base + (worse_delta if k == worse_at else delta) + n(k, s)


def per_seed(base, offsets):
    """base + offsets[seed] at every k: a fixed, known spread of paired differences."""
    return lambda k, s: base + offsets[s]


def by_claim(vs):
    return {v.claim: v for v in vs}


# ------------------------------------------------------------------------------------------------ statistics
def test_paired_stats_matches_hand_computation():
    # d = [-0.5, -0.5, -1.0]: mean -2/3, sd = sqrt(1/12), se = 1/6, t = -4.
    g = {0: 1.0, 1: 2.0, 2: 4.0, 7: 9.0}  # seed 7 has no TopK partner: must be ignored
    t = {0: 1.5, 1: 2.5, 2: 5.0}
    s = C.paired_stats(g, t, "lower")
    # t_{0.975, df=2} from the closed-form CDF below: x / sqrt(2 + x^2) = 0.95  =>  x^2 = 2 * 0.9025 / 0.0975.
    q = math.sqrt(2 * 0.9025 / 0.0975)
    assert q == pytest.approx(4.302652729911275, rel=1e-10)  # the tabulated value
    assert s.n == 3
    assert s.mean_diff == pytest.approx(-2 / 3)
    assert s.ci_lo == pytest.approx(-2 / 3 - q / 6, rel=1e-12)
    assert s.ci_hi == pytest.approx(-2 / 3 + q / 6, rel=1e-12)
    # Student t with 2 df has the closed-form CDF F(x) = 1/2 + x / (2 sqrt(2 + x^2)).
    p_lower = 0.5 - 4 / (2 * math.sqrt(18))
    assert s.p_one_sided == pytest.approx(p_lower, rel=1e-10)
    assert C.paired_stats(g, t, "higher").p_one_sided == pytest.approx(1 - p_lower, rel=1e-10)
    assert s.topk_mean == pytest.approx(3.0) and s.g_mean == pytest.approx(7 / 3)


def test_paired_stats_with_fewer_than_two_pairs_has_no_test():
    one = C.paired_stats({0: 1.0, 1: 2.0}, {1: 3.0}, "lower")
    assert one.n == 1 and one.mean_diff == -1.0
    assert all(math.isnan(x) for x in (one.ci_lo, one.ci_hi, one.p_one_sided))
    assert C.paired_stats({0: 1.0}, {1: 1.0}, "lower").n == 0
    with pytest.raises(ValueError, match="better"):
        C.paired_stats({}, {}, "smaller")


def test_holm_matches_hand_worked_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> raised to 0.06 (monotone)
    assert C.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = C.holm([0.01, float("nan"), 0.02])  # the untested k still counts in m = 3
    assert adjusted[0] == pytest.approx(0.03) and adjusted[2] == pytest.approx(0.04) and math.isnan(adjusted[1])
    assert C.holm([0.5, 0.6]) == [1.0, 1.0]


# ------------------------------------------------------------------------------------------------ verdicts
def test_clearly_better_at_every_k_is_replicated(prereg):
    r = Results().set("delta_ce", shift(0.5, 0), shift(0.4, 0, noise=0.005))  # -20%
    r.set("steer_kl@0.5", shift(0.2, 0), shift(0.3, 0, noise=0.005))              # +50%, higher is better
    v = by_claim(C.verdicts(prereg, r.list()))
    assert v["C1"].verdict == "replicated" and v["C1"].n_supported == 4
    assert v["C3"].verdict == "replicated"
    assert all(x.p_holm < 0.05 for x in v["C1"].per_k)


def test_significantly_worse_at_one_k_is_not_replicated(prereg):
    rows = Results().set("delta_ce", shift(0.5, 0), shift(0.4, 0, noise=0.005, worse_at=64, worse_delta=0.2)).list()
    v = by_claim(C.verdicts(prereg, rows))["C1"]
    assert v.n_supported == 3 and v.n_worse == 1
    assert v.verdict == "not replicated"
    assert "significantly worse" in R.k_status(v, v.per_k[-1])


def test_noisy_difference_is_inconclusive(prereg):
    # d = (-0.15, +0.05, -0.05): mean -0.05 (the right way, 10% of TopK) but t = -0.87, p = 0.239
    rows = Results().set("delta_ce", shift(0.5, 0), per_seed(0.5, (-0.15, 0.05, -0.05))).list()
    v = by_claim(C.verdicts(prereg, rows))["C1"]
    assert v.n_supported == 0 and v.n_worse == 0 and v.n_contradicted == 0
    t = -0.05 / (0.1 / math.sqrt(3))  # sd of the differences is exactly 0.1
    assert v.per_k[0].stats.p_one_sided == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), rel=1e-9)
    assert v.verdict == "inconclusive"


def test_wrong_direction_at_half_the_grid_is_not_replicated(prereg):
    # k = 8, 16: clearly better. k = 32, 64: d = (+0.15, -0.05, +0.05), the wrong way on average but not
    # significantly: contradicted at exactly ceil(4/2) = 2 k, significantly worse at none.
    good, bad = (-0.1, -0.1, -0.1), (0.15, -0.05, 0.05)
    g = lambda k, s: 0.5 + (good if k <= 16 else bad)[s] + (1e-3 * s if k <= 16 else 0)  # noqa: E731
    v = by_claim(C.verdicts(prereg, Results().set("delta_ce", shift(0.5, 0), g).list()))["C1"]
    assert (v.n_supported, v.n_contradicted, v.n_worse) == (2, 2, 0)
    assert v.verdict == "not replicated"


def test_significant_but_below_minimum_effect_is_not_supported(prereg):
    # C1: -2% of TopK with tiny noise: p is tiny but the effect is under 5%. C2: -0.5 pp < 1 pp.
    r = Results().set("delta_ce", shift(0.5, 0), shift(0.49, 0, noise=1e-4))
    r.set("dead_fraction", shift(0.10, 0), shift(0.095, 0, noise=1e-4))
    v = by_claim(C.verdicts(prereg, r.list()))
    for cid in ("C1", "C2"):
        assert v[cid].n_supported == 0 and all(x.p_holm < 0.05 for x in v[cid].per_k)
        assert v[cid].verdict == "inconclusive"
    r2 = Results().set("dead_fraction", shift(0.10, 0), shift(0.05, 0, noise=1e-3))
    assert by_claim(C.verdicts(prereg, r2.list()))["C2"].verdict == "replicated"


def test_missing_metric_is_not_tested(prereg):
    rows = Results().set("delta_ce", shift(0.5, 0), shift(0.4, 0, noise=0.005)).list()
    v = by_claim(C.verdicts(prereg, rows))
    assert v["C1"].verdict == "replicated"
    assert v["C2"].verdict == v["C3"].verdict == v["C4"].verdict == "not tested"


def test_a_metric_every_row_lists_as_not_measured_is_not_measured(prereg):
    """An OpenWebText run has no POS tags: the probe stage records probe_auc_pos as not measured, and C4 says so
    (in the table too) instead of failing; a metric missing from only some rows stays "not tested"."""
    rows = Results().set("delta_ce", shift(0.5, 0), shift(0.4, 0, noise=0.005)).list()
    for r in rows:
        r["not_measured"] = ["probe_auc_pos"]
    v = by_claim(C.verdicts(prereg, rows))
    assert v["C1"].verdict == "replicated" and v["C4"].verdict == "not measured"
    assert v["C2"].verdict == "not tested"
    rob = C.sensitivity(prereg, rows)["C4"]
    assert rob.label == "not measured" and R.readme_verdict(rob) == "not measured"
    assert "not measured" in R._effect_cell(v["C4"])
    rows[0]["not_measured"] = []
    assert by_claim(C.verdicts(prereg, rows))["C4"].verdict == "not tested"


def test_a_missing_k_counts_as_not_supported(prereg):
    rows = Results().set("delta_ce", shift(0.5, 0), shift(0.4, 0, noise=0.005), ks=(8, 16, 32)).list()
    v = by_claim(C.verdicts(prereg, rows))["C1"]
    assert [x.stats.n for x in v.per_k] == [3, 3, 3, 0] and v.verdict == "replicated"  # 3 of 4 suffices
    rows = Results().set("delta_ce", shift(0.5, 0), shift(0.4, 0, noise=0.005), ks=(8, 16)).list()
    assert by_claim(C.verdicts(prereg, rows))["C1"].verdict == "inconclusive"


@pytest.mark.parametrize("delta, spread, worse_at, expected", [
    (-0.005, 0.001, None, "replicated"),        # CI well inside (-0.02, inf) at every k
    (+0.01, 0.001, None, "replicated"),         # better is fine for "comparable"
    (-0.05, 0.001, None, "not replicated"),     # CI below -0.02 everywhere
    (-0.005, 0.001, 64, "not replicated"),      # equivalent at 3 k but worse at one: "worse at any k" wins
    (-0.015, 0.02, None, "inconclusive"),       # mean above -0.02, CI [-0.065, 0.035] straddles it
    (-0.025, 0.02, None, "not replicated"),     # mean below -0.02 at every k (CI straddles): point estimates
])
def test_equivalence_rule_for_c4(prereg, delta, spread, worse_at, expected):
    offsets = (delta - spread, delta, delta + spread)
    g = lambda k, s: 0.8 + (-0.06 if k == worse_at else offsets[s])  # noqa: E731
    rows = Results().set("probe_auc_pos", shift(0.8, 0), g).list()
    v = by_claim(C.verdicts(prereg, rows))["C4"]
    assert v.verdict == expected, [(x.stats.mean_diff, x.stats.ci_lo, x.stats.ci_hi) for x in v.per_k]


def test_topk_rows_of_either_encode_mode_and_duplicates(prereg):
    for modes in (("g",), ("plain",), ("g", "plain")):
        rows = Results().set("delta_ce", shift(0.5, 0), shift(0.4, 0, noise=0.005), topk_modes=modes).list()
        assert by_claim(C.verdicts(prereg, rows))["C1"].verdict == "replicated"
    rows = rows + [dict(rows[0])]
    with pytest.raises(C.ResultsError, match="two rows"):
        C.verdicts(prereg, rows)


# ------------------------------------------------------------------------------------------------ variants
def full_primary():
    r = Results()
    r.set("delta_ce", shift(0.5, 0), shift(0.4, 0, noise=0.005))
    r.set("dead_fraction", shift(0.2, 0), shift(0.05, 0, noise=0.002))
    for a in (0.25, 0.5, 1.0):
        r.set(f"steer_kl@{a}", shift(0.2, 0), shift(0.3, 0, noise=0.005))
    r.set("steer_logprob@0.5", shift(1.0, 0), shift(1.5, 0, noise=0.01))
    r.set("probe_auc_pos", shift(0.8, 0), shift(0.8, -0.002, noise=0.001))
    r.set("probe_auc_genre", shift(0.7, 0), shift(0.7, 0.0, noise=0.001))
    # plain-encode g-SAE rows (same good numbers unless a test overrides them)
    r.set("delta_ce", shift(0.5, 0), shift(0.4, 0, noise=0.005), g_mode="plain")
    r.set("dead_fraction", shift(0.2, 0), shift(0.05, 0, noise=0.002), g_mode="plain")
    r.set("probe_auc_pos", shift(0.8, 0), shift(0.8, -0.002, noise=0.001), g_mode="plain")
    return r


def add_trained_variants(r, skip=(), bad=None):
    """The three g-only variants and auxk_off at k in {16, 64}; ``bad`` gets a C1 that is clearly worse."""
    for name in ("value_mode_score", "grad_norm_token", "auxk_off"):
        if name in skip:
            continue
        topk_variant = "auxk_off" if name == "auxk_off" else "primary"
        c1 = shift(0.6, 0, noise=0.005) if name == bad else shift(0.4, 0, noise=0.005)
        r.set("delta_ce", shift(0.5, 0), c1, variant=name, topk_variant=topk_variant, ks=(16, 64))
        r.set("dead_fraction", shift(0.2, 0), shift(0.05, 0, noise=0.002), variant=name,
              topk_variant=topk_variant, ks=(16, 64))
        r.set("steer_kl@0.5", shift(0.2, 0), shift(0.3, 0, noise=0.005), variant=name, topk_variant=topk_variant,
              ks=(16, 64))
        r.set("probe_auc_pos", shift(0.8, 0), shift(0.8, -0.002, noise=0.001), variant=name,
              topk_variant=topk_variant, ks=(16, 64))
    return r


def test_all_variants_agree_is_robust(prereg):
    rows = add_trained_variants(full_primary()).list()
    sens = C.sensitivity(prereg, rows)
    for cid in ("C1", "C2", "C3", "C4"):
        assert sens[cid].primary.verdict == "replicated", cid
        assert sens[cid].label == "robust", (cid, [(v.variant, v.verdict) for v in sens[cid].variants])
        assert R.readme_verdict(sens[cid]) == "replicated"
    c1 = {v.variant: v for v in sens["C1"].variants}
    assert set(c1) == {"plain_encode", "value_mode_score", "grad_norm_token", "auxk_off"}
    assert [x.k for x in c1["auxk_off"].per_k] == [16, 64] and c1["auxk_off"].need_replicated == 2
    assert [x.k for x in c1["plain_encode"].per_k] == list(K_GRID)
    c3 = {v.variant: v.metric for v in sens["C3"].variants}
    assert c3["steer_alpha_0.25"] == "steer_kl@0.25" and c3["steer_logprob"] == "steer_logprob@0.5"
    assert {v.variant: v.metric for v in sens["C4"].variants}["probe_genre"] == "probe_auc_genre"


def test_one_disagreeing_variant_is_fragile_and_a_missing_one_incomplete(prereg):
    sens = C.sensitivity(prereg, add_trained_variants(full_primary(), bad="value_mode_score").list())
    assert sens["C1"].label == "fragile" and sens["C1"].disagreeing == ("value_mode_score",)
    assert R.readme_verdict(sens["C1"]) == "replicated (fragile)"
    assert sens["C2"].label == "robust"

    sens = C.sensitivity(prereg, add_trained_variants(full_primary(), skip=("auxk_off",)).list())
    assert sens["C1"].label == "incomplete" and sens["C1"].untested == ("auxk_off",)
    assert R.readme_verdict(sens["C1"]) == "replicated (sensitivity incomplete)"


def test_plain_encode_reads_the_plain_rows(prereg):
    r = add_trained_variants(full_primary())
    r.set("delta_ce", shift(0.5, 0), shift(0.7, 0, noise=0.005), g_mode="plain")  # plain encode much worse
    sens = C.sensitivity(prereg, r.list())
    by = {v.variant: v.verdict for v in sens["C1"].variants}
    assert sens["C1"].primary.verdict == "replicated" and by["plain_encode"] == "not replicated"
    assert sens["C1"].label == "fragile"


# ------------------------------------------------------------------------------------------------ rendering
def test_table_shows_failures_as_plainly_as_successes(prereg):
    r = add_trained_variants(full_primary(), bad="auxk_off")
    r.set("delta_ce", shift(0.5, 0), shift(0.4, 0, noise=0.005, worse_at=64, worse_delta=0.2))
    vs = C.verdicts(prereg, r.list())
    sens = C.sensitivity(prereg, r.list(), primary=vs)
    table = R.render_claims_table(vs, sens, {"C1": "results/default/figures/c1.png"})
    c1_line = next(line for line in table.splitlines() if line.startswith("| **C1**"))
    # other variants replicate, so the primary's failure is itself fragile, and says so
    assert "| not replicated (fragile) |" in c1_line and "**significantly worse**" in c1_line
    assert "k=64: Δ +" in c1_line and "[figure](results/default/figures/c1.png)" in c1_line
    assert "supported at 3/4 k" in c1_line
    md = R.render_sensitivity_md(vs, sens, prereg, table)
    assert "| C1 | not replicated (3/4) |" in md and "| auxk_off | `delta_ce` | 16 | 3 |" in md


# ------------------------------------------------------------------------------------------------ README
def test_readme_round_trip(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{R.START}\nold table\n{R.END}\n\nafter\n")
    table = "| a | b |\n|---|---|\n| 1 | 2 |\n"
    R.update_readme(readme, table)
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n") and text.endswith(f"{R.END}\n\nafter\n")
    assert "old table" not in text and R.check_readme(readme, table)
    readme.write_text(text.replace("| 1 |", "| 7 |"))
    assert not R.check_readme(readme, table)
    readme.write_text("# no markers\n")
    with pytest.raises(R.ReadmeMarkerError, match="claims:start"):
        R.update_readme(readme, table)
    with pytest.raises(R.ReadmeMarkerError):
        R.check_readme(readme, table)
    readme.write_text(f"{R.END}\n{R.START}\n")
    with pytest.raises(R.ReadmeMarkerError):
        R.check_readme(readme, table)
    with pytest.raises(FileNotFoundError, match="create it"):
        R.update_readme(tmp_path / "missing.md", table)


def test_cli_writes_then_checks(tmp_path, capsys):
    shutil.copy(REPO / "prereg.yaml", tmp_path / "prereg.yaml")
    results = tmp_path / "results" / "default"
    results.mkdir(parents=True)
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "fidelity_delta_ce_kl.png").write_bytes(b"png")  # C1's figure (FIGURE_FOR_CLAIM)
    rows = add_trained_variants(full_primary()).list()
    (results / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "README.md").write_text(f"# R\n{R.START}\n{R.END}\n")

    assert C.main(["--profile", "default", "--root", str(tmp_path), "--check"]) == 1
    assert C.main(["--profile", "default", "--root", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "[figure](figures/fidelity_delta_ce_kl.png)" in readme and "| replicated |" in readme
    assert (tmp_path / "SENSITIVITY.md").exists()
    assert C.main(["--profile", "default", "--root", str(tmp_path), "--check"]) == 0
    (tmp_path / "README.md").write_text(readme.replace("replicated", "replicatet", 1))
    capsys.readouterr()
    assert C.main(["--profile", "default", "--root", str(tmp_path), "--check"]) == 1
    assert "+| **C1**" in capsys.readouterr().out

    (tmp_path / "README.md").write_text("# R\n")
    assert C.main(["--profile", "default", "--root", str(tmp_path)]) == 2
    assert "claims:start" in capsys.readouterr().err


def test_bad_inputs_raise_clear_errors(tmp_path, prereg):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"variant": "primary"}\n')
    with pytest.raises(C.ResultsError, match=r"metrics.jsonl:1: missing field"):
        C.load_metrics(bad)
    bad.write_text("\n{not json\n")
    with pytest.raises(C.ResultsError, match=r"metrics.jsonl:2 is not valid JSON"):
        C.load_metrics(bad)
    text = (REPO / "prereg.yaml").read_text().replace("replicated_min_k: 3", "replicated_min_k: 2", 1)
    (tmp_path / "prereg.yaml").write_text(text)
    with pytest.raises(C.PreregError, match="ceil"):
        C.load_prereg(tmp_path / "prereg.yaml")


def test_unregistered_profile_uses_its_own_grid_and_never_touches_the_readme(tmp_path):
    shutil.copy(REPO / "prereg.yaml", tmp_path / "prereg.yaml")
    (tmp_path / "profiles").mkdir()
    shutil.copy(REPO / "tests" / "data" / "smoke_v1.yaml", tmp_path / "profiles" / "smoke.yaml")  # v1 protocol
    results = tmp_path / "results" / "smoke"
    results.mkdir(parents=True)
    rows = Results().set("delta_ce", shift(0.5, 0), shift(0.4, 0, noise=0.005), ks=(4, 8, 16, 32)).list()
    (results / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pc = R.verdict_for_profile("smoke", tmp_path)
    assert pc.readme_path is None and pc.sensitivity_path == results / "SENSITIVITY.md"
    assert [x.k for x in pc.verdicts[0].per_k] == [4, 8, 16, 32] and pc.verdicts[0].verdict == "replicated"
    assert "never the claims" in pc.claims_table
    assert C.main(["--profile", "smoke", "--root", str(tmp_path)]) == 0
    assert C.main(["--profile", "smoke", "--root", str(tmp_path), "--check"]) == 0
    assert not (tmp_path / "README.md").exists()


def test_committed_readme_matches_the_committed_results():
    """The README's claims block is exactly what the v2 ledger generates from results/default/metrics.jsonl
    (``python -m gsae.claims --profile default --check``): nobody typed a verdict or a number in it."""
    from gsae.config import load_profile
    from gsae.stages.claims import ledger_report

    path = REPO / "results" / "default" / "metrics.jsonl"
    if not path.exists():
        pytest.skip("no committed default-profile results yet (run ./run_all.sh)")
    rep = ledger_report(load_profile("default"), C.load_metrics(path))
    assert R.check_readme(REPO / "README.md", rep.markdown), "README claims block is stale: python -m gsae.claims"
    assert R.main(["--profile", "default", "--check"]) == 0


def test_selection_note_reports_the_grid_edge_check_either_way():
    sel = {"k": 32, "seed": 0, "objective": "delta_ce", "lr": 0.004, "beta": 0.1,
           "lr_trials": {"0.001": 0.6, "0.004": 0.42}, "beta_trials": {"0.1": 0.39, "3.0": 0.54}}
    assert R.selection_note(None, None) == ""
    base = R.selection_note(sel, None)
    assert "lr 0.004 (grid 0.001 … 0.004)" in base and "β 0.1 (grid 0.1 … 3)" in base and "edge" not in base
    edges = {"checks": {"beta": {"chosen": 0.1, "chosen_delta_ce": 0.39, "beyond": 0.0333, "beyond_delta_ce": 0.38,
                                 "would_move": True},
                        "lr": {"chosen": 0.004, "chosen_delta_ce": 0.42, "beyond": 0.008, "beyond_delta_ce": 0.45,
                               "would_move": False}}}
    note = R.selection_note(sel, edges)
    assert "beta 0.0333 (ΔCE 0.380 vs 0.390 at 0.1) scores better, so the registered choice is a limit" in note
    assert "lr 0.008 (ΔCE 0.450 vs 0.420 at 0.004) scores worse, so the registered choice is a local optimum" in note


def test_glance_table_by_hand():
    r = Results().set("delta_ce", topk=per_seed(0.5, [0.0, 0.1, 0.2]), gsae=per_seed(0.4, [0.0, 0.0, 0.3]),
                      ks=(8,))
    r.set("delta_ce", topk=per_seed(0.5, [0.0, 0.1, 0.2]), gsae=per_seed(0.45, [0.0, 0.0, 0.0]), ks=(8,),
          g_mode="plain", topk_modes=())
    table = R.render_glance_table(r.list(), [8])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, df 2) * sd / sqrt(n), sd of {0, .1, .2} = 0.1
    assert f"| 8 | TopK | 3 | 0.600 ± {half:.3f} |" in table
    assert "| 8 | g-SAE, g-encode | 3 | 0.500 ± 0." in table
    assert "| 8 | g-SAE, plain-encode | 3 | 0.450 ± 0.000 |" in table
    assert "KL" not in table  # columns without data are left out


def test_a_variant_with_the_primary_saes_is_not_counted(prereg):
    """auxk_off whose rows equal the primary's (AuxK never fired) repeats the primary analysis: not counted."""
    r = add_trained_variants(full_primary(), skip=("auxk_off",))
    rows = r.list()
    copies = [{**row, "variant": "auxk_off", "metrics": dict(row["metrics"])} for row in rows
              if row["variant"] == "primary" and row["k"] in (16, 64)]
    assert C.same_as_primary_variants(rows + copies) == {"auxk_off"}
    sens = C.sensitivity(prereg, rows + copies)
    assert sens["C1"].same_as_primary == ("auxk_off",) and sens["C1"].label == "robust"
    cell = R._robustness_cell(sens["C1"])
    assert "3/3 variants agree" in cell and "not counted (SAEs identical to the primary's): auxk_off" in cell
    md = R.render_sensitivity_md(list(C.verdicts(prereg, rows + copies)), sens, prereg)
    assert "= primary SAEs" in md
    # one metric differing in one row makes it a real variant again
    copies[0]["metrics"]["delta_ce"] += 1e-9
    assert C.same_as_primary_variants(rows + copies) == set()
