"""The claims ledger (PREREG.md, versions 2-6): ``prereg.yaml`` + ``results/<profile>/metrics.jsonl``
-> one three-way verdict per claim (``analysis.decision``: replicated / not replicated / underpowered), and the
length check (``length_check``: does the paired gain move when the training length doubles?).

A claim names its tests: a metric, the encoder of the treatment arm's rows, the direction and the minimum
effect, evaluated at the pre-registered primary k (the verdict) and at every other k of the grid (reported,
never decisive; a claim's ``curve_tests``, when given, replace its tests on the curve, at every k). The
intervals of a claim's tests at the primary k share its ``alpha`` (Bonferroni over ``family`` = the number of
those tests). A claim with several co-primary tests is

* replicated      if every test is replicated,
* not replicated  if every test is not replicated,
* mixed           if some are replicated and some not replicated (both said, neither claimed),
* underpowered    otherwise.

Two rules besides the relative one of ``gsae.decision``:

* ``equivalence`` (C4): the paired difference treatment - baseline in the metric's own units, with margin m:
  replicated ("comparable") if the interval's lower end > -m, not replicated if its upper end < -m, else
  underpowered;
* ``floor`` (C2): "not testable (floor)" when both arms' means are at or below ``floor`` at that k, before any
  other rule is applied;
* ``min_difference`` (C2, v6): "not testable at this scale" when the arms' means differ by less than this, in the
  metric's units (a dead fraction: 0.01 is 1 % of the dictionary), after the floor.

The dose-response (v6, ``evaluate_dose``): the same tests of the named claims for the g-SAEs of every beta
(groups ``beta_<b>``, and the primary group at the chosen beta), each paired with TopK's primary SAEs of the same
seeds; reported with the same rule and never decisive.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml
from scipy import stats as sps

from . import decision
from .rows import BASELINE, TREATMENT, index_rows, seed_values

OUTCOMES = ("replicated", "not replicated", "mixed", "underpowered", "not testable (floor)",
            "not testable at this scale", "not tested")


LENGTH_OUTCOMES = ("length-stable", "length-dependent", "undetermined", "not tested")


class LedgerError(ValueError):
    """The pre-registration is not something this module can apply; the message says what to fix."""


class TestResult(NamedTuple):
    test: str
    """"<metric> (<encoder>)"."""
    k: int
    variant: str
    verdict: str
    estimate: float
    """Relative gain (fraction of the baseline mean; positive = treatment better), or the absolute difference
    treatment - baseline for an equivalence test."""
    lower: float
    upper: float
    half_width_pct: float
    """Half-width of the plain 95 % interval in % of the baseline mean (the design target), nan for equivalence."""
    n: int
    baseline_mean: float
    treatment_mean: float
    sd: float = math.nan
    """Sample SD of the per-seed gains (fraction of the baseline mean; metric units for equivalence): what the
    minimum detectable effect is computed from."""


class ClaimResult(NamedTuple):
    claim: str
    title: str
    verdict: str
    primary: list[TestResult]
    """The tests at the primary k (these decide)."""
    curve: list[TestResult]
    """The same tests at every other k (reported, not decisive)."""
    robustness: dict[str, str]
    """Variant name -> the claim's verdict recomputed on that variant's SAEs (e.g. a thread-count rerun)."""
    robustness_same_seeds: dict[str, str] = {}
    """Variant name -> the primary SAEs' verdict on that variant's seeds only: the like-for-like reference (a
    variant with fewer seeds is more often "underpowered" for that reason alone)."""
    secondary: list[TestResult] = []
    """The claim's secondary tests at the primary k (e.g. C1 with the gradient encoders), each with its own 95 %
    interval and the same rule: reported, never part of the verdict."""


def load_prereg(path: str | Path) -> dict[str, Any]:
    pre = yaml.safe_load(Path(path).read_text())
    if not isinstance(pre, dict) or pre.get("version") not in (2, 3, 4, 5, 6):
        raise LedgerError(f"{path}: expected a pre-registration of version 2 to 6 (version 1 had another rule, "
                          f"docs/prereg/v1.md)")
    lc = pre.get("length_check")
    if lc is not None and (not {"variant", "margin", "claim"} <= set(lc) or lc["claim"] not in pre.get("claims", {})):
        raise LedgerError(f"{path}: length_check needs variant, margin and a registered claim, got {lc}")
    for key in ("primary_k", "k_grid", "alpha", "claims"):
        if key not in pre.get("design", {}) and key not in pre:
            raise LedgerError(f"{path}: missing '{key}'")
    for cid, c in pre["claims"].items():
        for t in c.get("tests", []) + c.get("curve_tests", []):
            missing = {"metric", "encode_mode", "better", "rule"} - set(t)
            if missing:
                raise LedgerError(f"{path}: claim {cid} has a test without {sorted(missing)}")
            if t["rule"] not in ("relative", "equivalence"):
                raise LedgerError(f"{path}: claim {cid}: rule must be 'relative' or 'equivalence', got {t['rule']!r}")
    return pre


def _means(topk: dict[int, float], treated: dict[int, float]) -> tuple[float, float]:
    return (float(np.mean(list(topk.values()))) if topk else math.nan,
            float(np.mean(list(treated.values()))) if treated else math.nan)


def run_test(index: dict, test: dict[str, Any], k: int, variant: str, alpha: float, family: int,
             floor: float | None = None, baseline: str = BASELINE, treatment: str = TREATMENT,
             min_difference: float | None = None) -> TestResult:
    """One test at one k on one variant's rows (``rows.index_rows`` of metrics.jsonl)."""
    name = f"{test['metric']} ({test['encode_mode']})"
    t_vals = seed_values(index, variant, baseline, test["encode_mode"], k, test["metric"])
    g_vals = seed_values(index, variant, treatment, test["encode_mode"], k, test["metric"])
    paired = sorted(set(t_vals) & set(g_vals))
    t_vals, g_vals = {s: t_vals[s] for s in paired}, {s: g_vals[s] for s in paired}
    t_mean, g_mean = _means(t_vals, g_vals)
    if len(paired) < 2:
        return TestResult(name, k, variant, "not tested", math.nan, math.nan, math.nan, math.nan, len(paired),
                          t_mean, g_mean)
    if floor is not None and t_mean <= floor and g_mean <= floor:
        return TestResult(name, k, variant, "not testable (floor)", math.nan, math.nan, math.nan, math.nan,
                          len(paired), t_mean, g_mean)
    if min_difference is not None and abs(g_mean - t_mean) < min_difference:
        return TestResult(name, k, variant, "not testable at this scale", math.nan, math.nan, math.nan, math.nan,
                          len(paired), t_mean, g_mean)
    if test["rule"] == "equivalence":
        diff = np.array([g_vals[s] - t_vals[s] for s in paired])
        iv = decision.paired_interval(diff, alpha, family)
        margin = float(test["margin"])
        verdict = ("replicated" if iv.lower > -margin else "not replicated" if iv.upper < -margin
                   else "underpowered")
        return TestResult(name, k, variant, verdict, iv.estimate, iv.lower, iv.upper, math.nan, len(paired),
                          t_mean, g_mean, iv.sd)
    d = decision.decide(t_vals, g_vals, test["better"], float(test["min_rel_effect"]), alpha, family)
    rel = decision.relative_gains(t_vals, g_vals, test["better"])
    half = 100.0 * decision.paired_interval(rel.gains, 0.05, 1).half_width
    return TestResult(name, k, variant, d.verdict, d.interval.estimate, d.interval.lower, d.interval.upper, half,
                      len(paired), t_mean, g_mean, d.interval.sd)


