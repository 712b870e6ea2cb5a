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


def hand(base, treat, lower_is_better=True):
    """Mean and 95% t-interval of the per-seed gains in % of the baseline's mean, by hand: (base - treat) where lower
    is better, (treat - base) where higher is."""
    b_mean = sum(base) / len(base)
    sign = -1 if lower_is_better else 1
    rel = [sign * 100 * (t - b) / b_mean for b, t in zip(base, treat, strict=True)]
    mean = sum(rel) / len(rel)
    half = T_975_DF2 * statistics.stdev(rel) / math.sqrt(len(rel))
    return rel, mean, mean - half, mean + half


def test_paired_gains_match_a_hand_computation_and_the_plot_shows_them():
    out = gf.plot_paired_differences(rows_fixture(), ["delta_ce", "kl"], "topk", "gsae", "plain", 0.05,
                                     better="lower")
    t = out.table
    assert list(zip(t.metric, t.k, strict=True)) == [("delta_ce", 8), ("delta_ce", 16), ("kl", 8), ("kl", 16)]
    rel, mean, lo, hi = hand([1.0, 1.2, 1.1], [0.9, 1.0, 1.2])
    r = t.iloc[0]
    assert r.n == 3 and r.baseline_mean == pytest.approx(1.1) and r.treatment_mean == pytest.approx(31 / 30)
    assert r.gains == pytest.approx(rel) and rel[0] == pytest.approx(100 / 11)  # g-SAE lower = a positive gain
    assert (r["mean"], r.lower, r.upper) == pytest.approx((mean, lo, hi))
    assert r.lower < 0 < r.upper and r.interval == "plain 95% t-interval" and r.unit == "%"
    # kl = 2 x delta_ce in both arms: a relative gain does not see the factor
    assert t.iloc[2][["mean", "lower", "upper"]].tolist() == pytest.approx([mean, lo, hi])
    rel16, mean16, lo16, hi16 = hand([0.5, 0.6, 0.4], [0.45, 0.6, 0.42])
    assert (t.iloc[1]["mean"], t.iloc[1].lower, t.iloc[1].upper) == pytest.approx((mean16, lo16, hi16))

    ax = out.fig.axes[0]
    err = ax.containers[0]
    assert list(err.lines[0].get_ydata()) == pytest.approx([mean, mean16])
    segments = err.lines[2][0].get_segments()
    assert [y for s in segments for y in (s[0][1], s[1][1])] == pytest.approx([lo, hi, lo16, hi16])
    band = ax.patches[0]  # axhspan: a Rectangle from 0 to the 5% minimum effect in data units
    assert (band.get_y(), band.get_y() + band.get_height()) == pytest.approx((0.0, 5.0))
    assert "(%" in ax.get_ylabel() and "TopK" in ax.get_ylabel()
    assert "plain-encode" in ax.get_title() and "lower is better" in ax.get_title()
    assert "plain 95% t-interval" in err.get_label() and "n = 3 seeds" in err.get_label()
    assert ax.get_xlabel().startswith("L0")


def test_paired_gains_take_their_direction_from_better_and_bonferroni_widens_the_interval():
    up = gf.paired_difference_table(rows_fixture(), ["delta_ce"], "topk", "gsae", "plain", "higher")
    rel, mean, lo, hi = hand([1.0, 1.2, 1.1], [0.9, 1.0, 1.2], lower_is_better=False)
    assert up.iloc[0].gains == pytest.approx(rel) and up.iloc[0]["mean"] == pytest.approx(mean)
    two = gf.paired_difference_table(rows_fixture(), ["delta_ce"], "topk", "gsae", "plain", {"delta_ce": "lower"},
                                     family=2)
    t_bonf = 6.205346816  # Student t quantile 1 - 0.05 / 4 with 2 degrees of freedom
    r = two.iloc[0]
    assert r.upper - r["mean"] == pytest.approx(t_bonf * statistics.stdev(r.gains) / math.sqrt(3))
    assert r.interval == "deciding 95% interval, Bonferroni over 2 tests"
    with pytest.raises(ValueError, match="better must be"):
        gf.paired_difference_table(rows_fixture(), ["delta_ce"], "topk", "gsae", "plain", "smaller")


def test_paired_differences_pair_only_common_seeds_and_say_when_nothing_pairs():
    rows = [r for r in rows_fixture() if not (r["arm"] == "gsae" and r["seed"] == 2)]
    t = gf.paired_difference_table(rows, ["delta_ce"], "topk", "gsae", "g", "lower")
    r = t.iloc[0]
    assert r.seeds == [0, 1] and r.baseline_mean == pytest.approx(1.1)
    rel = [100 * (1.0 - 0.8) / 1.1, 100 * (1.2 - 0.8) / 1.1]
    half = T_975_DF1 * statistics.stdev(rel) / math.sqrt(2)
    assert (r["mean"], r.lower, r.upper) == pytest.approx((sum(rel) / 2, sum(rel) / 2 - half, sum(rel) / 2 + half))
    with pytest.raises(ValueError, match="no seed-paired rows"):
        gf.paired_difference_table(rows, ["fvu"], "topk", "gsae", "g", "lower")
    with pytest.raises(ValueError, match="reports encoders"):
        gf.paired_difference_table(rows, ["delta_ce"], "gsae", "topk", "g", "lower")


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


