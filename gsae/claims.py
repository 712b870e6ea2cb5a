"""Pre-registered verdicts: from ``results/<profile>/metrics.jsonl`` and ``prereg.yaml`` to the README's claims
table and SENSITIVITY.md.

This module implements PREREG.md §2 and §6 and nothing else; no number in it is tuned to a result.

Per claim, variant and k: paired differences over seeds d_s = m(g-SAE, s) - m(TopK, s), their mean, a
two-sided t-interval (df = n - 1) and a one-sided p in the claimed direction (``paired_stats``). Holm
corrects the one-sided p over the k grid of one claim x variant (``holm``). At each k a directional claim is

* supported: Holm p < alpha and the mean difference is in the claimed direction by >= the minimum effect
  (``min_rel_effect`` x |TopK mean at that k|, or ``min_abs_effect``);
* contradicted: the mean difference is zero or in the wrong direction;
* significantly worse: the two-sided CI lies entirely in the wrong direction.

An equivalence claim (C4) at each k is equivalent if CI_lo > -margin, "below margin" if the mean difference
< -margin, and worse if CI_hi < -margin. Over a grid of n values of k (thresholds ceil(3n/4), ceil(n/2)):
not replicated if contradicted/below-margin at >= ceil(n/2) k or worse at any k; else replicated if
supported/equivalent at >= ceil(3n/4) k; else inconclusive. "Not replicated" is checked first: for the
directional rule the two cannot both hold; for the equivalence rule (3 equivalent + 1 worse at n = 4) the
pre-registration says "or worse at any k" for not replicated, the conservative reading.

Interpretation choices (PREREG leaves them implicit):

* A k with fewer than 2 paired seeds has no test (p, CI = nan): it is never supported, equivalent or
  significantly worse; with exactly one pair its point estimate still counts for "contradicted" / "below
  margin", because those rules are stated on the mean difference alone.
* Holm counts every k of the grid in the family, including a k without a test (conservative).
* A claim x variant with no paired value at any k is "not tested"; "not measured" when every row of metrics.jsonl
  lists its metric under ``not_measured`` (the stage could not measure it, e.g. POS probing on a corpus without
  POS tags, such as OpenWebText).
* Robustness: "robust" if every applicable variant gives the primary verdict; "fragile" if a tested variant
  gives another one; "incomplete" if none disagrees but some variant has not been run (not tested).
  The README says plain "replicated" only for a robust replication.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml
from scipy import stats as sps

from . import arms
from .config import ExperimentConfig
from .evals import ALL_ENCODE_MODES

ROOT = Path(__file__).resolve().parent.parent
VERDICTS = ("replicated", "not replicated", "inconclusive", "not tested", "not measured")
UNTESTED = ("not tested", "not measured")
"""Verdicts without a test: no paired values, or (not measured) a metric every row lists as not measurable."""
BASELINE, TREATMENT = ExperimentConfig.__dataclass_fields__["arms"].default[:2]
"""The arms every claim compares (treatment - baseline): the profile default's first two."""
MINUS = "\u2212"


class PreregError(ValueError):
    """prereg.yaml is malformed or inconsistent with this module; the message says what to fix."""


class ResultsError(ValueError):
    """metrics.jsonl is malformed (bad line, duplicate row); the message says what to fix."""


# ------------------------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class VariantSource:
    """Where one analysis takes its g-SAE and TopK numbers from (rows are matched on k and seed)."""

    g_variant: str
    """``variant`` field of the g-SAE rows."""
    topk_variant: str
    """``variant`` field of the TopK rows (TopK rows of either encode_mode: with beta = 0 they are identical)."""
    g_encode: str | None = None
    """``encode_mode`` of the g-SAE rows; None: the claim's own (g-encode when the claim states none, §4 #19)."""
    metric: str | None = None
    """Metric key, ``{alpha}`` filled with the claim's alpha; None: the claim's own metric."""

    @property
    def trained(self) -> bool:
        """A trained variant has its own SAEs (its k grid is the k it was trained at); the others re-evaluate
        the primary SAEs on the primary k grid."""
        return self.g_variant != "primary"


