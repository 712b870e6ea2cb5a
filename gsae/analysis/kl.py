"""KL fine-tuning beside the g-SAE (PREREG v6 §7, profile ``kl``): how much of TopK's fidelity loss each arm closes,
and whether the g-SAE's gain and the fine-tune's gain add up.

Every comparison is paired by seed with TopK's primary SAEs and uses the claims' interval (``ledger.run_test``,
95 % Bonferroni over the listed tests), reported and never a verdict:

* the share of TopK's ``delta_ce_all`` (and ``kl_all``) closed by an arm, (TopK − arm) / mean(TopK), for ``gsae``,
  ``topk_kl`` and ``gsae_kl`` (plain-encode, no labels at inference);
* the interaction, per seed ((g-SAE+KL − TopK+KL) − (g-SAE − TopK)) / mean(TopK): 0 when the two gains add up,
  positive when stacking them gains less than the sum of their gains (they overlap), negative when it gains more.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from . import decision, ledger
from .rows import BASELINE, index_rows, seed_values

ARMS = ("gsae", "topk_kl", "gsae_kl")
"""The arms compared with TopK, in the order reported."""
METRICS = ("delta_ce_all", "kl_all")


class Interaction(NamedTuple):
    metric: str
    estimate: float
    """Mean over seeds of the interaction in % of TopK's mean (0: the gains add up)."""
    lower: float
    upper: float
    n: int


def evaluate_kl(prereg: dict[str, Any], rows: list[dict[str, Any]], k: int | None = None
                ) -> tuple[list[ledger.TestResult], list[Interaction]]:
    """Each arm's paired gain over TopK per metric, and the interaction per metric; empty without KL arms' rows."""
    index = index_rows(rows)
    k = k if k is not None else prereg["primary_k"][0]
    present = {arm for (v, arm, _, kk) in index if v == "primary" and kk == k}
    if not {"topk_kl", "gsae_kl"} & present:
        return [], []
    alpha, family = float(prereg["alpha"]), len(METRICS)
    tests = [{"metric": m, "encode_mode": "plain", "better": "lower", "rule": "relative", "min_rel_effect": 0.05}
             for m in METRICS]
    gains = [ledger.run_test(index, t, k, "primary", alpha, family, treatment=arm)._replace(
        test=f"{arm}: {t['metric']} (plain)") for arm in ARMS if arm in present for t in tests]
    inter = []
    for m in METRICS:
        vals = {a: seed_values(index, "primary", a, "plain", k, m) for a in (BASELINE, *ARMS)}
        seeds = sorted(set.intersection(*(set(v) for v in vals.values())))
        if len(seeds) < 2:
            inter.append(Interaction(m, math.nan, math.nan, math.nan, len(seeds)))
            continue
        base = float(np.mean([vals[BASELINE][s] for s in seeds]))
        d = np.array([((vals["gsae_kl"][s] - vals["topk_kl"][s]) - (vals["gsae"][s] - vals[BASELINE][s])) / base
                      for s in seeds])
        iv = decision.paired_interval(d, alpha, family)
        inter.append(Interaction(m, iv.estimate, iv.lower, iv.upper, len(seeds)))
    return gains, inter


def render_kl(gains: list[ledger.TestResult], inter: list[Interaction]) -> str:
    """The comparison as Markdown (empty without KL arms)."""
    if not gains:
        return ""

    def pct(x: float) -> str:
        return "—" if math.isnan(x) else f"{100 * x:+.1f}%"

    lines = ["KL fine-tuning beside the g-SAE (PREREG v6 §7; reported, never a verdict): each arm's share of TopK's "
             "loss closed, (TopK − arm) / TopK, plain-encode on every test context, paired by seed, 95% Bonferroni "
             "over the two metrics.\n", "| arm: metric | TopK | arm | share closed [interval] | n |",
             "|---|---|---|---|---|"]
    lines += [f"| {r.test} | {r.baseline_mean:.4f} | {r.treatment_mean:.4f} | {pct(r.estimate)} "
              f"[{pct(r.lower)}, {pct(r.upper)}] | {r.n} |" for r in gains]
    lines += ["", "Do the gains add up? Interaction ((g-SAE+KL − TopK+KL) − (g-SAE − TopK)) / TopK: 0 when they add "
              "up, > 0 when they overlap.\n"]
    lines += [f"- {i.metric}: {pct(i.estimate)} [{pct(i.lower)}, {pct(i.upper)}], n = {i.n}" for i in inter]
    return "\n".join(lines) + "\n"
