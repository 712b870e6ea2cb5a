"""The dose-response (PREREG v6 §5): how much the gradient changes the g-SAE's selection at each beta, and what that
does to fidelity under both C1 estimands.

Each beta's g-SAEs (group ``beta_<b>``; the chosen beta's are the primary group) are paired with TopK's primary SAEs
of the same seeds, and every test of the named claims (C1 and C1g) gets the claims' own rule and Bonferroni
interval (``ledger.run_test``). Reported, never decisive: the chosen beta's verdict on all primary seeds is the
claim's. The chosen beta's point uses the dose seeds only, so every point of the curve rests on the same seeds.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from . import ledger
from .rows import BASELINE, TREATMENT, index_rows, seed_values

GROUP_PREFIX = "beta_"
"""A dose-response group is named ``beta_<b>`` (``gsae.specs.dose_specs``)."""

MEANS = (("selection_changed_share", "g"), ("delta_ce_all", "plain"), ("delta_ce_all", "g"), ("kl_all", "plain"),
         ("kl_all", "g"), ("explained_variance", "plain"), ("ce_loss_score_all", "plain"),
         ("ce_loss_score_all", "g"), ("l0", "plain"))
"""(metric, encoder) means reported per beta: the share of the k selected latents the true-label gradient changes
(against TopK(z) of the same SAE, every test token), then the field's units."""


class DosePoint(NamedTuple):
    beta: float
    """0 for TopK."""
    variant: str
    """The metrics rows' group: ``primary`` for TopK and the chosen beta, ``beta_<b>`` for the others."""
    chosen: bool
    seeds: tuple[int, ...]
    means: dict[str, float]
    """"<metric> (<encoder>)" -> mean over ``seeds``."""
    tests: list[ledger.TestResult]
    """Each test of the named claims, paired with TopK on ``seeds`` (empty for TopK)."""


def groups(rows: list[dict[str, Any]], arm: str = TREATMENT) -> dict[str, float]:
    """{group: beta} of ``arm``'s dose-response groups in ``rows`` (another gradient arm, e.g. the smoke profile's
    label-free one, may have chosen another beta and so have other groups)."""
    return {r["variant"]: float(r["variant"][len(GROUP_PREFIX):]) for r in rows
            if r["variant"].startswith(GROUP_PREFIX) and r["arm"] == arm}


def evaluate_dose(prereg: dict[str, Any], rows: list[dict[str, Any]], chosen_beta: float | None,
                  claims: tuple[str, ...] = ("C1", "C1g")) -> list[DosePoint]:
    """TopK's point, then one point per beta (ascending); empty without a registered dose-response or its rows."""
    dose_seeds = set((prereg.get("seeds") or {}).get("dose") or [])
    present = groups(rows)
    if not prereg.get("dose") or not dose_seeds or not present or chosen_beta is None:
        return []
    index, alpha = index_rows(rows), float(prereg["alpha"])
    claims = tuple(c for c in claims if c in prereg["claims"])
    betas = sorted({**present, "primary": float(chosen_beta)}.items(), key=lambda vb: vb[1])
    out = []
    for k in prereg["primary_k"]:
        seeds = _seeds(index, "primary", BASELINE, k) & dose_seeds  # every point on the seeds all of them have
        for variant, _ in betas:
            seeds &= _seeds(index, variant, TREATMENT, k)
        out.append(DosePoint(0.0, "primary", False, tuple(sorted(seeds)),
                             _means(index, "primary", BASELINE, k, seeds), []))
        for variant, beta in betas:
            sub = {("dose", arm, mode, kk): {s: m for s, m in per.items() if s in seeds}
                   for (v, arm, mode, kk), per in index.items()
                   if kk == k and ((v == "primary" and arm == BASELINE) or (v == variant and arm == TREATMENT))}
            tests = [ledger.run_test(sub, t, k, "dose", alpha, len(prereg["claims"][c]["tests"]))
                     ._replace(variant=variant, test=f"{c}: {t['metric']} ({t['encode_mode']})")
                     for c in claims for t in prereg["claims"][c]["tests"]]
            out.append(DosePoint(beta, variant, variant == "primary", tuple(sorted(seeds)),
                                 _means(index, variant, TREATMENT, k, seeds), tests))
    return out


