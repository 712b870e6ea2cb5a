"""Figures: the plotted numbers against hand computations, intervals of non-negative metrics never below zero,
units on the axes."""

import math
import statistics

import matplotlib
import numpy as np
import pandas as pd
import pytest

from gsae.analysis import figures as gf

matplotlib.use("Agg")

T_975_DF2 = 4.302652729749464  # Student t quantile 0.975 with 2 degrees of freedom (printed tables)
T_975_DF1 = 12.706204736174707


def row(arm, mode, k, seed, **metrics):
    return {"variant": "primary", "arm": arm, "encode_mode": mode, "k": k, "seed": seed, "beta": 0.0,
            "split": "test", "sae": f"primary/{arm}-k{k}-s{seed}", "metrics": metrics}


def rows_fixture():
    base = {8: [1.0, 1.2, 1.1], 16: [0.5, 0.6, 0.4]}
    plain = {8: [0.9, 1.0, 1.2], 16: [0.45, 0.6, 0.42]}
    g = {8: [0.8, 0.8, 0.8], 16: [0.4, 0.4, 0.4]}
    out = []
    for k in base:
        for s in range(3):
            out += [row("topk", m, k, s, delta_ce=base[k][s], kl=2 * base[k][s]) for m in ("g", "plain")]
            out.append(row("gsae", "plain", k, s, delta_ce=plain[k][s], kl=2 * plain[k][s]))
            out.append(row("gsae", "g", k, s, delta_ce=g[k][s], kl=2 * g[k][s]))
    out.append(row("gsae", "plain", 32, 0, delta_ce=0.3, kl=0.6))  # no TopK partner: must be left out
    return out


def hand(base, treat):
    """Mean and 95% t-interval of the per-seed differences in % of the baseline's mean, by hand."""
    b_mean = sum(base) / len(base)
    rel = [100 * (t - b) / b_mean for b, t in zip(base, treat, strict=True)]
    mean = sum(rel) / len(rel)
    half = T_975_DF2 * statistics.stdev(rel) / math.sqrt(len(rel))
    return rel, mean, mean - half, mean + half


def test_paired_differences_match_a_hand_computation_and_the_plot_shows_them():
    out = gf.plot_paired_differences(rows_fixture(), ["delta_ce", "kl"], "topk", "gsae", "plain", 0.05,
                                     better={"delta_ce": "lower"})
    t = out.table
    assert list(zip(t.metric, t.k, strict=True)) == [("delta_ce", 8), ("delta_ce", 16), ("kl", 8), ("kl", 16)]
    rel, mean, lo, hi = hand([1.0, 1.2, 1.1], [0.9, 1.0, 1.2])
    r = t.iloc[0]
    assert r.n == 3 and r.baseline_mean == pytest.approx(1.1)
    assert r.rel_diff_pct == pytest.approx(rel) and rel[0] == pytest.approx(-100 / 11)
    assert (r.mean_pct, r.lo_pct, r.hi_pct) == pytest.approx((mean, lo, hi))
    assert r.lo_pct < 0 < r.hi_pct  # a relative difference is not clipped: it may be negative
    # kl = 2 x delta_ce in both arms: a relative difference does not see the factor
    assert t.iloc[2][["mean_pct", "lo_pct", "hi_pct"]].tolist() == pytest.approx([mean, lo, hi])
    rel16, mean16, lo16, hi16 = hand([0.5, 0.6, 0.4], [0.45, 0.6, 0.42])
    assert (t.iloc[1].mean_pct, t.iloc[1].lo_pct, t.iloc[1].hi_pct) == pytest.approx((mean16, lo16, hi16))

    ax = out.fig.axes[0]
    err = ax.containers[0]
    assert list(err.lines[0].get_ydata()) == pytest.approx([mean, mean16])
    segments = err.lines[2][0].get_segments()
    assert [y for s in segments for y in (s[0][1], s[1][1])] == pytest.approx([lo, hi, lo16, hi16])
    band = ax.patches[0]  # axhspan: a Rectangle from -5% to +5% in data units
    assert (band.get_y(), band.get_y() + band.get_height()) == pytest.approx((-5.0, 5.0))
    assert "(%)" in ax.get_ylabel() and "TopK" in ax.get_ylabel() and "plain-encode" in ax.get_ylabel()
    assert ax.get_title() == "delta_ce: paired difference (lower is better)"
    assert ax.get_xlabel().startswith("L0")


