"""Tidy tables and seaborn figures for the notebooks (the notebooks only call these and show the result).

Every saved figure gets a sibling entry in ``<figures_dir>/provenance.json``: the git commit, package
versions, profile, seeds and data hashes of the run that drew it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

# A Jupyter kernel sets MPLBACKEND to the inline backend (ipykernel does, unless it is set already), so notebooks
# show their figures; anywhere else (tests, the command line, no display) draw off-screen, into files only.
if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from . import arms, io  # noqa: E402
from .claims import mean_t_interval as mean_ci  # noqa: E402  (one definition of the interval)
from .steering import CONTROL_LABEL  # noqa: E402

PLAIN_ENCODE_COLOR = "#1f77b4"
"""Colour of an arm's plain-encode codes when the arm also has a g-encode (which gets the arm's own colour)."""


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
    return pd.DataFrame(out)


def summary_table(df: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Per arm and k: mean ± 95% CI over seeds of each metric (what the closing note and README quote)."""
    rows = []
    for (arm, k), g in df[df.metric.isin(metrics)].groupby(["arm", "k"]):
        row: dict[str, Any] = {"arm": arm, "k": k}
        for m in metrics:
            mean, half = mean_ci(g[g.metric == m].value.tolist())
            row[m] = f"{mean:.4g} ± {half:.2g}"
        rows.append(row)
    return pd.DataFrame(rows)


def plot_vs_k(df: pd.DataFrame, metrics: Sequence[str], titles: Sequence[str] | None = None,
              logy: Sequence[bool] | None = None) -> plt.Figure:
    """One panel per metric: value vs L0 (= k) on a log axis, one line per arm, mean ± the 95% t-interval over
    seeds (``claims.mean_t_interval``, the interval the tables and the claims ledger use; seaborn's bootstrap
    CI is degenerate with 3 seeds). Arms at the same k are nudged apart horizontally so their bars do not hide
    each other."""
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8), squeeze=False)
    for i, m in enumerate(metrics):
        ax = axes[0, i]
        sub = df[df.metric == m]
        colors = palette()
        shown = [a for a in colors if a in set(sub.arm)] + sorted(set(sub.arm) - set(colors))
        for j, arm in enumerate(shown):
            stats = [(k, *mean_ci(g.value.tolist())) for k, g in sub[sub.arm == arm].groupby("k")]
            ks = np.array([t[0] for t in stats], dtype=float) * 2 ** (0.04 * (j - (len(shown) - 1) / 2))
            ax.errorbar(ks, [t[1] for t in stats], yerr=[0 if math.isnan(t[2]) else t[2] for t in stats],
                        marker="o", ms=4, capsize=3, color=colors.get(arm), label=arm)
        ax.legend(fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(sub.k.unique()))
        ax.set_xticklabels([str(k) for k in sorted(sub.k.unique())])
        if logy and logy[i]:
            ax.set_yscale("log")
        ax.set_xlabel("L0 (k)")
        ax.set_ylabel(m)
        ax.set_title(titles[i] if titles else m)
        if i:
            ax.get_legend().remove()
    fig.tight_layout()
    return fig