def _seeds(index: dict, variant: str, arm: str, k: int) -> set[int]:
    return {s for (v, a, _, kk), per in index.items() if v == variant and a == arm and kk == k for s in per}


def _means(index: dict, variant: str, arm: str, k: int, seeds: set[int]) -> dict[str, float]:
    out = {}
    for metric, mode in MEANS:
        vals = [v for s, v in seed_values(index, variant, arm, mode, k, metric).items() if s in seeds]
        out[f"{metric} ({mode})"] = float(np.mean(vals)) if vals else math.nan
    return out


def render_dose(points: list[DosePoint]) -> str:
    """Two Markdown tables: each beta's means in the field's units, then its paired gains over TopK."""
    if not points:
        return ""

    def num(x: float, fmt: str) -> str:
        return "—" if math.isnan(x) else format(x, fmt)

    def beta_cell(pt: DosePoint) -> str:
        return "0 (TopK)" if not pt.tests else f"**{pt.beta:.3g}** (chosen)" if pt.chosen else f"{pt.beta:.3g}"

    cols = [("selection_changed_share (g)", "share of the k selections the gradient changes", ".1%"),
            ("delta_ce_all (plain)", "ΔCE, no labels (nats)", ".4f"), ("delta_ce_all (g)", "ΔCE, labels (nats)", ".4f"),
            ("kl_all (plain)", "KL, no labels", ".4f"), ("kl_all (g)", "KL, labels", ".4f"),
            ("explained_variance (plain)", "explained variance", ".4f"),
            ("ce_loss_score_all (plain)", "CE-loss score, no labels", ".4f"),
            ("ce_loss_score_all (g)", "CE-loss score, labels", ".4f"), ("l0 (plain)", "L0", ".1f")]
    lines = ["Dose-response (PREREG v6 §5; reported, never decisive): each beta's g-SAEs on the dose seeds "
             f"{list(points[0].seeds)}, means over seeds, every test context. \"No labels\" is the plain-encode "
             "(C1's estimand); \"labels\" is the g-encode with the true next tokens' gradient (C1g's, as the paper "
             "defines it). TopK has no gradient, so its two columns are the same SAEs.\n",
             "| β | seeds | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    lines += [f"| {beta_cell(pt)} | {len(pt.seeds)} | " + " | ".join(
        "—" if (not pt.tests and m.startswith("selection")) else num(pt.means.get(m, math.nan), f) for m, _, f in cols)
        + " |" for pt in points]
    tests = [r.test for r in next((pt.tests for pt in points if pt.tests), [])]
    lines += ["", "Paired gain over TopK on the same seeds, (TopK − g-SAE) / TopK, with the claims' own rule and "
              "Bonferroni interval:\n", "| β | " + " | ".join(tests) + " |", "|---|" + "---|" * len(tests)]
    for pt in points:
        if pt.tests:
            lines.append(f"| {beta_cell(pt)} | " + " | ".join(
                f"{_pct(r.estimate)} [{_pct(r.lower)}, {_pct(r.upper)}] {r.verdict}" for r in pt.tests) + " |")
    return "\n".join(lines) + "\n"


TEST_STYLE = {"C1: delta_ce_all (plain)": ("ΔCE, no labels (C1)", "#1f77b4", "o"),
              "C1: kl_all (plain)": ("KL, no labels (C1)", "#1f77b4", "s"),
              "C1g: delta_ce_all (g)": ("ΔCE, labels at inference (C1g)", "#d62728", "o"),
              "C1g: kl_all (g)": ("KL, labels at inference (C1g)", "#d62728", "s")}
"""Label, colour and marker of each dose-response test in the figure (others get defaults)."""