def test_paired_differences_pair_only_common_seeds_and_say_when_nothing_pairs():
    rows = [r for r in rows_fixture() if not (r["arm"] == "gsae" and r["seed"] == 2)]
    t = gf.paired_difference_table(rows, ["delta_ce"], "topk", "gsae", "g")
    r = t.iloc[0]
    assert r.seeds == [0, 1] and r.baseline_mean == pytest.approx(1.1)
    rel = [100 * (0.8 - 1.0) / 1.1, 100 * (0.8 - 1.2) / 1.1]
    half = T_975_DF1 * statistics.stdev(rel) / math.sqrt(2)
    assert (r.mean_pct, r.lo_pct, r.hi_pct) == pytest.approx((sum(rel) / 2, sum(rel) / 2 - half, sum(rel) / 2 + half))
    with pytest.raises(ValueError, match="no seed-paired rows"):
        gf.paired_difference_table(rows, ["fvu"], "topk", "gsae", "g")
    with pytest.raises(ValueError, match="reports encoders"):
        gf.paired_difference_table(rows, ["delta_ce"], "gsae", "topk", "g")


def vs_k_frame(values):
    return pd.DataFrame([{"arm": "TopK", "k": k, "seed": s, "metric": m, "value": v}
                         for m in ("kl", "delta_ce") for k in (8, 16) for s, v in enumerate(values)])


def test_plot_vs_k_never_draws_a_nonnegative_metric_below_zero_and_labels_units():
    values = [0.01, 0.02, 0.5]  # mean 0.177, half-width 0.69: the raw interval reaches -0.51
    mean = sum(values) / 3
    half = T_975_DF2 * statistics.stdev(values) / math.sqrt(3)
    fig = gf.plot_vs_k(vs_k_frame(values), ["kl", "delta_ce"])
    lows = {}
    for ax in fig.axes:
        seg = ax.containers[0].lines[2][0].get_segments()
        lows[ax.get_ylabel()] = [s[0][1] for s in seg]
        assert [s[1][1] for s in seg] == pytest.approx([mean + half] * 2)
    assert lows["kl (nats)"] == [0.0, 0.0]
    assert lows["delta_ce (nats)"] == pytest.approx([mean - half] * 2)  # delta_ce may be negative: not clipped
    assert fig.axes[0].get_xlabel() == "L0 = k (latents per token)"


def test_plot_vs_k_on_a_log_axis_keeps_its_limits_on_the_positive_bounds():
    values = [0.01, 0.02, 0.5]
    fig = gf.plot_vs_k(vs_k_frame(values), ["kl"], logy=[True])
    lo, hi = fig.axes[0].get_ylim()
    half = T_975_DF2 * statistics.stdev(values) / math.sqrt(3)
    assert lo == pytest.approx(sum(values) / 3 / 1.25) and hi == pytest.approx((sum(values) / 3 + half) * 1.25)


def test_interval_of_one_value_is_a_point():
    assert gf.interval([0.3], nonneg=True) == (0.3, 0.3, 0.3)


