"""Figures for the notebooks, which call these (and ``captions`` for the words under them) and show the result.

Sign convention, as in ``analysis.report``: a paired **gain** is (TopK − g-SAE) / mean TopK where lower is better
and (g-SAE − TopK) / mean TopK where higher is better, so a positive gain always means the g-SAE is better; an
equivalence test (C4) shows the difference g-SAE − TopK in the metric's own units (higher is better there). Every
drawn interval says which it is: the deciding one (95 %, Bonferroni over a claim's tests) or a plain 95 % t-interval.
Legends or titles give the number of seeds at each k, counted from the plotted data.

Every saved figure gets an entry in ``<figures_dir>/provenance.json`` (git commit, packages, profile, data hashes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

# A Jupyter kernel sets MPLBACKEND to the inline backend (ipykernel does, unless it is set already), so notebooks
# show their figures; anywhere else (tests, the command line, no display) draw off-screen, into files only.
if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .. import arms, io  # noqa: E402
from ..steering import CONTROL_LABEL  # noqa: E402
from .decision import paired_interval  # noqa: E402  (the ledger's interval)
from .rows import mean_t_interval as mean_ci  # noqa: E402  (one definition of the interval)

PLAIN_ENCODE_COLOR = "#1f77b4"
"""Colour of an arm's plain-encode codes when the arm also has a g-encode (which gets the arm's own colour)."""

UNITS = {"delta_ce": "nats", "kl": "nats", "ce_spliced": "nats", "ce_clean": "nats", "fvu": "fraction of variance",
         "fvu_typical": "fraction of variance", "dead_fraction": "fraction of latents",
         "dead_fraction_train": "fraction of latents", "l0": "latents per token", "recovered_zero": "fraction",
         "probe_auc_pos": "ROC AUC", "probe_auc_genre": "ROC AUC", "steer_kl@0.25": "nats", "steer_kl@0.5": "nats",
         "steer_kl@1": "nats", "steer_kl": "nats", "probe_auc_pos_heldout": "ROC AUC", "ce_loss_score": "fraction",
         "explained_variance": "fraction of variance", "kl_div": "nats",
         "dead_fraction_trainsplit": "fraction of latents", "delta_ce_all": "nats", "kl_all": "nats",
         "ce_loss_score_all": "fraction"}
"""Unit of each metric, for axis labels ("" when unknown)."""
NONNEG = frozenset({"kl", "kl_all", "kl_div", "dead_fraction_trainsplit", "probe_auc_pos_heldout",
                    "fvu", "fvu_typical", "dead_fraction", "dead_fraction_train", "l0", "probe_auc_pos",
                    "probe_auc_genre", "steer_kl@0.25", "steer_kl@0.5", "steer_kl@1", "steer_kl"})
"""Metrics that cannot be negative: their t-intervals are clipped at 0 in plots (delta_ce can be negative)."""
VERDICT_COLORS = {"replicated": "#2ca02c", "not replicated": "#d62728", "underpowered": "#ff7f0e",
                  "mixed": "#9467bd", "not testable (floor)": "#7f7f7f", "not tested": "#7f7f7f"}
"""Colour of each ledger verdict in the headline figure."""



def axis_label(metric: str) -> str:
    """``metric (unit)``, or the bare name when its unit is unknown."""
    unit = UNITS.get(metric, "")
    return f"{metric} ({unit})" if unit else metric


def n_text(counts: Mapping[int, int], what: str = "seeds") -> str:
    """"n = 16 seeds" when every k has the same count, else "n = 3, 3, 16, 3 seeds at k = 8, 16, 32, 64"."""
    ks = sorted(counts)
    if len({counts[k] for k in ks}) <= 1:
        return f"n = {counts[ks[0]] if ks else 0} {what}"
    return f"n = {', '.join(str(counts[k]) for k in ks)} {what} at k = {', '.join(str(k) for k in ks)}"


def interval_name(alpha: float = 0.05, family: int = 1) -> str:
    """What an interval at confidence 1 - alpha / family is, in words."""
    level = f"{100 * (1 - alpha):g}%"
    return f"plain {level} t-interval" if family == 1 else f"deciding {level} interval, Bonferroni over {family} tests"


def palette() -> dict[str, str]:
    """Label -> colour for every registered arm and encoder (``gsae.arms``)."""
    out = {}
    for arm in (arms.get(n) for n in arms.names()):
        out[arm.label] = arm.color
        for mode in arm.encode_modes():
            plain_of_two = mode == "plain" and arm.has_gradient_encoder
            out[arm.label_for(mode)] = PLAIN_ENCODE_COLOR if plain_of_two else arm.color
    out[CONTROL_LABEL] = "#999999"
    return out


def metrics_frame(rows: Sequence[dict[str, Any]], variant: str = "primary") -> pd.DataFrame:
    """Long table: one row per (arm label, k, seed, metric) for one variant; TopK counted once (its modes agree)."""
    out = []
    for r in rows:
        arm = arms.get(r["arm"])
        if r["variant"] != variant or r["encode_mode"] not in arm.encode_modes():
            continue
        label = arm.label_for(r["encode_mode"])
        for m, v in r["metrics"].items():
            out.append({"arm": label, "k": r["k"], "seed": r["seed"], "metric": m, "value": v})
    return pd.DataFrame(out, columns=["arm", "k", "seed", "metric", "value"])


def interval(values: Sequence[float], nonneg: bool = False) -> tuple[float, float, float]:
    """(mean, lower, upper) of the 95% t-interval over seeds (``rows.mean_t_interval``); a non-negative
    quantity's lower bound is clipped at 0; a single value gives a zero-width interval."""
    mean, half = mean_ci(list(values))
    half = 0.0 if math.isnan(half) else half
    lo = max(mean - half, 0.0) if nonneg else mean - half
    return mean, lo, mean + half


