"""The analysis layer's rows, generated Markdown blocks and the answer in words: errors on bad input, the marker
round trip, a known answer rendered by hand, and the committed README / claims.md regenerated from the committed
metrics."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from gsae.analysis import readme, report
from gsae.analysis.ledger import load_prereg
from gsae.analysis.rows import ResultsError, index_rows, load_metrics

REPO = Path(__file__).resolve().parent.parent


def test_bad_metrics_lines_raise_clear_errors(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"variant": "primary"}\n')
    with pytest.raises(ResultsError, match=r"metrics.jsonl:1: missing field"):
        load_metrics(bad)
    bad.write_text("\n{not json\n")
    with pytest.raises(ResultsError, match=r"metrics.jsonl:2 is not valid JSON"):
        load_metrics(bad)
    row = {"variant": "primary", "arm": "topk", "k": 8, "seed": 0, "encode_mode": "plain", "metrics": {}}
    with pytest.raises(ResultsError, match="two rows"):
        index_rows([row, dict(row)])
    with pytest.raises(FileNotFoundError, match="run the pipeline first"):
        load_metrics(tmp_path / "missing.jsonl")


def test_readme_block_round_trip(tmp_path):
    start, end = readme.markers("claims")
    path = tmp_path / "README.md"
    path.write_text(f"# Title\n\nintro\n\n{start}\nold table\n{end}\n\nafter\n")
    table = "| a | b |\n|---|---|\n| 1 | 2 |\n"
    readme.update(path, "claims", table)
    text = path.read_text()
    assert text.startswith("# Title\n\nintro\n\n") and text.endswith(f"{end}\n\nafter\n")
    assert "old table" not in text and readme.stale_diff(path, "claims", table) == ""
    path.write_text(text.replace("| 1 |", "| 7 |"))
    assert "| 7 |" in readme.stale_diff(path, "claims", table)
    path.write_text("# no markers\n")
    with pytest.raises(readme.MarkerError, match="claims:start"):
        readme.update(path, "claims", table)
    path.write_text(f"{end}\n{start}\n")
    with pytest.raises(readme.MarkerError):
        readme.stale_diff(path, "claims", table)
    with pytest.raises(FileNotFoundError):
        readme.update(tmp_path / "missing.md", "claims", table)


PREREG = {"version": 5, "alpha": 0.05, "primary_k": [32], "k_grid": [32], "power_target_half_width": 0.025,
          "claims": {
              "C1": {"title": "fidelity", "tests": [{"metric": "delta_ce_all", "encode_mode": "plain",
                                                     "better": "lower", "rule": "relative", "min_rel_effect": 0.05}]},
              "C2": {"title": "dead latents", "tests": [{"metric": "dead_fraction_trainsplit", "encode_mode": "g",
                                                         "better": "lower", "rule": "relative",
                                                         "min_rel_effect": 0.2}]}}}


def rows_with(topk_ce, gsae_ce, topk_dead, gsae_dead):
    """Per seed: TopK and g-SAE values of C1's and C2's metrics (both encoders for TopK, whose code ignores g)."""
    out = []
    for s, (tc, gc, td, gd) in enumerate(zip(topk_ce, gsae_ce, topk_dead, gsae_dead, strict=True)):
        for arm, mode, ce, dead in (("topk", "plain", tc, td), ("topk", "g", tc, td), ("gsae", "plain", gc, gd),
                                    ("gsae", "g", gc, gd)):
            out.append({"variant": "primary", "arm": arm, "k": 32, "seed": s, "encode_mode": mode,
                        "metrics": {"delta_ce_all": ce, "dead_fraction_trainsplit": dead}})
    return out


def test_answer_gives_absolute_values_beside_the_gain_computed_by_hand():
    # TopK's ΔCE is 0.5 on every seed, the g-SAE's 0.45, 0.44, 0.46, 0.45: per-seed gains (0.5 - g) / 0.5 =
    # 0.10, 0.12, 0.08, 0.10, mean 0.10, SD 0.01633, 95 % t half-width t(0.975, 3) x SD / 2 = 0.0260.
    rows = rows_with([0.5] * 4, [0.45, 0.44, 0.46, 0.45], [0.01] * 4, [0.005] * 4)
    rep = report.build(PREREG, rows, d_sae=2304)
    c1, c2, tail = rep.answer.strip().split("\n")
    half = sps.t.ppf(0.975, 3) * np.std([0.10, 0.12, 0.08, 0.10], ddof=1) / 2
    assert "Fidelity without labels (C1): replicated." in c1
    assert "TopK 0.500 nats, g-SAE 0.450 nats" in c1
    assert f"gain +10.0% [+{100 * (0.1 - half):.1f}%, +{100 * (0.1 + half):.1f}%]" in c1
    assert "gain +10.0% [+7.4%, +12.6%]" in c1
    assert "4 paired seeds" in c1
    # dead latents as counts: 0.01 x 2304 = 23.0 and 0.005 x 2304 = 11.5; gain (0.01 - 0.005) / 0.01 = +50 %
    assert "TopK 23.0 of 2,304 latents, g-SAE 11.5 of 2,304 latents" in c2 and "+50.0%" in c2
    assert "positive = g-SAE better" in tail
    assert len(rep.answer.strip().split("\n")) <= 6
    table = rep.claims_table.splitlines()
    assert table[0].startswith("| claim | verdict | deciding test at k = 32 |")
    assert "| **C1** fidelity | **replicated** | delta_ce_all (plain) | +10.0% [+7.4%, +12.6%] | ≥ 5% | 4 |" in table


def test_a_worse_g_sae_reads_as_a_negative_gain():
    rows = rows_with([0.5] * 4, [0.6, 0.61, 0.59, 0.6], [0.01] * 4, [0.01] * 4)
    c1 = report.build(PREREG, rows, d_sae=2304).answer.splitlines()[0]
    assert "gain −20.0%" in c1.replace("-", "−") and "not replicated" in c1


def test_committed_readme_and_ledger_match_the_committed_results():
    """The README's answer and claims table and results/default/claims.md are exactly what the ledger generates from
    results/default/metrics.jsonl (``python -m gsae.pipeline claims --check``): nobody typed a verdict or a number."""
    from gsae.config import load_profile
    from gsae.stages import claims

    if not (REPO / "results" / "default" / "metrics.jsonl").exists():
        pytest.skip("no committed default-profile results")
    assert claims.check(load_profile("default")) == []
    record = json.loads((REPO / "results" / "default" / "ledger.json").read_text())
    rep = claims.analyse(load_profile("default"), load_metrics(REPO / "results" / "default" / "metrics.jsonl"))
    assert json.loads(json.dumps(rep.record)) == record  # ledger.json: the same verdicts, bit for bit


def test_the_registered_prereg_loads():
    pre = load_prereg(REPO / "prereg.yaml")
    assert pre["profile"] == "default" and pre["primary_k"] == [32]


def test_a_resolved_gain_short_of_the_minimum_says_so():
    # gains 0.9, 1.1, 1.0, 1.0 % of TopK's 0.5: the interval excludes 0 and the 5 % minimum, "not replicated"
    rows = rows_with([0.5] * 4, [0.4955, 0.4945, 0.495, 0.495], [0.01] * 4, [0.01] * 4)
    c1 = report.build(PREREG, rows, d_sae=2304).answer.splitlines()[0]
    assert "Fidelity without labels (C1): not replicated." in c1 and "gain +1.0% [+0." in c1
    assert "above 0 but short of the 5% the claim needs" in c1


@pytest.mark.parametrize("sd,n,family", [(0.0228, 16, 2), (0.0075, 16, 2), (0.05, 8, 1)])
def test_detection_limit_is_the_noncentral_t_power_and_the_replication_threshold_is_above_the_minimum(sd, n, family):
    """The detection limit is the gain at which P(lower > 0) = 80 %: under normal gains the paired t statistic is a
    noncentral t with df n - 1 and noncentrality gain * sqrt(n) / sd, solved here independently with scipy."""
    from scipy import optimize

    from gsae.analysis.ledger import TestResult

    r = TestResult("m (plain)", 32, "primary", "not replicated", 0.01, 0.0, 0.02, 1.0, n, 1.0, 0.99, sd)
    detect, replicate = report.limits(r, 0.05, family, 0.05)
    crit = sps.t.ppf(1 - 0.05 / (2 * family), n - 1)
    expected = optimize.brentq(lambda d: sps.nct.sf(crit, n - 1, d * np.sqrt(n) / sd) - 0.8, 1e-9, 1.0)
    assert detect == pytest.approx(expected, rel=1e-4)
    assert replicate >= 0.05 > detect or replicate >= detect >= 0.05