def plot_dose(points: list[DosePoint], min_effect: float = 0.05):
    """Two panels against β (log axis): the share of the k selected latents the gradient changes (mean over seeds,
    every test token), and each test's paired gain over TopK with its interval (the claims' rule), the claims'
    minimum effect dashed and the chosen β marked."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    pts = [pt for pt in points if pt.tests]
    sns.set_theme(style="whitegrid", context="notebook")
    fig, (ax_s, ax_g) = plt.subplots(1, 2, figsize=(10.5, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    betas = [pt.beta for pt in pts]
    ax_s.plot(betas, [100 * pt.means.get("selection_changed_share (g)", math.nan) for pt in pts], "o-", color="0.25")
    ax_s.set(xscale="log", xlabel="β", ylabel="% of the k selected latents the gradient changes",
             title="the dose: how much the gradient acts")
    ax_s.set_ylim(bottom=0)
    names = [r.test for r in pts[0].tests] if pts else []
    offsets = {n: f for n, f in zip(names, (0.94, 0.98, 1.02, 1.06), strict=False)}
    for name in names:
        label, color, marker = TEST_STYLE.get(name, (name, None, "o"))
        rs = [(pt.beta * offsets[name], next(r for r in pt.tests if r.test == name)) for pt in pts]
        xs = [b for b, _ in rs]
        est = [100 * r.estimate for _, r in rs]
        err = [[100 * (r.estimate - r.lower) for _, r in rs], [100 * (r.upper - r.estimate) for _, r in rs]]
        ax_g.errorbar(xs, est, yerr=err, fmt=marker + ("-" if marker == "o" else "--"), color=color, capsize=3,
                      ms=6, lw=1.4, label=label, mfc=color if marker == "o" else "white")
    ax_g.axhline(0, color="0.3", lw=1)
    ax_g.axhline(100 * min_effect, color="0.45", lw=1, ls=":",
                 label=f"the claims' minimum effect ({100 * min_effect:g}%)")
    for pt in pts:
        if pt.chosen:
            for ax in (ax_s, ax_g):
                ax.axvline(pt.beta, color="0.6", lw=6, alpha=0.25, zorder=0)
            ax_g.text(pt.beta, ax_g.get_ylim()[1], " chosen on validation", fontsize=9, va="top", color="0.35")
    ax_g.set(xscale="log", xlabel="β", ylabel="gain over TopK, % of TopK (> 0: g-SAE better)",
             title=f"paired gain on seeds {', '.join(map(str, pts[0].seeds)) if pts else ''} (Bonferroni intervals)")
    ax_g.legend(fontsize=8.5, loc="best")
    fig.tight_layout()
    return fig


def beta_selection_table(beta_selection: dict[str, Any], arm: str = TREATMENT) -> list[dict[str, Any]]:
    """One row per beta of ``arm``'s beta selection (results/<profile>/beta_selection.json): its lr, the objective
    (the registered encoder's validation delta_ce at that lr, mean over the selection seeds), the plain-encode's
    beside it, and the share of the k selections the gradient changes on the validation rows."""
    rec = beta_selection["arms"][arm]
    out = []
    for b in rec["betas"]:
        plain = next((v for lr, v in b["lr_trials"].items() if math.isclose(float(lr), b["lr"])), math.nan)
        share = [x for x in b.get("selection_changed_share", []) if x is not None]
        out.append({"β": b["beta"], "chosen": "◀" if b["beta"] == rec["beta"] else "", "lr": b["lr"],
                    "objective (validation ΔCE)": round(b["score"], 4), "plain-encode validation ΔCE": round(plain, 4),
                    "selections changed": f"{100 * float(np.mean(share)):.1f}%" if share else "—"})
    return out


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:+.1f}%"


def record(points: list[DosePoint]) -> list[dict[str, Any]]:
    """``points`` as ledger.json stores them."""
    return [{**pt._asdict(), "tests": [r._asdict() for r in pt.tests]} for pt in points]