def combine(verdicts: list[str]) -> str:
    """A claim's verdict from its co-primary tests' verdicts (module docstring)."""
    if not verdicts or all(v == "not tested" for v in verdicts):
        return "not tested"
    for untestable in ("not testable (floor)", "not testable at this scale"):
        if all(v == untestable for v in verdicts):
            return untestable
    if all(v == "replicated" for v in verdicts):
        return "replicated"
    if all(v == "not replicated" for v in verdicts):
        return "not replicated"
    if "replicated" in verdicts and "not replicated" in verdicts:
        return "mixed"
    return "underpowered"


def evaluate(prereg: dict[str, Any], rows: list[dict[str, Any]]) -> list[ClaimResult]:
    """Every claim's verdict at the primary k, its curve over the k grid and its robustness variants."""
    index = index_rows(rows)
    primary_k, grid = list(prereg["primary_k"]), list(prereg["k_grid"])
    alpha = float(prereg["alpha"])
    out = []
    for cid, claim in prereg["claims"].items():
        tests = claim["tests"]
        family = len(tests) * len(primary_k)
        floor, min_diff = claim.get("floor"), claim.get("min_difference")

        def at(k: int, variant: str, fam: int, which: list[dict[str, Any]] | None = None) -> list[TestResult]:
            return [run_test(index, t, k, variant, alpha, fam, floor, min_difference=min_diff)  # noqa: B023
                    for t in which or tests]  # noqa: B023

        primary = [r for k in primary_k for r in at(k, "primary", family)]
        if "curve_tests" in claim:  # the curve has its own tests, at every k (PREREG §4)
            curve = [r for k in grid for r in at(k, "primary", len(claim["curve_tests"]), claim["curve_tests"])]
        else:
            curve = [r for k in grid if k not in primary_k for r in at(k, "primary", len(tests))]
        robustness = {v: combine([r.verdict for k in primary_k for r in at(k, v, family)])
                      for v in claim.get("robustness", [])}
        same_seeds = {}
        for v in claim.get("robustness", []):
            seeds = {s for key, per in index.items() if key[0] == v for s in per}
            sub = {key: {s: m for s, m in per.items() if s in seeds} for key, per in index.items()
                   if key[0] == "primary"}
            same_seeds[v] = combine([run_test(sub, t, k, "primary", alpha, family, floor,
                                              min_difference=min_diff).verdict for k in primary_k for t in tests])
        secondary = [run_test(index, secondary_test(claim, s), k, "primary", alpha, 1, floor, min_difference=min_diff)
                     for s in claim.get("secondary", []) for k in primary_k]
        out.append(ClaimResult(cid, claim["title"], combine([r.verdict for r in primary]), primary, curve,
                               robustness, same_seeds, secondary))
    return out