VARIANT_SOURCES: dict[str, VariantSource] = {
    #                                 g-SAE rows          TopK rows    g encode  metric
    "primary":          VariantSource("primary",          "primary"),
    "plain_encode":     VariantSource("primary",          "primary",   "plain"),
    "value_mode_score": VariantSource("value_mode_score", "primary"),
    "grad_norm_token":  VariantSource("grad_norm_token",  "primary"),
    "auxk_off":         VariantSource("auxk_off",         "auxk_off"),
    "steer_alpha_0.25": VariantSource("primary",          "primary",   None,     "steer_kl@0.25"),
    "steer_alpha_1.0":  VariantSource("primary",          "primary",   None,     "steer_kl@1.0"),
    "steer_logprob":    VariantSource("primary",          "primary",   None,     "steer_logprob@{alpha}"),
    "probe_genre":      VariantSource("primary",          "primary",   None,     "probe_auc_genre"),
}


# ------------------------------------------------------------------------------------------------ loading
def _ceil_frac(n: int, num: int, den: int) -> int:
    """ceil(num/den * n) in integers (no float rounding surprises)."""
    return -(-num * n // den)


def load_prereg(path: str | Path) -> dict[str, Any]:
    """Read prereg.yaml and check it is something this module can apply exactly."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the pre-registration's machine-readable twin is required")
    with open(path) as f:
        pre = yaml.safe_load(f)
    if not isinstance(pre, dict) or not isinstance(pre.get("claims"), dict):
        raise PreregError(f"{path}: expected a mapping with a 'claims' mapping")
    try:
        k_grid = [int(k) for k in pre["estimand"]["k_grid"]]
        float(pre["stats"]["alpha"]), float(pre["stats"]["ci"])
    except (KeyError, TypeError, ValueError) as e:
        raise PreregError(f"{path}: estimand.k_grid, stats.alpha and stats.ci are required ({e})") from e
    n = len(k_grid)
    for cid, c in pre["claims"].items():
        where = f"{path}: claim {cid}"
        if "metric" not in c:
            raise PreregError(f"{where} has no metric")
        if c.get("rule") == "directional":
            if c.get("better") not in ("lower", "higher"):
                raise PreregError(f"{where}: better must be 'lower' or 'higher', got {c.get('better')!r}")
            if ("min_rel_effect" in c) == ("min_abs_effect" in c):
                raise PreregError(f"{where}: give exactly one of min_rel_effect and min_abs_effect")
        elif c.get("rule") == "equivalence":
            if "margin" not in c:
                raise PreregError(f"{where}: an equivalence claim needs a margin")
        else:
            raise PreregError(f"{where}: rule must be 'directional' or 'equivalence', got {c.get('rule')!r}")
        # The yaml spells the thresholds out for the registered grid; they must be PREREG's formulas.
        want = (_ceil_frac(n, 3, 4), _ceil_frac(n, 1, 2))
        got = (c.get("replicated_min_k", want[0]), c.get("not_replicated_min_k", want[1]))
        if tuple(got) != want:
            raise PreregError(f"{where}: replicated_min_k / not_replicated_min_k = {got}, but PREREG §2 gives "
                              f"ceil(3n/4), ceil(n/2) = {want} for the {n}-value k grid; fix prereg.yaml")
    for v in pre.get("variants", []) or []:
        if v.get("name") not in VARIANT_SOURCES or v["name"] == "primary":
            raise PreregError(f"{path}: variant {v.get('name')!r} has no row mapping in gsae.claims.VARIANT_SOURCES;"
                              f" add one there (known: {sorted(set(VARIANT_SOURCES) - {'primary'})})")
        unknown = set(v.get("claims", [])) - set(pre["claims"])
        if unknown:
            raise PreregError(f"{path}: variant {v['name']} names unknown claims {sorted(unknown)}")
    return pre


def load_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read metrics.jsonl (one JSON object per line; blank lines skipped), validating every row."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the pipeline first (./run_all.sh --profile <name>)")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ResultsError(f"{path}:{lineno} is not valid JSON ({e}); fix or delete that line") from e
            _validate_row(row, f"{path}:{lineno}")
            rows.append(row)
    _index(rows)  # raises on duplicates
    return rows


def _validate_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise ResultsError(f"{where}: expected a JSON object")
    missing = {"variant", "arm", "k", "seed", "encode_mode", "metrics"} - set(row)
    if missing:
        raise ResultsError(f"{where}: missing field(s) {sorted(missing)}")
    if row["arm"] not in arms.names():
        raise ResultsError(f"{where}: arm must be a registered arm {sorted(arms.names())}, got {row['arm']!r}")
    if row["encode_mode"] not in ALL_ENCODE_MODES:
        raise ResultsError(f"{where}: encode_mode must be one of {ALL_ENCODE_MODES}, got {row['encode_mode']!r}")
    if not isinstance(row["metrics"], dict):
        raise ResultsError(f"{where}: metrics must be an object")


Key = tuple[str, str, str, int]  # (variant, arm, encode_mode, k)


def _index(rows: list[dict[str, Any]]) -> dict[Key, dict[int, dict[str, Any]]]:
    """rows -> {(variant, arm, encode_mode, k): {seed: metrics}}; a duplicate row is an error, not a silent pick."""
    out: dict[Key, dict[int, dict[str, Any]]] = {}
    for row in rows:
        key = (row["variant"], row["arm"], row["encode_mode"], int(row["k"]))
        seeds = out.setdefault(key, {})
        seed = int(row["seed"])
        if seed in seeds:
            raise ResultsError(f"two rows for variant={key[0]} arm={key[1]} encode_mode={key[2]} k={key[3]} "
                               f"seed={seed} in metrics.jsonl; delete the stale one")
        seeds[seed] = row["metrics"]
    return out


def _values(index: dict, variant: str, arm: str, encode: str, k: int, metric: str) -> dict[int, float]:
    """{seed: finite metric value}; missing or non-finite values are left out (their pair is then dropped)."""
    if not arms.get(arm).has_gradient_encoder:  # both encoders are the same code: take either row (plain first)
        per_seed = {**index.get((variant, arm, "g", k), {}), **index.get((variant, arm, "plain", k), {})}
    else:
        per_seed = index.get((variant, arm, encode, k), {})
    out = {}
    for seed, m in per_seed.items():
        v = m.get(metric)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[seed] = float(v)
    return out


# ------------------------------------------------------------------------------------------------ statistics
class PairedStats(NamedTuple):
    """Paired comparison over seeds of one metric at one k; differences are g-SAE minus TopK."""

    n: int
    """Seeds present in both arms."""
    mean_diff: float
    ci_lo: float
    """Two-sided t-interval (df = n - 1); nan when n < 2."""
    ci_hi: float
    p_one_sided: float
    """One-sided p in the claimed direction (H1: mean_diff < 0 for "lower", > 0 for "higher"); nan when n < 2."""
    topk_mean: float
    """Mean over the paired seeds (the base of a relative minimum effect)."""
    g_mean: float


def paired_stats(g_values: dict[int, float], t_values: dict[int, float], better: str,
                 ci: float = 0.95) -> PairedStats:
    """Paired t statistics over the seeds present in both ``g_values`` and ``t_values``."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    seeds = sorted(set(g_values) & set(t_values))
    nan = float("nan")
    if not seeds:
        return PairedStats(0, nan, nan, nan, nan, nan, nan)
    g = np.array([g_values[s] for s in seeds], dtype=np.float64)
    t = np.array([t_values[s] for s in seeds], dtype=np.float64)
    d = g - t
    n, mean = len(d), float(d.mean())
    if n < 2:
        return PairedStats(n, mean, nan, nan, nan, float(t.mean()), float(g.mean()))
    se = float(d.std(ddof=1)) / math.sqrt(n)
    half = float(sps.t.ppf(0.5 + ci / 2, n - 1)) * se
    gain = -mean if better == "lower" else mean  # > 0: g-SAE better
    if se == 0.0:  # identical differences: the t statistic is +-inf (or 0/0 when all are zero)
        p = 0.0 if gain > 0 else 1.0
    else:
        tstat = mean / se
        p = float(sps.t.cdf(tstat, n - 1) if better == "lower" else sps.t.sf(tstat, n - 1))
    return PairedStats(n, mean, mean - half, mean + half, p, float(t.mean()), float(g.mean()))


def holm(pvalues: list[float]) -> list[float]:
    """Holm step-down adjusted p-values. A nan (no test) stays nan but still counts in the family size."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    order = np.argsort(np.where(np.isnan(p), np.inf, p), kind="stable")
    adjusted = [float("nan")] * m
    running = 0.0
    for rank, i in enumerate(order):
        if math.isnan(p[i]):
            continue
        running = max(running, min(1.0, (m - rank) * float(p[i])))  # monotone: never below a smaller p's value
        adjusted[i] = running
    return adjusted


# ------------------------------------------------------------------------------------------------ verdicts
class KResult(NamedTuple):
    """One k of one claim x variant."""

    k: int
    stats: PairedStats
    p_holm: float
    """Holm-adjusted one-sided p (nan for the equivalence rule, which uses the CI)."""
    min_effect: float
    """Directional: the minimum improvement at this k in metric units; equivalence: the margin."""
    supported: bool
    """Directional: supported; equivalence: equivalent (CI_lo > -margin)."""
    contradicted: bool
    """Directional: mean difference zero or wrong way; equivalence: mean difference < -margin."""
    worse: bool
    """Directional: CI entirely in the wrong direction; equivalence: CI_hi < -margin."""


class ClaimVerdict(NamedTuple):
    claim: str
    variant: str
    title: str
    metric: str
    """The metric key read from metrics.jsonl."""
    rule: str
    better: str
    """"lower" / "higher" (directional) or "equivalence"."""
    relative: bool
    """True when the minimum effect is relative to TopK's mean."""
    verdict: str
    per_k: tuple[KResult, ...]
    n_supported: int
    n_contradicted: int
    n_worse: int
    need_replicated: int
    """ceil(3n/4)."""
    need_not_replicated: int
    """ceil(n/2)."""


def _claim_metric(claim: dict[str, Any], template: str | None = None) -> str:
    alpha = float(claim["alpha"]) if "alpha" in claim else None
    if template is not None:
        return template.format(alpha=alpha)
    return claim["metric"] + (f"@{alpha}" if alpha is not None else "")


def not_measured(rows: list[dict[str, Any]]) -> frozenset[str]:
    """Metrics that every row lists under ``not_measured`` (a stage recorded that it could not measure them)."""
    sets = [set(r.get("not_measured", ())) for r in rows]
    return frozenset(set.intersection(*sets)) if sets else frozenset()


def evaluate_claim(prereg: dict[str, Any], cid: str, variant: str, index: dict, k_grid: list[int],
                   unmeasured: frozenset[str] = frozenset()) -> ClaimVerdict:
    """Apply PREREG §2 to one claim under one variant over ``k_grid`` (``unmeasured``: ``not_measured(rows)``)."""
    claim = prereg["claims"][cid]
    src = VARIANT_SOURCES[variant]
    metric = _claim_metric(claim, src.metric)
    g_encode = src.g_encode or claim.get("encode_mode", "g")
    alpha, ci = float(prereg["stats"]["alpha"]), float(prereg["stats"]["ci"])
    equivalence = claim["rule"] == "equivalence"
    better = "higher" if equivalence else claim["better"]

    all_stats = [paired_stats(_values(index, src.g_variant, TREATMENT, g_encode, k, metric),
                              _values(index, src.topk_variant, BASELINE, g_encode, k, metric), better, ci)
                 for k in k_grid]
    p_holm = [float("nan")] * len(k_grid) if equivalence else holm([s.p_one_sided for s in all_stats])
    per_k = []
    for k, s, ph in zip(k_grid, all_stats, p_holm, strict=True):
        tested = s.n >= 2
        if equivalence:
            margin = float(claim["margin"])
            per_k.append(KResult(k, s, ph, margin, supported=tested and s.ci_lo > -margin,
                                 contradicted=s.n >= 1 and s.mean_diff < -margin,
                                 worse=tested and s.ci_hi < -margin))
            continue
        min_effect = (float(claim["min_rel_effect"]) * abs(s.topk_mean) if "min_rel_effect" in claim
                      else float(claim["min_abs_effect"]))
        gain = -s.mean_diff if better == "lower" else s.mean_diff
        per_k.append(KResult(k, s, ph, min_effect,
                             supported=tested and ph < alpha and gain > 0 and gain >= min_effect,
                             contradicted=s.n >= 1 and gain <= 0,
                             worse=tested and (s.ci_lo > 0 if better == "lower" else s.ci_hi < 0)))

    n = len(k_grid)
    need_rep, need_not = _ceil_frac(n, 3, 4), _ceil_frac(n, 1, 2)
    n_sup = sum(r.supported for r in per_k)
    n_con = sum(r.contradicted for r in per_k)
    n_worse = sum(r.worse for r in per_k)
    if n == 0 or all(r.stats.n == 0 for r in per_k):
        verdict = "not measured" if metric in unmeasured else "not tested"
    elif n_worse > 0 or n_con >= need_not:
        verdict = "not replicated"
    elif n_sup >= need_rep:
        verdict = "replicated"
    else:
        verdict = "inconclusive"
    return ClaimVerdict(cid, variant, claim.get("title", ""), metric, claim["rule"],
                        "equivalence" if equivalence else better, "min_rel_effect" in claim, verdict,
                        tuple(per_k), n_sup, n_con, n_worse, need_rep, need_not)


def _variant_k_grid(variant: str, index: dict, primary_grid: list[int]) -> list[int]:
    src = VARIANT_SOURCES[variant]
    if not src.trained:
        return list(primary_grid)
    return sorted({key[3] for key in index if key[0] == src.g_variant})


def verdicts(prereg: dict[str, Any], rows: list[dict[str, Any]], k_grid: list[int] | None = None) -> list[ClaimVerdict]:
    """The primary analysis: one verdict per claim, over ``k_grid`` (default: prereg's estimand.k_grid)."""
    index = _index(rows)
    grid = [int(k) for k in (k_grid if k_grid is not None else prereg["estimand"]["k_grid"])]
    return [evaluate_claim(prereg, cid, "primary", index, grid, not_measured(rows)) for cid in prereg["claims"]]


class Robustness(NamedTuple):
    claim: str
    primary: ClaimVerdict
    variants: tuple[ClaimVerdict, ...]
    """The applicable variants, in prereg order."""
    label: str
    """"robust", "fragile", "incomplete" (no disagreement, some variant not tested) or "not tested"."""
    disagreeing: tuple[str, ...]
    untested: tuple[str, ...]
    same_as_primary: tuple[str, ...] = ()
    """Trained variants whose SAEs turned out identical to the primary's (``same_as_primary_variants``): they
    neither agree nor disagree, and are left out of the counts."""


def same_as_primary_variants(rows: list[dict[str, Any]]) -> set[str]:
    """Trained variants whose every row equals the primary row of the same (arm, encode_mode, k, seed) in every
    metric: the variant's setting had no effect on training (e.g. AuxK off when no latent ever went dead, so
    the auxiliary loss was zero throughout). Such a variant is the primary analysis again, not a check of it."""
    index = _index(rows)
    out = set()
    for name, src in VARIANT_SOURCES.items():
        if not src.trained:
            continue
        keys = [key for key in index if key[0] in {src.g_variant, src.topk_variant} - {"primary"}]
        if keys and all(index.get(("primary", *key[1:])) == index[key] for key in keys):
            out.add(name)
    return out


def sensitivity(prereg: dict[str, Any], rows: list[dict[str, Any]], k_grid: list[int] | None = None,
                primary: list[ClaimVerdict] | None = None) -> dict[str, Robustness]:
    """Each claim's verdict under every applicable variant (PREREG §6), labelled against the primary verdict."""
    index = _index(rows)
    grid = [int(k) for k in (k_grid if k_grid is not None else prereg["estimand"]["k_grid"])]
    primary = primary if primary is not None else verdicts(prereg, rows, grid)
    same = same_as_primary_variants(rows)
    out = {}
    for pv in primary:
        vs = tuple(evaluate_claim(prereg, pv.claim, v["name"], index, _variant_k_grid(v["name"], index, grid),
                                  not_measured(rows))
                   for v in prereg.get("variants", []) or [] if pv.claim in v.get("claims", []))
        vacuous = tuple(v.variant for v in vs if v.variant in same)
        untested = tuple(v.variant for v in vs if v.verdict in UNTESTED and v.variant not in same)
        disagreeing = tuple(v.variant for v in vs if v.verdict not in (*UNTESTED, pv.verdict)
                            and v.variant not in same)
        if pv.verdict in UNTESTED:
            label = pv.verdict
        elif disagreeing:
            label = "fragile"
        elif untested:
            label = "incomplete"
        else:
            label = "robust"
        out[pv.claim] = Robustness(pv.claim, pv, vs, label, disagreeing, untested, vacuous)
    return out


def mean_t_interval(values: list[float], ci: float = 0.95) -> tuple[float, float]:
    """Mean and t-interval half-width over seeds (nan half-width below two values)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return math.nan, math.nan
    if a.size < 2:
        return float(a.mean()), math.nan
    return float(a.mean()), float(sps.t.ppf(0.5 + ci / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))


def main(argv: list[str] | None = None) -> int:
    """``python -m gsae.claims``: the verdicts written out (``gsae.report`` renders them)."""
    from .report import main as report_main

    return report_main(argv)


if __name__ == "__main__":
    sys.exit(main())