def test_plot_vs_k_legends_count_the_seeds_at_each_k():
    df = pd.DataFrame([{"arm": "TopK", "k": k, "seed": s, "metric": "kl", "value": 0.1 * (s + 1)}
                       for k, n in ((8, 3), (32, 16)) for s in range(n)]
                      + [{"arm": "g-SAE, plain-encode", "k": 8, "seed": s, "metric": "kl", "value": 0.2}
                         for s in range(3)])
    labels = [t.get_text() for t in gf.plot_vs_k(df, ["kl"]).axes[0].get_legend().get_texts()]
    assert "TopK (n = 3, 16 seeds at k = 8, 32)" in labels and "g-SAE, plain-encode (n = 3 seeds)" in labels
    same = df[df.arm == "TopK"]  # one arm: its seeds per k go into the title
    assert gf.plot_vs_k(same, ["kl"], ["KL"]).axes[0].get_title() == "KL\n(n = 3, 16 seeds at k = 8, 32)"


# --- the headline figure and the Result sentences ---------------------------------------------------------------

def headline_inputs():
    rel = {"encode_mode": "plain", "better": "lower", "rule": "relative"}
    pre = {"primary_k": [32], "claims": {
        "C1": {"tests": [{"metric": "delta_ce_all", **rel, "min_rel_effect": 0.05},
                         {"metric": "kl_all", **rel, "min_rel_effect": 0.05}]},
        "C2": {"tests": [{"metric": "dead_fraction_trainsplit", **rel, "encode_mode": "g", "min_rel_effect": 0.2}]},
        "C4": {"tests": [{"metric": "probe_auc_pos_heldout", "encode_mode": "plain", "better": "higher",
                          "rule": "equivalence", "margin": 0.02}]}}}

    def res(test, verdict, est, lo, hi, n=16):
        return {"test": test, "k": 32, "verdict": verdict, "estimate": est, "lower": lo, "upper": hi, "n": n}

    record = {"claims": [
        {"claim": "C1", "verdict": "not replicated",
         "primary": [res("delta_ce_all (plain)", "not replicated", 0.010, -0.004, 0.024),
                     res("kl_all (plain)", "not replicated", 0.006, 0.001, 0.010)]},
        {"claim": "C2", "verdict": "underpowered",
         "primary": [res("dead_fraction_trainsplit (g)", "underpowered", 0.181, 0.002, 0.360)]},
        {"claim": "C4", "verdict": "replicated",
         "primary": [res("probe_auc_pos_heldout (plain)", "replicated", 0.0013, -0.0028, 0.0053)]}]}
    return record, pre


def test_headline_draws_the_deciding_intervals_in_percent_and_c4_in_its_own_units(tmp_path):
    from gsae.analysis import headline

    record, pre = headline_inputs()
    fig = headline.plot_headline(record, pre)
    main, c4 = fig.axes
    points = {round(float(c.lines[0].get_ydata()[0])): float(c.lines[0].get_xdata()[0]) for c in main.containers}
    assert points == pytest.approx({2: 1.0, 1: 0.6, 0: 18.1})  # top row first: C1 ΔCE, C1 KL, C2
    spans = sorted(x for c in main.containers for seg in c.lines[2][0].get_segments() for x in (seg[0][0], seg[1][0]))
    assert spans == pytest.approx(sorted([-0.4, 2.4, 0.1, 1.0, 0.2, 36.0]))
    bands = sorted(float(coll.get_paths()[0].vertices[:, 0].max()) for coll in main.collections
                   if isinstance(coll, matplotlib.collections.FillBetweenPolyCollection))
    assert bands == pytest.approx([5.0, 5.0, 20.0])  # from 0 to the minimum effect of each row
    assert float(c4.containers[0].lines[0].get_xdata()[0]) == pytest.approx(0.0013)
    assert any(list(line.get_xdata()) == [-0.02, -0.02] for line in c4.lines)  # the equivalence margin
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("not replicated") == 2 and "underpowered" in texts and "replicated" in texts
    assert "+18.1% [+0.2%, +36.0%]" in texts and "+0.0013 [−0.0028, +0.0053]" in texts
    assert [t.get_text() for t in main.get_yticklabels()][0].startswith("C2 dead latents")
    assert "ROC AUC" in c4.get_xlabel() and "16 paired seeds" in fig._suptitle.get_text()
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    assert min(sizes) >= 10  # legible at README width
    path = gf.save_figure(fig, tmp_path / "headline.png", {"test": True})
    width = matplotlib.image.imread(path).shape[1]
    assert 800 <= width <= 920, width