def test_claims_panel_draws_the_ledger_intervals_in_percent_with_verdict_colours():
    """The claims figure plots exactly the ledger's numbers: a relative test's estimate and interval x 100 at each
    k, coloured by its verdict; an equivalence test in the metric's units with its margin line."""
    pre = {"primary_k": [32], "claims": {
        "C1": {"tests": [{"metric": "delta_ce", "encode_mode": "plain", "rule": "relative", "min_rel_effect": 0.05}]},
        "C4": {"tests": [{"metric": "probe_auc_pos_heldout", "encode_mode": "plain", "rule": "equivalence",
                          "margin": 0.02}]}}}

    def res(test, k, verdict, est, lo, hi):
        return {"test": test, "k": k, "verdict": verdict, "estimate": est, "lower": lo, "upper": hi}

    record = {"claims": [
        {"claim": "C1", "verdict": "replicated",
         "primary": [res("delta_ce (plain)", 32, "replicated", 0.1, 0.06, 0.14)],
         "curve": [res("delta_ce (plain)", 8, "underpowered", 0.02, -0.05, 0.09)]},
        {"claim": "C4", "verdict": "not replicated",
         "primary": [res("probe_auc_pos_heldout (plain)", 32, "not replicated", -0.05, -0.07, -0.03)], "curve": []}]}
    fig = gf.plot_claims(record, pre)
    c1, c4 = fig.axes
    bars = {round(float(line.get_xdata()[0])): line for line in c1.lines if len(line.get_xdata()) == 1
            and line.get_marker() == "o" and line.get_label().startswith("_")}
    assert float(bars[32].get_ydata()[0]) == pytest.approx(10.0) and float(bars[8].get_ydata()[0]) == pytest.approx(2)
    assert matplotlib.colors.to_hex(bars[32].get_color()) == gf.VERDICT_COLORS["replicated"]
    assert matplotlib.colors.to_hex(bars[8].get_color()) == gf.VERDICT_COLORS["underpowered"]
    caps = [seg for coll in c1.collections for seg in getattr(coll, "get_segments", lambda: [])()]
    assert any(abs(s[0][1] - 6.0) < 1e-9 and abs(s[1][1] - 14.0) < 1e-9 for s in caps)  # the interval, in %
    assert "%" in c1.get_ylabel() and "ROC AUC" in c4.get_ylabel()
    assert any(list(line.get_ydata()) == [-0.02, -0.02] for line in c4.lines)  # the equivalence margin


def test_convergence_draws_the_registered_curve_and_the_exploratory_extension_beyond_it():
    def curve(points):
        return {str(t): {"delta_ce": v} for t, v in points.items()}

    conv = {"primary_tokens": 200, "curves": {"topk": curve({100: 0.5, 200: 0.4, 400: 0.35})}}
    ext = {"curves": {"topk": curve({100: 0.5, 200: 0.4, 400: 0.35, 800: 0.33, 1600: 0.32})}}
    lines = [ln for ln in gf.plot_convergence(conv).axes[0].get_lines() if len(ln.get_xdata()) > 2]
    assert [list(ln.get_xdata()) for ln in lines] == [[100, 200, 400]]
    ax = gf.plot_convergence(conv, ext).axes[0]
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    # the extension starts where the registered curve ends, so the two join
    assert [list(ln.get_xdata()) for ln in dashed] == [[400, 800, 1600]]
    assert list(dashed[0].get_ydata()) == [0.35, 0.33, 0.32] and ax.get_xscale() == "log"


def test_log_axes_are_labelled_only_at_the_measured_values():
    assert [gf.compact_number(x) for x in (186368, 2975744, 0.004, 512)] == ["186k", "2.98M", "0.004", "512"]
    conv = {"primary_tokens": 200_000, "curves": {"topk": {"100000": {"delta_ce": 0.5}, "200000": {"delta_ce": 0.4}}}}
    ax = gf.plot_convergence(conv).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["100k", "200k"]
    assert all(t.get_text() == "" for t in ax.get_xticklabels(minor=True))