def _log2_k_axis(ax: plt.Axes, ks: Sequence[float]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ks), [str(int(k)) for k in sorted(ks)])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("L0 = k (latents per token)")


def plot_vs_k(df: pd.DataFrame, metrics: Sequence[str], titles: Sequence[str] | None = None,
              logy: Sequence[bool] | None = None, nonneg: Collection[str] = NONNEG) -> plt.Figure:
    """One panel per metric: value vs L0 (= k) on a log axis, one line per arm, mean ± the 95% t-interval over
    seeds (``rows.mean_t_interval``, the interval the tables and the ledger use; seaborn's bootstrap CI is
    degenerate with 3 seeds); the title gives the seeds per k (the legend, per arm, where the arms differ). Arms
    at the same k are nudged apart horizontally so their bars do not hide each other.

    For metrics in ``nonneg`` the interval is clipped at 0 (never drawn below zero). On a log y axis
    (``logy``) a lower bound clipped to 0 runs off the bottom of the axis, which reads as "down to 0"."""
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.9), squeeze=False)
    colors = palette()
    for i, m in enumerate(metrics):
        ax = axes[0, i]
        sub = df[(df.metric == m) & df.value.notna()]
        shown = [a for a in colors if a in set(sub.arm)] + sorted(set(sub.arm) - set(colors))
        bounds: list[float] = []
        counts = {arm: sub[sub.arm == arm].groupby("k").size().to_dict() for arm in shown}
        shared = len({tuple(sorted(c.items())) for c in counts.values()}) == 1  # every arm has the same seeds per k
        for j, arm in enumerate(shown):
            stats = [(k, *interval(g.value.tolist(), m in nonneg)) for k, g in sub[sub.arm == arm].groupby("k")]
            bounds += [b for t in stats for b in t[1:]]
            ks = np.array([t[0] for t in stats], dtype=float) * 2 ** (0.04 * (j - (len(shown) - 1) / 2))
            means = np.array([t[1] for t in stats])
            yerr = np.array([[t[1] - t[2] for t in stats], [t[3] - t[1] for t in stats]])
            ax.errorbar(ks, means, yerr=yerr, marker="o", ms=4, capsize=3, color=colors.get(arm),
                        label=arm if shared else f"{arm} ({n_text(counts[arm])})")
        if i == 0 or not shared:
            ax.legend(fontsize=8)
        _log2_k_axis(ax, sorted(sub.k.unique()))
        if logy and logy[i]:
            ax.set_yscale("log")
            positive = [b for b in bounds if b > 0]
            if positive:  # limits from the positive bounds, so a bound clipped to 0 cannot stretch the axis
                ax.set_ylim(min(positive) / 1.25, max(positive) * 1.25)
        ax.set_ylabel(axis_label(m))
        seeds = f"\n({n_text(next(iter(counts.values())))})" if shared and counts else ""
        ax.set_title((titles[i] if titles else m) + seeds, fontsize=10)
    fig.tight_layout()
    return fig


