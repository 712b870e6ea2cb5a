"""The headline figure: a forest plot of every registered test at the primary k, drawn from ledger.json's record
(``stages.claims.analyse(p, rows).record``) and the pre-registration as it applies to the profile, for the README
(``figures/headline.png``, notebook 06). Sign convention and intervals as in ``analysis.figures``: the paired gain
of the g-SAE over TopK in % of TopK's mean (positive = g-SAE better) with the deciding interval, Bonferroni over the
claim's tests; an equivalence test (C4) as the difference g-SAE − TopK in its own units."""

from __future__ import annotations

import math
from typing import Any

import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory

from .figures import UNITS, VERDICT_COLORS

SHORT_NAMES = {"delta_ce_all": "fidelity: ΔCE", "kl_all": "fidelity: KL", "delta_ce": "fidelity: ΔCE (first contexts)",
               "kl": "fidelity: KL (first contexts)", "dead_fraction_trainsplit": "dead latents",
               "steer_kl_ratio@0.1": "steering KL / random", "probe_auc_pos_heldout": "POS-probe AUC"}
"""How the headline figure names each registered metric (others keep their identifier)."""
FIDELITY = ("delta_ce_all", "kl_all", "delta_ce", "kl")
LABELS = {"plain": ", no labels", "g": ", labels"}
"""A fidelity test's encoder: plain-encode uses no label at inference, the g-encode the true next tokens."""


def headline_rows(record: dict[str, Any], pre: dict[str, Any]) -> list[tuple[dict, dict, dict]]:
    """(claim, test result, registered test) for every test at the primary k, in the ledger's order (ledger.json's
    ``claims`` and the pre-registration as it applies to the profile)."""
    out = []
    for c in record["claims"]:
        specs = {f"{t['metric']} ({t['encode_mode']})": t for t in pre["claims"][c["claim"]]["tests"]}
        out += [(c, r, specs[r["test"]]) for r in c["primary"]]
    return out


def _finite(r: dict[str, Any]) -> bool:
    return all(isinstance(r[key], (int, float)) and math.isfinite(r[key]) for key in ("estimate", "lower", "upper"))


def _forest(ax: plt.Axes, rows: list[tuple[dict, dict, dict]], scale: float, fmt: str) -> tuple[float, float]:
    """Draw one row per test (top to bottom): its estimate and deciding interval in its verdict's colour, the
    verdict and the numbers at the right; returns the data range the rows need."""
    to_text = blended_transform_factory(ax.transAxes, ax.transData)
    span = [0.0]
    for i, (c, r, _) in enumerate(rows):
        y = len(rows) - 1 - i
        color = VERDICT_COLORS.get(r["verdict"], "0.4")
        if _finite(r):
            est, lo, hi = (scale * r[key] for key in ("estimate", "lower", "upper"))
            ax.errorbar([est], [y], xerr=[[est - lo], [hi - est]], fmt="o", ms=8, capsize=5, lw=2.4, color=color,
                        zorder=3)
            numbers = f"{fmt.format(est)} [{fmt.format(lo)}, {fmt.format(hi)}]".replace("-", "−")
            span += [lo, hi]
        else:
            ax.plot([0], [y], "X", ms=9, color=color, zorder=3)
            numbers = "no estimate"
        verdict = r["verdict"] if r["verdict"] == c["verdict"] else f"{r['verdict']} (claim: {c['verdict']})"
        ax.text(1.03, y + 0.08, verdict, transform=to_text, color=color, fontsize=11, fontweight="bold",
                va="bottom")
        ax.text(1.03, y - 0.04, numbers, transform=to_text, color="0.15", fontsize=10, va="top")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{c['claim']} {SHORT_NAMES.get(t['metric'], t['metric'])}"
                        + (LABELS.get(t["encode_mode"], "") if t["metric"] in FIDELITY else "")
                        + ("" if t["rule"] != "relative" else f"\nneeds ≥ {100 * float(t['min_rel_effect']):g}%")
                        for c, _, t in reversed(rows)], fontsize=10.5)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.grid(axis="y", visible=False)
    return min(span), max(span)


def plot_headline(record: dict[str, Any], pre: dict[str, Any]) -> plt.Figure:
    """The headline forest plot, drawn for a README (about 860 px wide at ``save_figure``'s 130 dpi, text ≥ 10 pt):
    one row per registered test at the primary k (``headline_rows``) with the paired gain in % of TopK's mean and
    its deciding interval (Bonferroni over the claim's tests), the band from 0 to the test's minimum effect shaded,
    the verdict and the numbers at the right. Equivalence tests (C4) get a panel of their own in the metric's units,
    with the margin drawn and the region beyond it shaded."""
    rows = headline_rows(record, pre)
    rel = [x for x in rows if x[2]["rule"] == "relative"]
    eq = [x for x in rows if x[2]["rule"] != "relative"]
    sns.set_theme(style="whitegrid", context="notebook")
    heights = [len(rel) + 0.7] + ([len(eq) + 0.9] if eq else [])
    fig, axes = plt.subplots(len(heights), 1, figsize=(5.8, 0.62 * sum(heights) + 1.75), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    ax = axes[0, 0]
    lo, hi = _forest(ax, rel, 100.0, "{:+.1f}%")
    for i, (_, _, t) in enumerate(rel):
        y = len(rel) - 1 - i
        ax.fill_betweenx([y - 0.42, y + 0.42], 0, 100 * float(t["min_rel_effect"]), color="0.87", lw=0, zorder=0)
        hi = max(hi, 100 * float(t["min_rel_effect"]))
    pad = 0.08 * (hi - lo)
    ax.set_xlim(lo - pad, hi + pad)
    ax.axvline(0, color="0.3", lw=1, zorder=1)
    ax.set_xlabel("gain of the g-SAE over TopK (% of TopK; > 0: g-SAE better)", fontsize=10.5)
    if eq:
        ax4 = axes[1, 0]
        lo4, hi4 = _forest(ax4, eq, 1.0, "{:+.4f}")
        margin = max(float(t["margin"]) for _, _, t in eq)
        lim = 1.3 * max(abs(lo4), abs(hi4), margin)
        ax4.axvspan(-lim, -margin, color="0.87", lw=0, zorder=0)
        ax4.axvline(-margin, color="0.35", ls="--", lw=1.2, zorder=1)
        ax4.axvline(0, color="0.3", lw=1, zorder=1)
        ax4.set_xlim(-lim, lim)
        unit = UNITS.get(eq[0][2]["metric"], "metric units")
        ax4.set_xlabel(f"difference g-SAE − TopK ({unit}); comparable if > −{margin:g}", fontsize=10.5)
    ns = sorted({r["n"] for _, r, _ in rows})
    ks = ", ".join(str(k) for k in pre["primary_k"])
    fig.suptitle(f"g-SAE against TopK at k = {ks}, {'/'.join(map(str, ns))} paired seeds", fontsize=12,
                 fontweight="bold")
    handles = [plt.Line2D([], [], marker="o", color="0.3", lw=2.4, ms=7,
                          label="mean gain, deciding 95% interval (Bonferroni over the claim's tests)"),
               Patch(color="0.87", label="short of the claim's minimum effect (C4: beyond its margin)")]
    fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 0.0), fontsize=10, frameon=False)
    for a in axes[:, 0]:
        a.locator_params(axis="x", nbins=8)
    fig.subplots_adjust(left=0.24, right=0.71, top=1 - 0.5 / fig.get_figheight(), bottom=1.3 / fig.get_figheight(),
                        hspace=1.0 / fig.get_figheight() * 2.2)
    return fig