class LengthCheck(NamedTuple):
    """PREREG §5 for one test at one k: the per-seed change of the paired relative gain, ``variant`` (the longer
    training) minus the primary SAEs, each gain relative to its own group's TopK mean."""
    test: str
    k: int
    variant: str
    outcome: str
    """"length-stable", "length-dependent", "undetermined" or "not tested" (``LENGTH_OUTCOMES``)."""
    estimate: float
    """Mean change of the relative gain (fraction of TopK's mean; positive = the g-SAE gains more when longer)."""
    lower: float
    upper: float
    n: int
    gain_primary: float
    gain_variant: float
    sd: float = math.nan


def length_outcome(lower: float, upper: float, margin: float) -> str:
    """Equivalence of the change with zero: inside (-margin, +margin) is stable, wholly outside it is dependent."""
    if -margin < lower and upper < margin:
        return "length-stable"
    if lower >= margin or upper <= -margin:
        return "length-dependent"
    return "undetermined"


class GroupGains(NamedTuple):
    """Per-seed relative gains of one test at one k in two groups, on the seeds both groups have."""
    test: str
    seeds: tuple[int, ...]
    primary: np.ndarray
    variant: np.ndarray


def group_gains(index: dict, test: dict[str, Any], k: int, variant: str,
                only_seeds: list[int] | None = None) -> GroupGains:
    """r_s of ``test`` at ``k`` in the primary group and in ``variant``, each relative to its own TopK mean, on the
    seeds both groups have (only ``only_seeds`` among them when given: the registered length check names seeds 0-7)."""
    name = f"{test['metric']} ({test['encode_mode']})"
    vals = {g: (seed_values(index, g, BASELINE, test["encode_mode"], k, test["metric"]),
                seed_values(index, g, TREATMENT, test["encode_mode"], k, test["metric"])) for g in ("primary", variant)}
    seeds = tuple(sorted(set.intersection(*(set(t) & set(g) for t, g in vals.values()))))
    if only_seeds is not None:
        seeds = tuple(s for s in seeds if s in set(only_seeds))
    if len(seeds) < 2:
        return GroupGains(name, seeds, np.array([]), np.array([]))
    gains = [decision.relative_gains({s: t[s] for s in seeds}, {s: v[s] for s in seeds}, test["better"]).gains
             for t, v in vals.values()]
    return GroupGains(name, seeds, *gains)


def length_check(index: dict, test: dict[str, Any], k: int, variant: str, margin: float, alpha: float,
                 family: int, only_seeds: list[int] | None = None) -> LengthCheck:
    """The length check of one relative test at ``k`` (PREREG §5), on the seeds both groups have (of
    ``only_seeds``, when given)."""
    gg = group_gains(index, test, k, variant, only_seeds)
    if len(gg.seeds) < 2:
        return LengthCheck(gg.test, k, variant, "not tested", math.nan, math.nan, math.nan, len(gg.seeds), math.nan,
                           math.nan)
    iv = decision.paired_interval(gg.variant - gg.primary, alpha, family)
    return LengthCheck(gg.test, k, variant, length_outcome(iv.lower, iv.upper, margin), iv.estimate, iv.lower,
                       iv.upper, len(gg.seeds), float(gg.primary.mean()), float(gg.variant.mean()), iv.sd)


