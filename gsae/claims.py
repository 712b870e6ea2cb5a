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
* A claim x variant with no paired value at any k is "not tested".
* Robustness: "robust" if every applicable variant gives the primary verdict; "fragile" if a tested variant
  gives another one; "incomplete" if none disagrees but some variant has not been run (not tested).
  The README says plain "replicated" only for a robust replication.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml
from scipy import stats as sps

from .config import ConfigError, load_profile
from .io import atomic_path, sha256_file

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- claims:start -->", "<!-- claims:end -->"
VERDICTS = ("replicated", "not replicated", "inconclusive", "not tested")
MINUS = "\u2212"


class PreregError(ValueError):
    """prereg.yaml is malformed or inconsistent with this module; the message says what to fix."""


class ResultsError(ValueError):
    """metrics.jsonl is malformed (bad line, duplicate row); the message says what to fix."""


class ReadmeMarkerError(ValueError):
    """The README lacks exactly one ``<!-- claims:start -->`` ... ``<!-- claims:end -->`` pair."""


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
    if row["arm"] not in ("topk", "gsae"):
        raise ResultsError(f"{where}: arm must be 'topk' or 'gsae', got {row['arm']!r}")
    if row["encode_mode"] not in ("g", "plain"):
        raise ResultsError(f"{where}: encode_mode must be 'g' or 'plain', got {row['encode_mode']!r}")
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
    if arm == "topk":  # beta = 0: both encoders are the same TopK, take whichever row exists (plain first)
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


def evaluate_claim(prereg: dict[str, Any], cid: str, variant: str, index: dict, k_grid: list[int]) -> ClaimVerdict:
    """Apply PREREG §2 to one claim under one variant over ``k_grid``."""
    claim = prereg["claims"][cid]
    src = VARIANT_SOURCES[variant]
    metric = _claim_metric(claim, src.metric)
    g_encode = src.g_encode or claim.get("encode_mode", "g")
    alpha, ci = float(prereg["stats"]["alpha"]), float(prereg["stats"]["ci"])
    equivalence = claim["rule"] == "equivalence"
    better = "higher" if equivalence else claim["better"]

    all_stats = [paired_stats(_values(index, src.g_variant, "gsae", g_encode, k, metric),
                              _values(index, src.topk_variant, "topk", g_encode, k, metric), better, ci)
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
        verdict = "not tested"
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
    return [evaluate_claim(prereg, cid, "primary", index, grid) for cid in prereg["claims"]]


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
        vs = tuple(evaluate_claim(prereg, pv.claim, v["name"], index, _variant_k_grid(v["name"], index, grid))
                   for v in prereg.get("variants", []) or [] if pv.claim in v.get("claims", []))
        vacuous = tuple(v.variant for v in vs if v.variant in same)
        untested = tuple(v.variant for v in vs if v.verdict == "not tested" and v.variant not in same)
        disagreeing = tuple(v.variant for v in vs if v.verdict not in ("not tested", pv.verdict)
                            and v.variant not in same)
        if pv.verdict == "not tested":
            label = "not tested"
        elif disagreeing:
            label = "fragile"
        elif untested:
            label = "incomplete"
        else:
            label = "robust"
        out[pv.claim] = Robustness(pv.claim, pv, vs, label, disagreeing, untested, vacuous)
    return out


# ------------------------------------------------------------------------------------------------ rendering
def _decimals(values: list[float]) -> int:
    """Decimals giving 3 significant digits to the largest |value| (kept in 1..6)."""
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0]
    if not finite:
        return 3
    return min(6, max(1, 2 - math.floor(math.log10(max(finite)))))


def _num(x: float, dec: int, sign: bool = True) -> str:
    if not math.isfinite(x):
        return "—"
    return (f"{x:+.{dec}f}" if sign else f"{x:.{dec}f}").replace("-", MINUS)