def test_length_check_plots_each_seed_at_both_lengths_in_percent_with_the_interval_in_the_title():
    import numpy as np

    from gsae.analysis import ledger

    rows = []
    for variant, shift in (("primary", 0.0), ("length_2", 0.02)):
        for s in range(4):
            t = 0.30 + 0.01 * s
            for arm, v in (("topk", t), ("gsae", t * (0.97 - shift) + 0.001 * s)):
                rows.append({**row(arm, "plain", 32, s, delta_ce=v, kl=2 * v), "variant": variant})
    pre = {"primary_k": [32], "alpha": 0.05, "length_check": {"variant": "length_2", "margin": 0.05, "claim": "C1"},
           "claims": {"C1": {"tests": [{"metric": m, "encode_mode": "plain", "better": "lower", "rule": "relative",
                                        "min_rel_effect": 0.05} for m in ("delta_ce", "kl")]}}}
    gains = ledger.length_check_gains(pre, rows)
    checks = ledger.evaluate_length_check(pre, rows)
    fig = gf.plot_length_check(gains, checks, 0.05, "length_2")
    ax = fig.axes[0]
    pts = ax.collections[-1].get_offsets()
    t = np.array([0.30 + 0.01 * s for s in range(4)])
    want_x = 100 * (t - (t * 0.97 + 0.001 * np.arange(4))) / t.mean()  # hand computation of the primary gains
    assert np.allclose(sorted(pts[:, 0]), sorted(want_x))
    assert f"{100 * checks[0].estimate:+.1f}" in ax.get_title() and checks[0].outcome in ax.get_title()
    assert len(fig.axes) == 2


def test_claims_figure_gives_curve_tests_panels_of_their_own():
    """PREREG v4: C1's decisive tests (on every test context) at the primary k in one panel each, its curve tests
    (first contexts, every k) in panels marked as never deciding."""
    rel = {"encode_mode": "plain", "rule": "relative", "min_rel_effect": 0.05}
    pre = {"primary_k": [32], "claims": {"C1": {"tests": [{"metric": "delta_ce_all", **rel}],
                                                "curve_tests": [{"metric": "delta_ce", **rel}]}}}

    def res(test, k, verdict, est):
        return {"test": test, "k": k, "verdict": verdict, "estimate": est, "lower": est - 0.02, "upper": est + 0.02}

    record = {"claims": [{"claim": "C1", "verdict": "not replicated",
                          "primary": [res("delta_ce_all (plain)", 32, "not replicated", 0.01)],
                          "curve": [res("delta_ce (plain)", 8, "underpowered", 0.03),
                                    res("delta_ce (plain)", 32, "underpowered", 0.02)]}]}
    decisive, curve = gf.plot_claims(record, pre).axes

    def points(ax):
        return {round(float(line.get_xdata()[0])): float(line.get_ydata()[0]) for line in ax.lines
                if len(line.get_xdata()) == 1 and line.get_marker() == "o" and line.get_label().startswith("_")}

    assert points(decisive) == pytest.approx({32: 1.0}) and points(curve) == pytest.approx({8: 3.0, 32: 2.0})
    assert "not replicated" in decisive.get_title() and "curve only" in curve.get_title()
    assert [t.get_text() for t in curve.get_xticklabels()] == ["8", "32"]  # no star: the curve never decides


def test_selection_and_convergence_figures_plot_the_recorded_trials():
    sel = {"protocol": "per_arm", "k": 32, "seeds": [100, 101], "lr": {"topk": 0.004, "gsae": 0.008},
           "lr_trials": {"topk": {"0.002": 0.5, "0.004": 0.4, "0.008": 0.45},
                         "gsae": {"0.004": 0.42, "0.008": 0.38, "0.016": 0.41}}}
    fig = gf.plot_selection(sel)
    lines = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == 3]
    assert [list(ln.get_ydata()) for ln in lines] == [[0.5, 0.4, 0.45], [0.42, 0.38, 0.41]]
    np.testing.assert_allclose(lines[1].get_xdata(), [0.004, 0.008, 0.016])
    conv = {"primary_tokens": 2000, "curves": {"topk": {"1000": {"delta_ce": 0.6}, "2000": {"delta_ce": 0.5},
                                                        "4000": {"delta_ce": 0.49}}}}
    fig = gf.plot_convergence(conv)
    line = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == 3][0]
    assert list(line.get_xdata()) == [1000, 2000, 4000] and list(line.get_ydata()) == [0.6, 0.5, 0.49]
