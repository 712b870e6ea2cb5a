"""The dose-response (PREREG v6 §3): how much the gradient changes the g-SAE's selection at each beta, and what that
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


def groups(rows: list[dict[str, Any]]) -> dict[str, float]:
    """{group: beta} of the dose-response groups present in ``rows``."""
    return {r["variant"]: float(r["variant"][len(GROUP_PREFIX):]) for r in rows
            if r["variant"].startswith(GROUP_PREFIX)}


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
        topk_seeds = _seeds(index, "primary", BASELINE, k) & dose_seeds
        out.append(DosePoint(0.0, "primary", False, tuple(sorted(topk_seeds)),
                             _means(index, "primary", BASELINE, k, topk_seeds), []))
        for variant, beta in betas:
            seeds = _seeds(index, variant, TREATMENT, k) & topk_seeds
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
        return "0 (TopK)" if not pt.tests else f"**{pt.beta:g}** (chosen)" if pt.chosen else f"{pt.beta:g}"

    cols = [("selection_changed_share (g)", "share of the k selections the gradient changes", ".1%"),
            ("delta_ce_all (plain)", "ΔCE, no labels (nats)", ".4f"), ("delta_ce_all (g)", "ΔCE, labels (nats)", ".4f"),
            ("kl_all (plain)", "KL, no labels", ".4f"), ("kl_all (g)", "KL, labels", ".4f"),
            ("explained_variance (plain)", "explained variance", ".4f"),
            ("ce_loss_score_all (plain)", "CE-loss score, no labels", ".4f"),
            ("ce_loss_score_all (g)", "CE-loss score, labels", ".4f"), ("l0 (plain)", "L0", ".1f")]
    lines = ["Dose-response (PREREG v6 §3; reported, never decisive): each beta's g-SAEs on the dose seeds "
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


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:+.1f}%"


def record(points: list[DosePoint]) -> list[dict[str, Any]]:
    """``points`` as ledger.json stores them."""
    return [{**pt._asdict(), "tests": [r._asdict() for r in pt.tests]} for pt in points]