def k_status(v: ClaimVerdict, r: KResult) -> str:
    """One word for one k; a worse-than-TopK result is as loud as a success."""
    eq = v.rule == "equivalence"
    if r.stats.n == 0:
        return "no data"
    if r.worse:
        return "**worse (CI below −margin)**" if eq else "**significantly worse**"
    if r.supported:
        return "equivalent" if eq else "supported"
    if r.contradicted:
        return "below margin" if eq else "contradicted"
    if r.stats.n < 2:
        return f"no test (n={r.stats.n})"
    return "not shown" if eq else "not supported"


def summary_line(v: ClaimVerdict) -> str:
    n = len(v.per_k)
    if v.verdict == "not tested":
        return f"no paired `{v.metric}` values" + ("" if n else " (no rows for this variant)")
    if v.rule == "equivalence":
        return (f"equivalent at {v.n_supported}/{n} k (needs {v.need_replicated}); below margin at "
                f"{v.n_contradicted}/{n} (fails at {v.need_not_replicated}); worse at {v.n_worse}/{n}")
    return (f"supported at {v.n_supported}/{n} k (needs {v.need_replicated}); contradicted at "
            f"{v.n_contradicted}/{n} (fails at {v.need_not_replicated}); significantly worse at {v.n_worse}/{n}")


def _k_line(v: ClaimVerdict, r: KResult, dec: int) -> str:
    s = r.stats
    text = f"k={r.k}: Δ {_num(s.mean_diff, dec)} [{_num(s.ci_lo, dec)}, {_num(s.ci_hi, dec)}]"
    if v.relative and s.n and s.topk_mean != 0 and math.isfinite(s.topk_mean):
        text += f" ({100 * s.mean_diff / abs(s.topk_mean):+.0f}%)".replace("-", MINUS)
    return f"{text} {k_status(v, r)}"


def _effect_cell(v: ClaimVerdict) -> str:
    if v.verdict == "not tested":
        return f"not tested: no paired `{v.metric}` values"
    dec = _decimals([x for r in v.per_k for x in (r.stats.mean_diff, r.stats.ci_lo, r.stats.ci_hi)])
    seeds = sorted({r.stats.n for r in v.per_k})
    head = (f"Δ = g-SAE − TopK, {'lower' if v.better == 'lower' else 'higher'} is better"
            if v.rule != "equivalence" else f"Δ = g-SAE − TopK, equivalent if CI > −{v.per_k[0].min_effect:g}")
    head += f"; n = {'/'.join(map(str, seeds))} seeds"
    return "<br>".join([head, *(_k_line(v, r, dec) for r in v.per_k), f"**{summary_line(v)}**"])


def readme_verdict(rob: Robustness) -> str:
    """The verdict as the README states it: plain "replicated" only for a robust replication."""
    v = rob.primary.verdict
    if rob.label in ("robust", "not tested"):
        return v
    return f"{v} ({'fragile' if rob.label == 'fragile' else 'sensitivity incomplete'})"


def _robustness_cell(rob: Robustness) -> str:
    n = len(rob.variants)
    if rob.label == "not tested":
        return "—"
    if not n:
        return "robust (no variants registered)"
    parts = []
    n -= len(rob.same_as_primary)
    agree = n - len(rob.disagreeing) - len(rob.untested)
    if rob.label == "fragile":
        by = {v.variant: v.verdict for v in rob.variants}
        parts.append("**fragile**: " + "; ".join(f"{name} → {by[name]}" for name in rob.disagreeing))
    else:
        parts.append(rob.label)
    parts.append(f"{agree}/{n} variants agree")
    if rob.untested:
        parts.append("not run: " + ", ".join(rob.untested))
    if rob.same_as_primary:
        parts.append("not counted (SAEs identical to the primary's): " + ", ".join(rob.same_as_primary))
    return "; ".join(parts)


