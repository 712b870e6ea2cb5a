"""The study's decision rule: one three-way verdict per test (a claim at one k), its interval, its power.

Per test, paired over seeds s present in both arms, the **relative gain** of the g-SAE over TopK is

    r_s = (topk_s - gsae_s) / mean(topk)    when lower is better (e.g. delta_ce),
    r_s = (gsae_s - topk_s) / mean(topk)    when higher is better,

so r_s > 0 always means "the g-SAE is better" and 0.10 means "better by 10 % of TopK's metric". The mean over
seeds, ``estimate``, gets a two-sided paired t-interval (df = n - 1) at confidence 1 - alpha / family each
(Bonferroni over the ``family`` tests), and

* **replicated**      if lower > 0 and estimate >= min_effect  (the interval excludes no gain, the effect reaches
  the minimum);
* **not replicated**  if upper < min_effect                     (the interval excludes the minimum effect);
* **underpowered**    otherwise.

The three cannot overlap: the interval is centred on the estimate (lower <= estimate <= upper), so
"replicated" gives upper >= estimate >= min_effect, which is the negation of "not replicated"'s upper < min_effect;
"underpowered" is the complement of the other two by definition.

Design choices (and why):

* Difference over the baseline *mean*, not a mean of per-seed ratios: it is the quantity the minimum effect
  (m x |TopK mean|) and the pilot (paired SD "% of TopK's") are stated in, so they speak the same units; the
  "excludes no gain" half of the verdict is then exactly the paired t-test of
  the raw differences (a positive constant does not move zero); and a mean of ratios over-weights a seed with a
  small baseline and is biased for the ratio of means. The price: mean(topk) is treated as a known constant, so
  its own seed-to-seed error (CV_topk / sqrt(n), well under 1 % of m here) is ignored in the comparisons with
  ``min_effect``.
* Two-sided intervals: the rule reads both ends (lower for "replicated", upper for "not replicated"), so with
  family-wise simultaneous coverage >= 1 - alpha a wrong "replicated" (claiming a gain > 0 that is not there) and a
  wrong "not replicated" (excluding an effect >= min_effect that is there) together occur with probability
  <= alpha over the whole family. "Reaches the minimum" is a point-estimate requirement, as the study registers
  it (PREREG.md §4), not a confidence statement: a "replicated" with a true gain in (0, min_effect) is not an
  error this bounds.
* Bonferroni on the intervals, not Holm on p-values: the verdicts are read off intervals, and Holm's step-down
  has no simple matching simultaneous intervals (the compatible ones, Strassburger & Bretz 2008, bound a rejected
  test only by its null value unless every test is rejected, so they cannot say whether the minimum effect is
  excluded), while Bonferroni's 1 - alpha/family intervals hold simultaneously whatever the dependence between
  the tests.
* Planning functions take the true relative SD of r_s (``sd``) as known; ``seeds_needed`` can instead ask that the
  realised half-width meet the target with a given probability (``assurance``), since the sample SD varies.
* ``simulate`` draws r_s ~ Normal(true_effect, sd) with a TopK baseline of exactly 1 per seed, i.e. under the same
  known-denominator model as the rule; ``verdict_probabilities`` is the same model computed by one-dimensional
  integration (the mean and the sample SD of normal data are independent), so each checks the other.

Every effect, SD and half-width is a fraction of TopK's metric (0.05 = 5 %), except ``half_width_pct``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
from scipy import integrate, optimize
from scipy import stats as sps

from ..progress import bar as tqdm  # tqdm-compatible; draws on the terminal, never in a notebook

VERDICTS = ("replicated", "not replicated", "underpowered")


class DecisionInputError(ValueError):
    """The inputs of a decision or a planning function are unusable; the message says what to fix."""


# ------------------------------------------------------------------------------------------------ checks
def _check_better(better: str) -> None:
    if better not in ("lower", "higher"):
        raise DecisionInputError(f"better must be 'lower' or 'higher' (which values of the metric are better), "
                                 f"got {better!r}")


def _check_alpha_family(alpha: float, family: int) -> None:
    if not 0.0 < alpha < 1.0:
        raise DecisionInputError(f"alpha must be in (0, 1) (0.05 for 95 % intervals), got {alpha!r}")
    if isinstance(family, bool) or not isinstance(family, (int, np.integer)) or family < 1:
        raise DecisionInputError(f"family must be an integer >= 1 (the number of tests sharing alpha), got {family!r}")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float, np.floating)) and math.isfinite(value) and value > 0):
        raise DecisionInputError(f"{name} must be a finite number > 0, got {value!r}")


@lru_cache(maxsize=4096)
def _t_quantile(df: int, alpha: float, family: int) -> float:
    """Two-sided critical value of a Bonferroni interval: t_{1 - alpha / (2 family)}(df); cached for simulations."""
    return float(sps.t.ppf(1.0 - alpha / (2 * family), df))


# ------------------------------------------------------------------------------------------------ the rule
class RelativeGains(NamedTuple):
    """Per-seed relative gains of the g-SAE over TopK (positive = g-SAE better)."""

    seeds: tuple[Any, ...]
    """The paired seeds, sorted."""
    gains: np.ndarray
    """r_s in seed order, a fraction of ``topk_mean``."""
    topk_mean: float
    """mean(topk) over the paired seeds: the denominator of every r_s."""


def relative_gains(topk: Mapping[Any, float], gsae: Mapping[Any, float], better: str) -> RelativeGains:
    """r_s = (topk_s - gsae_s) / mean(topk) for ``better="lower"``, (gsae_s - topk_s) / mean(topk) for "higher"."""
    _check_better(better)
    only_topk, only_gsae = sorted(set(topk) - set(gsae), key=str), sorted(set(gsae) - set(topk), key=str)
    if only_topk or only_gsae:
        raise DecisionInputError(f"the arms must be paired on the same seeds: seeds {only_topk} have only a TopK "
                                 f"value and {only_gsae} only a g-SAE value; drop the unpaired seeds (and record why)"
                                 f" or run the missing ones")
    seeds = tuple(sorted(topk, key=lambda s: (str(type(s)), s)))
    if len(seeds) < 2:
        raise DecisionInputError(f"a paired interval needs at least 2 seeds, got {len(seeds)}; run more seeds")
    t = np.array([topk[s] for s in seeds], dtype=np.float64)
    g = np.array([gsae[s] for s in seeds], dtype=np.float64)
    bad = [s for s, a, b in zip(seeds, t, g, strict=True) if not (math.isfinite(a) and math.isfinite(b))]
    if bad:
        raise DecisionInputError(f"non-finite metric value at seeds {bad}; fix or exclude those runs")
    topk_mean = float(t.mean())
    if topk_mean <= 0:
        raise DecisionInputError(f"TopK's mean metric is {topk_mean!r} <= 0, so an effect relative to it is undefined;"
                                 f" use a metric with a positive baseline (or an absolute rule)")
    diff = t - g if better == "lower" else g - t
    return RelativeGains(seeds, diff / topk_mean, topk_mean)


class Interval(NamedTuple):
    """Two-sided paired t-interval of a mean relative gain."""

    estimate: float
    lower: float
    upper: float
    half_width: float
    level: float
    """Confidence of this one interval, 1 - alpha / family."""
    n: int
    sd: float
    """Sample SD of the per-seed gains (ddof = 1)."""


def paired_interval(gains: np.ndarray, alpha: float = 0.05, family: int = 1) -> Interval:
    """Mean of ``gains`` with its two-sided t-interval (df = n - 1) at confidence 1 - alpha / family."""
    _check_alpha_family(alpha, family)
    gains = np.asarray(gains, dtype=np.float64)
    if gains.ndim != 1 or len(gains) < 2:
        raise DecisionInputError(f"need a 1-d array of at least 2 paired gains, got shape {gains.shape}")
    if not np.all(np.isfinite(gains)):
        raise DecisionInputError("the gains contain a non-finite value; fix or exclude that seed")
    n = len(gains)
    estimate, sd = float(gains.mean()), float(gains.std(ddof=1))
    half = _t_quantile(n - 1, float(alpha), int(family)) * sd / math.sqrt(n)
    return Interval(estimate, estimate - half, estimate + half, half, 1.0 - alpha / family, n, sd)


class Decision(NamedTuple):
    """The verdict of one test and everything it was read from."""

    verdict: str
    """"replicated", "not replicated" or "underpowered"."""
    interval: Interval
    """Of the relative gain (fractions of ``topk_mean``)."""
    min_effect: float
    topk_mean: float
    seeds: tuple[Any, ...]


def verdict_of(interval: Interval, min_effect: float) -> str:
    """The three-way rule on an interval of the relative gain (module docstring)."""
    if interval.lower > 0 and interval.estimate >= min_effect:
        return "replicated"
    if interval.upper < min_effect:
        return "not replicated"
    return "underpowered"


def decide(topk: Mapping[Any, float], gsae: Mapping[Any, float], better: str, min_effect: float,
           alpha: float = 0.05, family: int = 1) -> Decision:
    """The verdict of one test from ``{seed: metric}`` of each arm (paired on the same seeds).

    ``min_effect``: the smallest relative gain that counts (0.05 = 5 % of TopK's metric); ``alpha``: the family-wise
    error of the ``family`` tests' intervals (each at 1 - alpha / family).
    """
    if not (math.isfinite(min_effect) and min_effect >= 0):
        raise DecisionInputError(f"min_effect must be a finite fraction >= 0 (0.05 = 5 %), got {min_effect!r}")
    rel = relative_gains(topk, gsae, better)
    interval = paired_interval(rel.gains, alpha, family)
    return Decision(verdict_of(interval, min_effect), interval, float(min_effect), rel.topk_mean, rel.seeds)


def half_width_pct(topk: Mapping[Any, float], gsae: Mapping[Any, float], alpha: float = 0.05,
                   family: int = 1) -> float:
    """Measured half-width of the paired 1 - alpha/family interval, in % of TopK's mean (the design target
    <= 2.5 %, PREREG.md §4)."""
    rel = relative_gains(topk, gsae, "lower")  # the width does not depend on the direction
    return 100.0 * paired_interval(rel.gains, alpha, family).half_width


# ------------------------------------------------------------------------------------------------ planning
def planned_half_width(sd: float, n: int, alpha: float = 0.05, family: int = 1) -> float:
    """Half-width t_{1 - alpha/(2 family)}(n - 1) * sd / sqrt(n) when the sample SD equals the planning ``sd``."""
    _check_positive("sd", sd)
    _check_alpha_family(alpha, family)
    if n < 2:
        raise DecisionInputError(f"n must be >= 2 seeds, got {n}")
    return _t_quantile(int(n) - 1, float(alpha), int(family)) * sd / math.sqrt(n)


def seeds_needed(sd: float, target_half_width: float, alpha: float = 0.05, family: int = 1,
                 assurance: float | None = None, max_seeds: int = 10_000) -> int:
    """Fewest seeds n >= 2 whose interval half-width is <= ``target_half_width`` (fractions of TopK's metric).

    ``assurance=None``: at the planning ``sd``. ``assurance=0.8``: the realised half-width (the sample SD is random,
    (n - 1) s^2 / sd^2 ~ chi^2(n - 1)) meets the target with probability >= 0.8.
    """
    _check_positive("sd", sd)
    _check_positive("target_half_width", target_half_width)
    _check_alpha_family(alpha, family)
    if assurance is not None and not 0.0 < assurance < 1.0:
        raise DecisionInputError(f"assurance must be in (0, 1) or None, got {assurance!r}")
    for n in range(2, max_seeds + 1):
        q = _t_quantile(n - 1, float(alpha), int(family))
        if assurance is None:
            if q * sd / math.sqrt(n) <= target_half_width:
                return n
        else:  # P(q s / sqrt(n) <= target) = P(chi2(n-1) <= (n-1) (target sqrt(n) / (q sd))^2)
            if sps.chi2.cdf((n - 1) * (target_half_width * math.sqrt(n) / (q * sd)) ** 2, n - 1) >= assurance:
                return n
    raise DecisionInputError(f"more than {max_seeds} seeds needed for a half-width of {target_half_width} at sd {sd};"
                             f" relax the target or reduce the seed-to-seed spread")


class VerdictRates(NamedTuple):
    """How often each verdict comes out (fractions summing to 1)."""

    replicated: float
    not_replicated: float
    underpowered: float
    n_sims: int
    """Simulated experiments behind the rates; 0 for exact probabilities."""


def verdict_probabilities(true_effect: float, sd: float, n: int, min_effect: float, alpha: float = 0.05,
                          family: int = 1) -> VerdictRates:
    """Exact verdict probabilities when r_s ~ Normal(true_effect, sd) independently over n seeds.

    The mean is Normal(true_effect, sd^2/n) and independent of the sample SD s = sd * w / sqrt(n - 1) with
    w ~ chi(n - 1), so with c = t_quantile / sqrt(n):
    P(replicated) = E_w[P(mean > max(min_effect, c s))], P(not replicated) = E_w[P(mean < min_effect - c s)].
    """
    _check_positive("sd", sd)
    _check_alpha_family(alpha, family)
    if n < 2:
        raise DecisionInputError(f"n must be >= 2 seeds, got {n}")
    df = int(n) - 1
    c = _t_quantile(df, float(alpha), int(family)) / math.sqrt(n)
    se = sd / math.sqrt(n)
    s_of = lambda w: sd * w / math.sqrt(df)
    p_rep = lambda w: sps.norm.sf((max(min_effect, c * s_of(w)) - true_effect) / se) * sps.chi.pdf(w, df)
    p_not = lambda w: sps.norm.cdf((min_effect - c * s_of(w) - true_effect) / se) * sps.chi.pdf(w, df)
    w_hi = float(sps.chi.isf(1e-13, df))
    # The replicated integrand has a kink where c s = min_effect: tell quad where it is.
    w_kink = min_effect * math.sqrt(df) / (c * sd) if min_effect > 0 else 0.0
    kinks = [w_kink] if 0.0 < w_kink < w_hi else None
    replicated = integrate.quad(p_rep, 0.0, w_hi, points=kinks, epsabs=1e-11, epsrel=1e-9, limit=200)[0]
    not_replicated = integrate.quad(p_not, 0.0, w_hi, epsabs=1e-11, epsrel=1e-9, limit=200)[0]
    replicated, not_replicated = min(max(replicated, 0.0), 1.0), min(max(not_replicated, 0.0), 1.0)
    return VerdictRates(replicated, not_replicated, max(0.0, 1.0 - replicated - not_replicated), 0)


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8, family: int = 1,
                              min_effect: float = 0.0) -> float:
    """Smallest true relative gain that the rule calls "replicated" with probability ``power``.

    With ``min_effect=0`` this is the classic MDE of the one-sided test "lower bound > 0" (a noncentral t);
    with the study's ``min_effect`` it includes the "estimate >= min_effect" half of the rule.
    """
    _check_positive("sd", sd)
    _check_alpha_family(alpha, family)
    if not 0.0 < power < 1.0:
        raise DecisionInputError(f"power must be in (0, 1), got {power!r}")
    if not (math.isfinite(min_effect) and min_effect >= 0):
        raise DecisionInputError(f"min_effect must be a finite fraction >= 0, got {min_effect!r}")
    gap = lambda effect: verdict_probabilities(effect, sd, n, min_effect, alpha, family).replicated - power
    if gap(0.0) >= 0:
        raise DecisionInputError(f"power {power} is below the false-replication rate at no effect; ask for more")
    hi = max(sd, min_effect, 1e-12)
    while gap(hi) < 0:  # P(replicated) -> 1 as the effect grows: double until bracketed
        hi *= 2.0
    return float(optimize.brentq(gap, 0.0, hi, xtol=1e-10 * max(sd, min_effect)))


# ------------------------------------------------------------------------------------------------ simulation
def simulate(rule_fn: Callable[[dict[int, float], dict[int, float]], Any], true_effect: float, sd: float,
             n_seeds: int, n_sims: int, seed: int, better: str = "lower", progress: bool = False) -> VerdictRates:
    """Rates of each verdict of ``rule_fn`` over ``n_sims`` simulated experiments (deterministic given ``seed``).

    Each experiment draws r_s ~ Normal(true_effect, sd) for seeds 0..n_seeds-1, sets TopK's metric to 1 and the
    g-SAE's to 1 - r_s (``better="lower"``) or 1 + r_s ("higher"), and calls ``rule_fn(topk, gsae)``, which must
    return a verdict string or something with a ``.verdict`` (e.g. ``functools.partial(decide, better="lower",
    min_effect=0.05, family=2)``; its ``better`` must match this one).
    """
    _check_better(better)
    if not (math.isfinite(sd) and sd >= 0):
        raise DecisionInputError(f"sd must be a finite fraction >= 0, got {sd!r}")
    if n_seeds < 2 or n_sims < 1:
        raise DecisionInputError(f"need n_seeds >= 2 and n_sims >= 1, got {n_seeds} and {n_sims}")
    gains = np.random.default_rng(seed).normal(true_effect, sd, size=(n_sims, n_seeds))
    sign = -1.0 if better == "lower" else 1.0
    counts = dict.fromkeys(VERDICTS, 0)
    topk = dict.fromkeys(range(n_seeds), 1.0)
    for row in tqdm(gains, desc="simulating verdicts", disable=not progress):
        out = rule_fn(topk, {s: 1.0 + sign * float(r) for s, r in enumerate(row)})
        verdict = out if isinstance(out, str) else out.verdict
        if verdict not in counts:
            raise DecisionInputError(f"rule_fn returned verdict {verdict!r}, expected one of {VERDICTS}")
        counts[verdict] += 1
    return VerdictRates(counts["replicated"] / n_sims, counts["not replicated"] / n_sims,
                        counts["underpowered"] / n_sims, n_sims)