def plot_hyperparameter_ablation(selection: dict[str, Any], baseline: str, arm: str, hp: str = "beta",
                                 edges: dict[str, Any] | None = None) -> plt.Figure:
    """Validation ΔCE and dead fraction of ``arm`` against its hyperparameter ``hp`` at the selection k, beside
    the ``baseline`` arm at the chosen lr (for the g-SAE's beta, beta = 0 is TopK).

    ``edges`` (``stages.train.selection_edge_check``) adds its trial beyond the grid as an open marker."""
    sns.set_theme(style="whitegrid", context="notebook")
    colors, base, treated = palette(), arms.get(baseline), arms.get(arm)
    trials = pd.DataFrame(selection["trials"])
    ref = trials[(trials.arm == baseline) & (trials.lr == selection["lr"])]
    g = trials[trials.arm == arm].copy()
    g["encoder"] = g.encode_mode.map(treated.label_for)
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for ax, m in zip(axes, ("delta_ce", "dead_fraction"), strict=True):
        sns.lineplot(data=g, x=hp, y=m, hue="encoder", marker="o", ax=ax, palette=colors)
        ax.axhline(float(ref[m].iloc[0]), color=colors[base.label], ls="--", label=f"{base.label} (chosen lr)")
        ax.axvline(selection[hp], color="0.7", lw=1)
        check = (edges or {}).get("checks", {}).get(hp)
        if check is not None:
            ax.plot([check["beyond"]], [check["metrics"][m]], marker="o", mfc="none", ls="none",
                    color=treated.color, label="beyond the grid (not registered)")
        ax.set_xscale("log")
        ax.set_title(f"{m} on validation, k = {selection['k']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_frequency_histogram(freqs: dict[str, np.ndarray]) -> plt.Figure:
    """log10 firing frequency of live latents per arm (dead latents counted in the legend)."""
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, f in freqs.items():
        live = f[f > 0]
        sns.histplot(np.log10(live), bins=40, element="step", fill=False, ax=ax, color=palette().get(label),
                     label=f"{label} ({(f == 0).sum()} dead)")
    ax.set_xlabel("log10 firing frequency on the test split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_steering(df: pd.DataFrame, metric: str = "kl") -> plt.Figure:
    """Per-latent steering effects: one panel per alpha, box plots over latents, TopK vs g-SAE per k."""
    sns.set_theme(style="whitegrid", context="notebook")
    alphas = sorted(df.alpha.unique())
    fig, axes = plt.subplots(1, len(alphas), figsize=(4.6 * len(alphas), 3.8), squeeze=False, sharey=False)
    for ax, a in zip(axes[0], alphas, strict=True):
        sub = df[(df.alpha == a) & (df.metric == metric)]
        sns.boxplot(data=sub, x="k", y="value", hue="arm", ax=ax, palette=palette(), fliersize=1.5)
        ax.set_title(f"alpha = {a:g} x median ||x||")
        ax.set_ylabel(metric)
        if metric == "kl":
            ax.set_yscale("log")
        if ax is not axes[0][0]:
            ax.get_legend().remove()
    fig.tight_layout()
    return fig


def plot_probing(df: pd.DataFrame) -> plt.Figure:
    return plot_vs_k(df, ["probe_auc_pos", "probe_auc_genre"],
                     ["POS tags: best single latent AUC", "Genres: best single latent AUC"])


def save_figure(fig: plt.Figure, path: str | Path, provenance: dict[str, Any]) -> Path:
    """Write ``fig`` as PNG atomically and record its provenance next to it."""
    path = Path(path)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
    prov_path = path.parent / "provenance.json"
    prov = io.read_json(prov_path) if prov_path.exists() else {}
    prov[path.name] = provenance
    io.write_json(prov_path, prov)
    return path


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
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation ΔCE, plain-encode (nats)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_selection(selection: dict[str, Any], edges: dict[str, Any] | None, baseline: str, arm: str) -> plt.Figure:
    """The selection figure of either protocol: per_arm (v2) draws each arm's validation ΔCE (nats) against its
    learning rate, chosen lr marked; v1 draws the g-SAE's β ablation (``plot_hyperparameter_ablation``)."""
    if selection.get("protocol") != "per_arm":
        return plot_hyperparameter_ablation(selection, baseline, arm, "beta", edges)
    curves = {}
    for name, trials in selection["lr_trials"].items():
        lrs = sorted(trials, key=float)
        curves[name] = ([float(lr) for lr in lrs], [trials[lr] for lr in lrs],
                        f"{arms.get(name).label} (chosen {float(selection['lr'][name]):.3g})")
    return _arm_curves(curves, {n: float(lr) for n, lr in selection["lr"].items()}, "learning rate",
                       f"lr trials at k = {selection['k']}, mean over selection seeds {selection['seeds']}")


def plot_convergence(conv: dict[str, Any]) -> plt.Figure:
    """Validation ΔCE (nats) of each arm at its chosen lr against training tokens; the primary length is marked."""
    curves = {}
    for name, curve in conv["curves"].items():
        toks = sorted(curve, key=int)
        curves[name] = ([int(t) for t in toks], [curve[t]["delta_ce"] for t in toks], arms.get(name).label)
    return _arm_curves(curves, {"primary length": conv["primary_tokens"]}, "training tokens per SAE")