def render_claims_table(claim_verdicts: list[ClaimVerdict], sens: dict[str, Robustness],
                        figure_links: dict[str, str], source_note: str = "") -> str:
    """The README's claims table (Markdown)."""
    lines = ["| claim | verdict | robustness | effect ± 95% CI per k | figure |", "|---|---|---|---|---|"]
    for v in claim_verdicts:
        rob = sens.get(v.claim) or Robustness(v.claim, v, (), "robust", (), ())
        fig = f"[figure]({figure_links[v.claim]})" if v.claim in figure_links else "—"
        title = f"**{v.claim}** {v.title} (`{v.metric}`)".replace("|", "\\|")
        lines.append(f"| {title} | {readme_verdict(rob)} | {_robustness_cell(rob)} | {_effect_cell(v)} | {fig} |")
    if source_note:
        lines += ["", source_note]
    return "\n".join(lines) + "\n"


def render_sensitivity_md(claim_verdicts: list[ClaimVerdict], sens: dict[str, Robustness], prereg: dict[str, Any],
                          claims_table: str = "", header: str = "") -> str:
    """SENSITIVITY.md: verdict x variant grid, then every number behind every verdict."""
    names = [v["name"] for v in prereg.get("variants", []) or []]
    out = [header or "# Sensitivity analysis", ""]
    if claims_table:
        out += ["## Claims", "", claims_table.rstrip("\n"), ""]
    out += ["## Verdict per variant", "",
            "Each cell: verdict (supported or equivalent / k tested). n/a: the variant does not apply (PREREG §6).", "",
            "| claim | primary | " + " | ".join(names) + " | robustness |",
            "|---|---|" + "---|" * len(names) + "---|"]
    for v in claim_verdicts:
        rob = sens[v.claim]
        by = {x.variant: x for x in rob.variants}
        out.append(f"| {v.claim} | {_grid_cell(v)} | "
                   + " | ".join(_grid_cell(by.get(n)) + (" = primary SAEs" if n in rob.same_as_primary else "")
                                for n in names) + f" | {rob.label} |")
    same = sorted({n for rob in sens.values() for n in rob.same_as_primary})
    if same:
        why = " (auxk_off: no latent went dead, so the AuxK loss was zero throughout)" if "auxk_off" in same else ""
        out += ["", f"= primary SAEs: every row of {', '.join(same)} is identical to the primary row of the same arm, "
                    f"k and seed, so the variant's setting had no effect on training{why}. Such a variant repeats "
                    "the primary analysis; it is not counted for or against robustness."]
    out += ["", "| variant | what |", "|---|---|"]
    out += [f"| {v['name']} | {v.get('what', '')} |" for v in prereg.get("variants", []) or []]
    out += ["", "## Numbers per k", "",
            "Δ = g-SAE − TopK over paired seeds; CI two-sided 95% t (df = n − 1); p one-sided in the claimed "
            "direction, Holm over the k grid within each claim × variant (equivalence: decided by the CI).", ""]
    for v in claim_verdicts:
        rob = sens[v.claim]
        out += [f"### {v.claim} — {v.title}", "",
                "| variant | metric | k | n | TopK mean | g-SAE mean | Δ [95% CI] | p | p Holm | min effect | status |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in (v, *rob.variants):
            vals = [y for r in x.per_k for y in (r.stats.mean_diff, r.stats.ci_lo, r.stats.ci_hi,
                                                r.stats.topk_mean, r.stats.g_mean)]
            dec = _decimals(vals)
            for r in x.per_k:
                s = r.stats
                out.append(f"| {x.variant} | `{x.metric}` | {r.k} | {s.n} | {_num(s.topk_mean, dec, False)} | "
                           f"{_num(s.g_mean, dec, False)} | {_num(s.mean_diff, dec)} [{_num(s.ci_lo, dec)}, "
                           f"{_num(s.ci_hi, dec)}] | {_p(s.p_one_sided, x)} | {_p(r.p_holm, x)} | "
                           f"{_num(r.min_effect, dec, False)} | {k_status(x, r)} |")
            if not x.per_k:
                out.append(f"| {x.variant} | `{x.metric}` | — | 0 | | | | | | | no rows |")
            out.append(f"| {x.variant} | | | | | | | | | | **{x.verdict}**: {summary_line(x)} |")
        out.append("")
    return "\n".join(out)


def _grid_cell(x: ClaimVerdict | None) -> str:
    if x is None:
        return "n/a"
    return x.verdict if x.verdict == "not tested" else f"{x.verdict} ({x.n_supported}/{len(x.per_k)})"


def _p(p: float, v: ClaimVerdict) -> str:
    if v.rule == "equivalence" or not math.isfinite(p):
        return "—"
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


# ------------------------------------------------------------------------------------------------ README
def _split_markers(text: str, path: Path) -> tuple[str, str, str]:
    n_start, n_end = text.count(START), text.count(END)
    if n_start != 1 or n_end != 1 or text.index(END) < text.index(START):
        raise ReadmeMarkerError(
            f"{path} must contain exactly one '{START}' followed by one '{END}' (found {n_start} and {n_end}); "
            f"put the pair on their own lines where the claims table belongs")
    i = text.index(START) + len(START)
    j = text.index(END)
    return text[:i], text[i:j], text[j:]


def _block(table: str) -> str:
    return "\n" + table.strip("\n") + "\n"


def _read_readme(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; create it with a '{START}' / '{END}' pair where the claims "
                                f"table goes")
    return path.read_text()


def update_readme(readme_path: str | Path, table: str) -> None:
    """Replace the text between the claims markers with ``table`` (atomic write; everything else untouched)."""
    path = Path(readme_path)
    head, _, tail = _split_markers(_read_readme(path), path)
    with atomic_path(path) as tmp:
        tmp.write_text(head + _block(table) + tail)


def check_readme(readme_path: str | Path, table: str) -> bool:
    """True if the README's claims block is exactly what ``update_readme`` would write."""
    path = Path(readme_path)
    return _split_markers(_read_readme(path), path)[1] == _block(table)


# ------------------------------------------------------------------------------------------------ profiles
class ProfileClaims(NamedTuple):
    profile: str
    verdicts: list[ClaimVerdict]
    sensitivity: dict[str, Robustness]
    claims_table: str
    """The README table (figure links relative to the repository root)."""
    sensitivity_md: str
    sensitivity_path: Path
    """Where SENSITIVITY.md goes: the repository root for the registered profile, else results/<profile>/."""
    readme_path: Path | None
    """The README to update (registered profile only)."""


FIGURE_EXTS = (".png", ".svg", ".pdf")


FIGURE_FOR_CLAIM = {"C1": "fidelity_delta_ce_kl.png", "C2": "fvu_dead.png", "C3": "steering_kl.png",
                    "C4": "probing.png"}
"""The figure each claim links to (drawn by notebooks 03-05 into the profile's figures directory)."""


def find_figures(fig_dir: Path, claim_ids: list[str]) -> dict[str, Path]:
    """The claims' figures that exist in ``fig_dir`` (see FIGURE_FOR_CLAIM)."""
    return {c: fig_dir / FIGURE_FOR_CLAIM[c] for c in claim_ids
            if c in FIGURE_FOR_CLAIM and (fig_dir / FIGURE_FOR_CLAIM[c]).exists()}


GLANCE_METRICS = (("delta_ce", "ΔCE (nats)"), ("kl", "KL"), ("fvu", "FVU"), ("fvu_typical", "FVU typical"),
                  ("dead_fraction", "dead frac."), ("steer_kl@0.5", "steer KL@0.5"), ("probe_auc_pos", "POS AUC"))
"""Columns of the README's measurement table: (metrics.jsonl key, header)."""


def mean_t_interval(values: list[float], ci: float = 0.95) -> tuple[float, float]:
    """Mean and t-interval half-width over seeds (nan half-width below two values)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return math.nan, math.nan
    if a.size < 2:
        return float(a.mean()), math.nan
    return float(a.mean()), float(sps.t.ppf(0.5 + ci / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))


def render_glance_table(rows: list[dict[str, Any]], k_grid: list[int], variant: str = "primary") -> str:
    """Per k and arm (TopK, g-SAE g-encode, g-SAE plain-encode): mean ± 95% t-interval over seeds of the
    headline measurements, straight from metrics.jsonl (columns without data are left out)."""
    index = _index(rows)
    arms = (("TopK", "topk", "plain"), ("g-SAE, g-encode", "gsae", "g"), ("g-SAE, plain-encode", "gsae", "plain"))
    cols = [(key, head) for key, head in GLANCE_METRICS
            if any(_values(index, variant, a, e, k, key) for _, a, e in arms for k in k_grid)]
    lines = ["| k | SAE | n | " + " | ".join(h for _, h in cols) + " |", "|---" * (3 + len(cols)) + "|"]
    for k in k_grid:
        for label, arm, enc in arms:
            cells, n = [], 0
            for key, _ in cols:
                vals = list(_values(index, variant, arm, enc, k, key).values())
                n = max(n, len(vals))
                mean, half = mean_t_interval(vals)
                dec = 4 if key == "dead_fraction" else 3
                cells.append("—" if math.isnan(mean) else
                             f"{mean:.{dec}f}" + ("" if math.isnan(half) else f" ± {half:.{dec}f}"))
            lines.append(f"| {k} | {label} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def selection_note(selection: dict[str, Any] | None, edges: dict[str, Any] | None) -> str:
    """One Markdown sentence on how lr and beta were chosen and whether a choice sits on its grid's edge, from
    ``results/<profile>/selection.json`` and ``selection_edges.json`` (empty when there is no selection)."""
    if not selection:
        return ""

    def grid(trials: dict[str, float]) -> str:
        vals = sorted(float(v) for v in trials)
        return f"{vals[0]:g} … {vals[-1]:g}"

    parts = [f"Selection on the validation split (k = {selection['k']}, seed {selection['seed']}, "
             f"{selection['objective']}): lr {float(selection['lr']):g} (grid {grid(selection['lr_trials'])}), "
             f"β {float(selection['beta']):g} (grid {grid(selection['beta_trials'])})."]
    for name, c in sorted(((edges or {}).get("checks") or {}).items()):
        verdict = ("scores better, so the registered choice is a limit of its grid, not an optimum"
                   if c["would_move"] else "scores worse, so the registered choice is a local optimum")
        parts.append(f"Grid-edge check (not registered; DEVIATIONS.md): {name} {float(c['beyond']):.3g} "
                     f"(ΔCE {c['beyond_delta_ce']:.3f} vs {c['chosen_delta_ce']:.3f} at {float(c['chosen']):g}) "
                     f"{verdict}.")
    return " ".join(parts)


def verdict_for_profile(profile: str, root: str | Path | None = None) -> ProfileClaims:
    """Everything ``python -m gsae.claims --profile <profile>`` would write, without writing it."""
    root = Path(root) if root is not None else ROOT
    prereg = load_prereg(root / "prereg.yaml")
    metrics_path = root / "results" / profile / "metrics.jsonl"
    rows = load_metrics(metrics_path)
    registered = profile == prereg.get("profile")
    if registered:
        k_grid = [int(k) for k in prereg["estimand"]["k_grid"]]
    else:  # an unregistered profile (smoke, paper) is analysed on its own k grid
        k_grid = list(load_profile(root / "profiles" / f"{profile}.yaml").experiment.k_grid)
    primary = verdicts(prereg, rows, k_grid)
    sens = sensitivity(prereg, rows, k_grid, primary)

    out_dir = root if registered else root / "results" / profile
    fig_dir = root / "figures" if registered else root / "results" / profile / "figures"
    figures = find_figures(fig_dir, list(prereg["claims"]))

    def links(base: Path) -> dict[str, str]:
        return {c: Path(os.path.relpath(p, base)).as_posix() for c, p in figures.items()}

    note = (f"Computed by `python -m gsae.claims --profile {profile}` from `results/{profile}/metrics.jsonl` "
            f"(sha256 `{sha256_file(metrics_path)[:12]}`, {len(rows)} rows) with the rules of PREREG.md §2 "
            f"(prereg.yaml version {prereg.get('version')}); per-k numbers for every variant in SENSITIVITY.md.")
    res_dir = root / "results" / profile
    sel = selection_note(*(json.loads((res_dir / f).read_text()) if (res_dir / f).exists() else None
                           for f in ("selection.json", "selection_edges.json")))
    if sel:
        note += " " + sel
    if not registered:
        note += (f" Profile `{profile}` is not the registered profile `{prereg.get('profile')}`: these numbers "
                 f"test the pipeline, never the claims (PREREG §7).")
    glance = ("\nMeasurements behind the table (test split, mean ± 95% t-interval over seeds; FVU typical leaves "
              "out massive-activation tokens, DEVIATIONS.md):\n\n" + render_glance_table(rows, k_grid))
    table = render_claims_table(primary, sens, links(root), note) + glance
    header = (f"# Sensitivity analysis — profile `{profile}`\n\nGenerated by `python -m gsae.claims --profile "
              f"{profile}`; do not edit by hand. Rules: PREREG.md §2 and §6.")
    sens_md = render_sensitivity_md(primary, sens, prereg, render_claims_table(primary, sens, links(out_dir), note),
                                    header)
    return ProfileClaims(profile, primary, sens, table, sens_md, out_dir / "SENSITIVITY.md",
                         root / "README.md" if registered else None)


def _diff(old: str, new: str, name: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{name} (on disk)",
                                        f"{name} (generated)"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gsae.claims", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="default", help="results/<profile>/metrics.jsonl is read")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 (printing a diff) if README.md or SENSITIVITY.md is out of date")
    ap.add_argument("--root", default=None, help="repository root (default: this checkout)")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, ConfigError, PreregError, ResultsError, ReadmeMarkerError) as e:
        print(f"gsae.claims: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    pc = verdict_for_profile(args.profile, args.root)

    if args.check:
        stale = []
        if pc.readme_path is not None and not check_readme(pc.readme_path, pc.claims_table):
            current = _split_markers(_read_readme(pc.readme_path), pc.readme_path)[1]
            stale.append(_diff(current, _block(pc.claims_table), "README.md claims block"))
        on_disk = pc.sensitivity_path.read_text() if pc.sensitivity_path.exists() else ""
        if on_disk != pc.sensitivity_md:
            stale.append(_diff(on_disk, pc.sensitivity_md, str(pc.sensitivity_path.name)))
        if stale:
            print("".join(stale))
            print(f"out of date: run `python -m gsae.claims --profile {args.profile}`", file=sys.stderr)
            return 1
        print("claims table and SENSITIVITY.md are up to date")
        return 0

    if pc.readme_path is not None:  # fail on missing markers before writing anything
        _split_markers(_read_readme(pc.readme_path), pc.readme_path)
    with atomic_path(pc.sensitivity_path) as tmp:
        tmp.write_text(pc.sensitivity_md)
    if pc.readme_path is not None:
        update_readme(pc.readme_path, pc.claims_table)
    for v in pc.verdicts:
        print(f"{v.claim}: {readme_verdict(pc.sensitivity[v.claim])} — {summary_line(v)}")
    print(f"wrote {pc.sensitivity_path}" + (f" and {pc.readme_path}" if pc.readme_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