class PairedDifferences(NamedTuple):
    fig: plt.Figure
    table: pd.DataFrame
    """What is plotted (``paired_difference_table``)."""


def paired_difference_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str], baseline: str, treatment: str,
                            encode_mode: str, better: str | Mapping[str, str], *,
                            baseline_encode_mode: str | None = None, variant: str = "primary",
                            absolute: bool = False, alpha: float = 0.05, family: int = 1) -> pd.DataFrame:
    """Per metric and k, the seed-paired gain of ``treatment``'s codes under ``encode_mode`` over ``baseline``'s
    (metrics.jsonl rows): per seed (baseline − treatment) / mean(baseline) x 100 where ``better`` (one word, or
    one per metric) is "lower", (treatment − baseline) / mean(baseline) x 100 where it is "higher"; with
    ``absolute`` the same oriented difference in the metric's own units. The baseline uses
    ``baseline_encode_mode``, by default ``encode_mode`` if the baseline reports it, else its first encoder.

    Columns: metric, k, n (paired seeds), seeds, baseline_mean and treatment_mean (over those seeds, in the
    metric's units), gains (per seed), mean, lower, upper (the t-interval at confidence 1 − alpha / family:
    ``family`` = 1 is the plain 95 % interval, a claim's number of tests its deciding Bonferroni interval),
    interval (which, in words) and unit ("%" or the metric's)."""
    base_arm = arms.get(baseline)
    if baseline_encode_mode is None:
        modes = base_arm.encode_modes()
        baseline_encode_mode = encode_mode if encode_mode in modes else modes[0]
    t_arm = arms.get(treatment)
    if encode_mode not in t_arm.encode_modes() and not (t_arm.has_gradient_encoder and encode_mode == "g_free"):
        raise ValueError(f"arm {treatment!r} reports encoders {t_arm.encode_modes()} (and g_free if it uses the "
                         f"gradient), not {encode_mode!r}")

    def values(arm: str, mode: str, metric: str) -> dict[int, dict[int, float]]:
        out: dict[int, dict[int, float]] = {}
        for r in rows:
            if r["variant"] == variant and r["arm"] == arm and r["encode_mode"] == mode and metric in r["metrics"]:
                out.setdefault(r["k"], {})[r["seed"]] = float(r["metrics"][metric])
        return out

    table = []
    for m in metrics:
        direction = better if isinstance(better, str) else better[m]
        if direction not in ("lower", "higher"):
            raise ValueError(f"better must be 'lower' or 'higher' for {m!r}, got {direction!r}")
        sign = -1.0 if direction == "lower" else 1.0
        b, t = values(baseline, baseline_encode_mode, m), values(treatment, encode_mode, m)
        for k in sorted(set(b) & set(t)):
            seeds = sorted(set(b[k]) & set(t[k]))
            if not seeds:
                continue
            base_mean = float(np.mean([b[k][s] for s in seeds]))
            gains = [sign * (t[k][s] - b[k][s]) * (1.0 if absolute else 100 / base_mean) for s in seeds]
            iv = paired_interval(np.array(gains), alpha, family) if len(gains) > 1 else None
            mean, lo, hi = (iv.estimate, iv.lower, iv.upper) if iv else (gains[0], gains[0], gains[0])
            table.append({"metric": m, "k": k, "n": len(seeds), "seeds": seeds, "baseline_mean": base_mean,
                          "treatment_mean": float(np.mean([t[k][s] for s in seeds])), "gains": gains, "mean": mean,
                          "lower": lo, "upper": hi, "interval": interval_name(alpha, family),
                          "unit": UNITS.get(m, "metric units") if absolute else "%"})
    if not table:
        raise ValueError(f"no seed-paired rows of {baseline!r} ({baseline_encode_mode}) and {treatment!r} "
                         f"({encode_mode}) for {list(metrics)} in variant {variant!r}")
    return pd.DataFrame(table)