def test_result_sentences_say_the_plotted_numbers():
    from gsae.analysis import captions

    record, pre = headline_inputs()
    s = captions.headline(record, pre)
    assert s.startswith("**Result:** at k = 32 with 16 paired seeds")
    assert ("C1 (fidelity without labels) **not replicated**: ΔCE +1.0% [-0.4%, +2.4%], needs ≥ 5%; "
            "KL +0.6% [+0.1%, +1.0%]") in s
    assert "C2 (dead latents) **underpowered**: dead latents +18.1% [+0.2%, +36.0%], needs ≥ 20%" in s
    assert "POS-probe AUC +0.0013 [-0.0028, +0.0053], needs > −0.02" in s

    df = gf.metrics_frame(rows_fixture())
    values = [0.9, 1.0, 1.2]  # g-SAE plain-encode delta_ce at k = 8
    half = T_975_DF2 * statistics.stdev(values) / math.sqrt(3)
    s = captions.vs_k(df, ["delta_ce"], k=8)
    assert f"g-SAE plain-encode {sum(values) / 3:#.3g} ± {half:#.3g} (n = 3)" in s and "TopK 1.10 ±" in s
    assert "at k = 8" in s and "delta_ce (nats)" in s

    table = gf.paired_difference_table(rows_fixture(), ["delta_ce"], "topk", "gsae", "plain", "lower")
    _, mean, lo, hi = hand([1.0, 1.2, 1.1], [0.9, 1.0, 1.2])
    s = captions.paired(table)
    assert f"k = 8: {mean:+.1f}% [{lo:+.1f}%, {hi:+.1f}%] (n = 3)" in s and "plain 95% t-interval" in s
    assert "positive = the g-SAE better" in s

    ce = [5.0, 4.0, 3.0]
    assert captions.ce_by_position(ce, 6.5) == ("**Result:** the LM's next-token CE falls from 5.00 nats with 1 token "
                                                "of context to 3.00 nats with 3; over all 3 positions it averages "
                                                "4.00 nats, 2.50 nats below the unigram CE (6.50 nats, the best "
                                                "prediction without context).")
    x = np.array([1.0, 2.0, 2.0, 3.0, 50.0])  # median 2: one token above 10x the median, at 25x
    s = captions.harvest_norms(x, np.ones(5))
    assert "median ‖x‖ is 2.00; 1 tokens (20.00%) exceed 10× that median" in s and "largest at 25×" in s
    s = captions.frequency({"TopK": np.array([0.0, 0.01, 0.03, 0.0])})
    assert "TopK 2 of 4 dead, median live latent on 2.00% of tokens" in s


def test_steering_sentence_gives_the_medians_per_arm_and_alpha():
    from gsae.analysis import captions

    sf = pd.DataFrame([{"arm": arm, "k": 32, "seed": 0, "latent": i, "alpha": 0.1, "metric": "kl", "value": v}
                       for arm, vals in (("TopK", [1.0, 3.0, 2.0]), ("random directions (control)", [0.5, 0.7]))
                       for i, v in enumerate(vals)])
    s = captions.steering(sf, "kl")
    assert "at k = 32: α = 0.1: TopK 2.00 (n = 3), random directions (control) 0.600 (n = 2)" in s


def test_tables_show_a_dash_where_nothing_was_measured():
    from gsae.analysis import captions

    rows = rows_fixture() + [row("gsae", "g", 32, 0, fvu=0.2)]
    t = captions.summary_table(gf.metrics_frame(rows), ["delta_ce", "fvu"])
    g32 = t[(t.arm == "g-SAE, g-encode") & (t.k == 32)].iloc[0]
    assert g32.delta_ce == "—" and g32.fvu == "0.200" and g32.n == 1  # one value: no interval
    assert "nan" not in t.to_string()
    assert captions.num(float("nan")) == "—" and captions.num(0.22) == "0.220" and captions.num(2304) == "2,304"
    assert list(captions.secondary_table(rows_fixture(), ["fvu"]).columns) == ["secondary encoders"]


def test_probing_sentence_reads_the_plotted_difference_and_the_reference_points():
    from gsae.analysis import captions

    rows = [row(arm, "plain", 32, s, probe_auc_pos_heldout=v) for s in range(3)
            for arm, v in (("topk", 0.80 + 0.01 * s), ("gsae", 0.79 + 0.02 * s))]
    base = {"residual": {"probe_auc_pos_heldout": 0.7}, "random_init": {"32": {"probe_auc_pos_heldout": 0.65}}}
    diffs = [-0.01, 0.0, 0.01]
    half = T_975_DF2 * statistics.stdev(diffs) / math.sqrt(3)
    s = captions.probing(rows, base, 0.02)
    assert f"is +0.0000 [{-half:+.4f}, {half:+.4f}] (plain 95% t-interval), not wholly above the −0.02 margin" in s
    assert "0.810 for TopK and 0.810 for the g-SAE (plain-encode, n = 3)" in s
    assert "raw residual dimension reaches 0.700 and an untrained SAE 0.650" in s