def _length_tests(prereg: dict[str, Any]) -> list[dict[str, Any]]:
    """The relative tests of the length check's claim (PREREG §5)."""
    return [t for t in prereg["claims"][prereg["length_check"]["claim"]]["tests"] if t["rule"] == "relative"]


def length_check_gains(prereg: dict[str, Any], rows: list[dict[str, Any]]) -> list[GroupGains]:
    """The per-seed gains behind the length check (its figure), one per relative test at each primary k."""
    index = index_rows(rows)
    lc = prereg["length_check"]
    return [group_gains(index, t, k, lc["variant"], lc.get("seeds")) for k in prereg["primary_k"]
            for t in _length_tests(prereg)]


def evaluate_length_check(prereg: dict[str, Any], rows: list[dict[str, Any]]) -> list[LengthCheck]:
    """Every relative test of the registered ``length_check`` claim at the primary k (empty without one)."""
    lc = prereg.get("length_check")
    if not lc:
        return []
    tests, index = _length_tests(prereg), index_rows(rows)
    family = len(tests) * len(prereg["primary_k"])
    return [length_check(index, t, k, lc["variant"], float(lc["margin"]), float(prereg["alpha"]), family,
                         lc.get("seeds"))
            for k in prereg["primary_k"] for t in tests]


def length_stable(checks: list[LengthCheck]) -> bool:
    """Every test of the length check is length-stable: the claim's verdict holds over one doubling of training."""
    return all(c.outcome == "length-stable" for c in checks)


def secondary_test(claim: dict[str, Any], secondary: dict[str, Any]) -> dict[str, Any]:
    """A secondary test names a metric and an encoder; its rule, direction and minimum effect are those of the
    claim's test of the same metric."""
    same = [t for t in claim["tests"] + claim.get("curve_tests", []) if t["metric"] == secondary["metric"]]
    if not same:
        raise LedgerError(f"secondary test {secondary} has no test of metric {secondary['metric']!r} in its claim "
                          "to take its rule from")
    return {**same[0], **secondary}


def claim_rates(true_gains: list[float], sds: list[float], corr: float, n: int, min_effects: list[float],
                alpha: float = 0.05, sims: int = 20000, seed: int = 0) -> dict[str, float]:
    """How often a claim with these co-primary relative tests reads each outcome (``combine``), simulated: per seed
    the tests' gains are jointly normal (means ``true_gains``, SDs ``sds``, one correlation ``corr`` between every
    pair), each test gets its Bonferroni interval over the claim's tests and the three-way rule, and the claim
    combines them. Unlike a single test's rates this includes "mixed": a g-SAE that helps one metric by more than
    its minimum and another by less can never read "replicated"."""
    k = len(true_gains)
    cov = np.full((k, k), corr) * np.outer(sds, sds)
    np.fill_diagonal(cov, np.square(sds))
    gains = np.random.default_rng(seed).multivariate_normal(true_gains, cov, size=(sims, n))  # [sims, n, k]
    mean, s = gains.mean(axis=1), gains.std(axis=1, ddof=1)
    half = float(sps.t.ppf(1.0 - alpha / (2 * k), n - 1)) * s / math.sqrt(n)
    lower, upper, need = mean - half, mean + half, np.asarray(min_effects)
    verdict = np.where((lower > 0) & (mean >= need), "replicated",
                       np.where(upper < need, "not replicated", "underpowered"))
    outcomes = [combine(list(v)) for v in verdict]
    return {o: outcomes.count(o) / sims for o in ("replicated", "not replicated", "mixed", "underpowered")}


def seed_gains(rows: list[dict[str, Any]], test: dict[str, Any], k: int, variant: str = "primary") -> dict[int, float]:
    """{seed: relative gain} of one relative test at ``k`` (``decision.relative_gains``), on the paired seeds."""
    index = index_rows(rows)
    t_vals = seed_values(index, variant, BASELINE, test["encode_mode"], k, test["metric"])
    g_vals = seed_values(index, variant, TREATMENT, test["encode_mode"], k, test["metric"])
    paired = sorted(set(t_vals) & set(g_vals))
    if len(paired) < 2:
        return {}
    gains = decision.relative_gains({s: t_vals[s] for s in paired}, {s: g_vals[s] for s in paired}, test["better"])
    return dict(zip(paired, (float(g) for g in gains.gains), strict=True))