def plot_paired_differences(rows: Sequence[dict[str, Any]], metric: str | Sequence[str], baseline: str,
                            treatment: str, encode_mode: str, min_rel_effect: float, *,
                            better: str | Mapping[str, str], baseline_encode_mode: str | None = None,
                            variant: str = "primary", alpha: float = 0.05, family: int = 1) -> PairedDifferences:
    """One panel per metric: per k, the seed-paired gain of ``treatment`` over ``baseline`` in % of the
    baseline's mean (``paired_difference_table``; positive = treatment better), each seed as a grey dot and their
    mean with its t-interval (plain 95 %, or Bonferroni over ``family`` tests: the legend says which), the band
    from 0 to ``min_rel_effect`` (a fraction: 0.05 shades 0 to 5 %) shaded as too small to count, a line at zero.
    Returns the figure and the plotted numbers."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    table = paired_difference_table(rows, metrics, baseline, treatment, encode_mode, better,
                                    baseline_encode_mode=baseline_encode_mode, variant=variant, alpha=alpha,
                                    family=family)
    sns.set_theme(style="whitegrid", context="notebook")
    t_arm, b_arm = arms.get(treatment), arms.get(baseline)
    t_label, b_label = t_arm.label_for(encode_mode), b_arm.label
    color = palette().get(t_label, t_arm.color)
    band = 100 * min_rel_effect
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.9 * len(metrics), 4.1), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        sub = table[table.metric == m]
        ks = sub.k.to_numpy(dtype=float)
        ax.axhspan(0, band, color="0.88", zorder=0, label=f"gain below the {band:g}% minimum effect")
        ax.axhline(0, color="0.3", lw=1)
        for k, gains in zip(ks, sub.gains, strict=True):
            ax.plot([k] * len(gains), gains, "o", ms=3.5, color="0.55", zorder=2)
        ax.errorbar(ks, sub["mean"], yerr=[sub["mean"] - sub.lower, sub.upper - sub["mean"]], fmt="o", ms=6,
                    capsize=4, color=color, zorder=3,
                    label=f"mean, {sub.interval.iloc[0]}\n({n_text(dict(zip(sub.k, sub.n, strict=True)))})")
        ax.plot([], [], "o", ms=3.5, color="0.55", label="one seed")
        _log2_k_axis(ax, ks)
        ax.set_ylabel(f"gain over {b_label} (% of its mean)")
        direction = better if isinstance(better, str) else better[m]
        ax.set_title(f"{m}, {t_label}\n({direction} is better; gain > 0: {t_arm.label} better)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return PairedDifferences(fig, table)


def plot_length_check(gains: Sequence[Any], checks: Sequence[Any], margin: float, variant: str) -> plt.Figure:
    """The length check (PREREG §5): per test, each seed's paired gain at the primary length (x) against the longer
    training (y), in % of TopK's mean; on the diagonal the gain did not move, inside the band it moved by less than
    ``margin``. ``gains`` are ``ledger.GroupGains``, ``checks`` the matching ``ledger.LengthCheck`` (their deciding
    Bonferroni interval is in the title)."""
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, len(gains), figsize=(4.4 * len(gains), 4.2), squeeze=False)
    for ax, g, c in zip(axes[0], gains, checks, strict=True):
        x, y = 100 * np.asarray(g.primary), 100 * np.asarray(g.variant)
        lim = max(8.0, float(np.abs(np.r_[x, y]).max()) * 1.15) if len(x) else 8.0
        line = np.array([-lim, lim])
        ax.fill_between(line, line - 100 * margin, line + 100 * margin, color="0.9", label=f"±{100 * margin:g} points")
        ax.plot(line, line, color="0.5", lw=1)
        ax.axhline(0, color="0.7", lw=0.8)
        ax.axvline(0, color="0.7", lw=0.8)
        ax.scatter(x, y, s=22, color="#d62728", zorder=3, label=f"one seed (n = {len(x)})")
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="gain, primary length (% of TopK)",
               ylabel=f"gain, {variant} (% of TopK)")
        ax.set_title(f"{g.test}: change {100 * c.estimate:+.1f} [{100 * c.lower:+.1f}, {100 * c.upper:+.1f}] points\n"
                     f"(deciding 95% Bonferroni interval) {c.outcome}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def plot_frequency_histogram(freqs: dict[str, np.ndarray]) -> plt.Figure:
    """log10 firing frequency of live latents per arm (dead latents counted in the legend)."""
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, f in freqs.items():
        live = f[f > 0]
        sns.histplot(np.log10(live), bins=40, element="step", fill=False, ax=ax, color=palette().get(label),
                     label=f"{label} ({(f == 0).sum()} of {len(f):,} dead)")
    ax.set_xlabel("log10 firing frequency (fraction of test tokens)")
    ax.set_ylabel("latents (count)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_training_curves(history: pd.DataFrame, y: str = "fvu") -> plt.Figure:
    """One panel per k: the logged training ``y`` (per batch) against training tokens, one thin line per seed in
    the arm's colour (``stages.train.training_history_frame``); the legend counts each arm's seeds."""
    sns.set_theme(style="whitegrid", context="notebook")
    ks = sorted(history.k.unique())
    fig, axes = plt.subplots(1, len(ks), figsize=(3.4 * len(ks), 3.2), squeeze=False, sharey=True)
    for ax, k in zip(axes[0], ks, strict=True):
        sub = history[history.k == k]
        for arm, g in sub.groupby("arm", sort=False):
            impl = arms.get(arm)
            for i, (_, run) in enumerate(g.groupby("seed")):
                ax.plot(run.tokens, run[y], lw=0.8, alpha=0.7, color=impl.color,
                        label=f"{impl.label} (n = {g.seed.nunique()} seeds)" if i == 0 else None)
        ax.set(yscale="log", title=f"k = {k}", xlabel="training tokens")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel(f"training {y.upper() if y == 'fvu' else y} (per batch)")
    fig.tight_layout()
    return fig


def plot_harvest_norms(x_norm: np.ndarray, cg_norm: np.ndarray) -> plt.Figure:
    """Histograms of log10 ‖x‖ and log10 ‖c g‖ per harvested token."""
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    for ax, v, name in ((axes[0], x_norm, "‖x‖"), (axes[1], cg_norm, "‖c g‖")):
        sns.histplot(np.log10(np.asarray(v, dtype=float) + 1e-12), bins=60, ax=ax)
        ax.set(xlabel=f"log10 {name} (n = {len(v):,} tokens)", ylabel="tokens")
    fig.tight_layout()
    return fig


def plot_steering(df: pd.DataFrame, metric: str = "kl") -> plt.Figure:
    """Per-latent steering effects: one panel per alpha, box plots over latents (all seeds pooled), TopK vs g-SAE
    per k, the random-direction control in grey; the title counts the values in each box."""
    sns.set_theme(style="whitegrid", context="notebook")
    alphas = sorted(df.alpha.unique())
    fig, axes = plt.subplots(1, len(alphas), figsize=(4.6 * len(alphas), 3.9), squeeze=False, sharey=False)
    for ax, a in zip(axes[0], alphas, strict=True):
        sub = df[(df.alpha == a) & (df.metric == metric)]
        sns.boxplot(data=sub, x="k", y="value", hue="arm", ax=ax, palette=palette(), fliersize=1.5)
        counts = sorted(set(sub.groupby(["arm", "k"]).size()))
        ax.set_title(f"α = {a:g} × median ‖x‖\n(n = {'/'.join(map(str, counts))} per box)", fontsize=10)
        ax.set_xlabel("k (latents per token)")
        ax.set_ylabel("KL(clean ‖ steered) (nats)" if metric == "kl" else axis_label(metric))
        if metric == "kl":
            ax.set_yscale("log")
        if ax is not axes[0][0]:
            ax.get_legend().remove()
        else:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def probing_table(rows: Sequence[dict[str, Any]], metric: str = "probe_auc_pos_heldout", baseline: str = "topk",
                  treatment: str = "gsae") -> pd.DataFrame:
    """C4's paired difference per k: ``treatment`` (plain-encode) − ``baseline`` in AUC (higher is better, so
    > 0: treatment better), plain 95 % t-interval (``paired_difference_table``): what ``plot_probing`` draws."""
    return paired_difference_table(rows, [metric], baseline, treatment, "plain", "higher", absolute=True)


def plot_probing(df: pd.DataFrame, rows: Sequence[dict[str, Any]] | None = None,
                 baselines: dict[str, Any] | None = None, margin: float | None = None, baseline: str = "topk",
                 treatment: str = "gsae", metric: str = "probe_auc_pos_heldout") -> plt.Figure:
    """C4's probe: ``metric`` (ROC AUC) against k per arm and encoder, with the reference points of
    ``stages.probe.run_baselines`` when given (raw residual dimensions: a line; a random-init SAE: per k); and,
    when ``rows`` and ``margin`` are given, a second panel with ``probing_table``: the seed-paired difference
    treatment (plain-encode) − baseline per k, mean and plain 95% t-interval, with the equivalence margin at
    −``margin``."""
    fig = plot_vs_k(df, [metric], ["POS probe: best latent chosen on val, scored on test"])
    ax = fig.axes[0]
    if baselines and "residual" in baselines:
        ax.axhline(baselines["residual"][metric], color="0.35", ls="--", lw=1, label="raw residual dimension (±x_j)")
        ks = sorted(int(k) for k in baselines["random_init"])
        ax.plot(ks, [baselines["random_init"][str(k)][metric] for k in ks], color="0.35", ls=":", marker="s", ms=4,
                label="random-init SAE (untrained)")
        ax.legend(fontsize=7)
    if rows is None or margin is None:
        return fig
    table = probing_table(rows, metric, baseline, treatment)
    fig.set_size_inches(11, 4.1)
    ax.set_position([0.07, 0.14, 0.37, 0.74])
    diff = fig.add_axes([0.6, 0.14, 0.37, 0.74])
    diff.axhline(0, color="0.3", lw=1)
    diff.axhline(-margin, color=VERDICT_COLORS["not replicated"], ls="--", lw=1, label=f"margin −{margin:g} AUC")
    for k, d in zip(table.k, table.gains, strict=True):
        diff.plot([k] * len(d), d, "o", ms=3.5, color="0.55")
    diff.errorbar(table.k, table["mean"], yerr=[table["mean"] - table.lower, table.upper - table["mean"]],
                  fmt="o", ms=6, capsize=4, color=arms.get(treatment).color,
                  label=f"mean, {interval_name()}\n({n_text(dict(zip(table.k, table.n, strict=True)))})")
    _log2_k_axis(diff, list(table.k))
    diff.set_ylabel(f"{arms.get(treatment).label_for('plain')} − {arms.get(baseline).label} (ROC AUC)")
    diff.set_title("paired difference (grey: one seed; > 0: g-SAE better)", fontsize=10)
    diff.legend(fontsize=7)
    return fig


def save_figure(fig: plt.Figure, path: str | Path, provenance: dict[str, Any]) -> Path:
    """Write ``fig`` as PNG atomically and record its provenance next to it."""
    path = Path(path)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
    return record_provenance(path, provenance)


def record_provenance(path: str | Path, provenance: dict[str, Any]) -> Path:
    """Enter ``provenance`` for the file ``path`` in its folder's provenance.json (keyed by file name)."""
    path = Path(path)
    prov_path = path.parent / "provenance.json"
    prov = io.read_json(prov_path) if prov_path.exists() else {}
    prov[path.name] = provenance
    io.write_json(prov_path, prov)
    return path


def plot_ce_by_position(ce: Any, unigram_ce: float | None = None, title: str = "") -> plt.Figure:
    """Next-token CE (nats) against the position predicted, with the unigram CE (the best context-free
    predictor) as a reference line: a working LM falls well below it once it has context."""
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(range(1, len(ce) + 1), [float(v) for v in ce], marker=".", color="0.25", label="LM")
    if unigram_ce is not None:
        ax.axhline(unigram_ce, color="tab:red", ls="--", lw=1, label=f"unigram CE ({unigram_ce:.2f})")
    ax.set_xlabel("position predicted (tokens of context)")
    ax.set_ylabel("next-token CE (nats)")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def compact_number(x: float) -> str:
    """186368 -> '186k', 2975744 -> '2.98M', 0.004 -> '0.004': tick labels that never collide on a log axis."""
    if abs(x) >= 1e6:
        return f"{x / 1e6:.3g}M"
    if abs(x) >= 1e3:
        return f"{x / 1e3:.3g}k"
    return f"{x:.3g}"


def _ticks_at(ax: plt.Axes, xs: list[float]) -> None:
    """Label a log x axis only at the measured values (its default minor labels overlap)."""
    ax.set_xticks(xs, [compact_number(x) for x in xs])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())


def _arm_curves(curves: dict[str, tuple[list[float], list[float], str]], marks: dict[str, float], xlabel: str,
                title: str = "") -> plt.Figure:
    """One line per arm (``curves``: arm -> (x, validation ΔCE, legend label)) on a log x axis, with a dotted
    vertical line at each ``marks`` value (arm name or "primary length" -> x)."""
    sns.set_theme(style="whitegrid", context="notebook")
    colors = palette()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, (xs, ys, label) in curves.items():
        ax.plot(xs, ys, marker="o", color=colors[arms.get(name).label], label=label)
    for name, x in marks.items():
        ax.axvline(x, color=colors[arms.get(name).label] if name in arms.names() else "0.6", lw=0.8, ls=":",
                   label=None if name in arms.names() else name)
    ax.set_xscale("log")
    _ticks_at(ax, sorted({x for xs, _, _ in curves.values() for x in xs}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation ΔCE, plain-encode (nats)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_selection(selection: dict[str, Any]) -> plt.Figure:
    """Each arm's validation ΔCE (nats) against its learning rate (selection.json), the chosen lr marked."""
    curves = {}
    for name, trials in selection["lr_trials"].items():
        lrs = sorted(trials, key=float)
        curves[name] = ([float(lr) for lr in lrs], [trials[lr] for lr in lrs],
                        f"{arms.get(name).label} (chosen {float(selection['lr'][name]):.3g})")
    return _arm_curves(curves, {n: float(lr) for n, lr in selection["lr"].items()}, "learning rate",
                       f"lr trials at k = {selection['k']}, mean over selection seeds {selection['seeds']}")


def plot_convergence(conv: dict[str, Any], extension: dict[str, Any] | None = None) -> plt.Figure:
    """Validation ΔCE (nats) of each arm at its chosen lr against training tokens; the primary length is marked.
    ``extension`` (convergence_extension.json, exploratory) adds its longer lengths as hollow markers on dashes."""
    curves = {}
    for name, curve in conv["curves"].items():
        toks = sorted(curve, key=int)
        curves[name] = ([int(t) for t in toks], [curve[t]["delta_ce"] for t in toks], arms.get(name).label)
    fig = _arm_curves(curves, {"primary length": conv["primary_tokens"]}, "training tokens per SAE")
    if extension:
        ax, colors = fig.axes[0], palette()
        for name, curve in extension["curves"].items():
            toks = [t for t in sorted(curve, key=int) if int(t) >= max(int(u) for u in conv["curves"][name])]
            ax.plot([int(t) for t in toks], [curve[t]["delta_ce"] for t in toks], ls="--", marker="o", mfc="white",
                    color=colors[arms.get(name).label], label=f"{arms.get(name).label}, longer (exploratory)")
        _ticks_at(ax, sorted({int(t) for c in extension["curves"].values() for t in c}
                             | {int(t) for c in conv["curves"].values() for t in c}))
        ax.legend(fontsize=8)
    return fig
