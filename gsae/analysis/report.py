"""The claims ledger in words, tables and records: what the README, ``results/<profile>/claims.md`` and
``ledger.json`` say, rendered from the ledger's results (``gsae.analysis.ledger``) and nothing else.

Sign convention everywhere: a gain is (TopK − g-SAE) / TopK for a metric where lower is better, (g-SAE − TopK) /
TopK where higher is better, so a positive gain always means the g-SAE is better; an equivalence test (C4) reports
the difference g-SAE − TopK in the metric's own units. Every interval says whether it is the deciding one
(Bonferroni over the claim's tests) or a plain 95 % interval.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from .. import arms
from . import decision, dose, kl, ledger
from .ledger import ClaimResult, LengthCheck, TestResult
from .rows import mean_t_interval

QUALITY_NOTE = (
    "Per-SAE quality on the test split, mean ± 95% t-interval over seeds, under the names SAELens' `run_evals` and "
    "SAEBench use: `ce_loss_score` = CE recovered against zero-ablation, `explained_variance` = 1 − FVU over all "
    "test tokens (`_typical`: without the massive-activation tokens, which hold much of the squared error), "
    "`kl_div` = KL(clean ‖ spliced) in nats per token, L0 = active latents per token; \"—\": not measured for that "
    "encoder. For scale only: OpenAI's GPT-2-small TopK SAEs (another model, far more training) reach a CE score "
    "≈ 0.99, explained variance ≈ 0.93 and KL ≈ 0.07 at L0 32.")

PLAIN_NAMES = {"C1": "Fidelity without labels", "C1g": "Fidelity with labels at inference, as the paper scores it",
               "C2": "Dead latents", "C3": "Steering", "C4": "Interpretability"}
"""How the answer names each claim."""
METRIC_WORDS = {"delta_ce_all": "CE increase when spliced into the LM", "delta_ce": "CE increase when spliced",
                "kl_all": "KL(clean ‖ spliced)", "kl": "KL(clean ‖ spliced)",
                "dead_fraction_trainsplit": "dead latents", "steer_kl_ratio@0.1": "steering KL over random directions",
                "probe_auc_pos_heldout": "held-out POS-probe AUC"}
"""How the answer names each registered metric (others keep their identifier)."""


class Report(NamedTuple):
    answer: str
    """The README's answer: one plain line per claim with absolute values beside the relative gain (≤ 6 lines)."""
    claims_table: str
    """The README's claims table: one row per claim, its verdict and deciding interval."""
    ledger_md: str
    """``claims.md``: the full ledger (robustness, power, length check, secondary tests, the k curve, quality)."""
    record: dict[str, Any]
    """What ledger.json holds."""
    results: list[ClaimResult]
    length_checks: list[LengthCheck]


def prereg_for(profile_name: str, primary_k: list[int], k_grid: list[int], length_group: str,
               length_multiplier: float, length_seeds: list[int], pre: dict[str, Any],
               variants: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The registered pre-registration ``pre`` as it applies to a profile: the registered profile gets it as
    written; another (smoke, robustness) is analysed on its own k grid, with the length check on its own length
    group. A profile without a length group (the registered one since v6) has no length check, and each claim's
    robustness reruns are those of ``variants`` (the profile's variant groups, when given) it registers."""
    if variants is not None:
        pre = {**pre, "claims": {cid: {**c, "robustness": [v for v in c.get("robustness", []) if v in variants]}
                                 for cid, c in pre["claims"].items()}}
    if profile_name != pre.get("profile"):
        pre = {**pre, "primary_k": list(primary_k), "k_grid": list(k_grid)}
        if "length_check" in pre and length_group:
            lc = {key: v for key, v in pre["length_check"].items() if key != "seeds"}  # the registered seeds
            pre["length_check"] = {**lc, "variant": length_group, "multiplier": length_multiplier,
                                   **({"seeds": list(length_seeds)} if length_seeds else {})}
    if "length_check" in pre and not length_group:
        pre = {key: v for key, v in pre.items() if key != "length_check"}  # nothing to check
    return pre


def superseded_note(profile_name: str, rows: list[dict], old: dict[str, Any], old_path: str) -> str:
    """For the registered profile: C1 as the superseded pre-registration ``old`` reads the same rows (a reporting
    requirement of PREREG §3), or "" for any other profile."""
    if not old or profile_name != old.get("profile"):
        return ""
    c1 = next(c for c in ledger.evaluate(old, rows) if c.claim == "C1")
    tests = "; ".join(f"{r.test} {effect_text(r)}" for r in c1.primary)
    return (f"Under the superseded version {old['version']} ({old_path}, the same SAEs): C1 **{c1.verdict}** — "
            f"{tests}, n = {max(r.n for r in c1.primary)}.\n")


def convergence_note(conv: dict[str, Any] | None, max_rel_change: float, relative_change) -> str:
    """The convergence record (``selection.convergence``) in one sentence, or "" without one. It is reported only:
    the length check says whether C1 holds over a doubling of training."""
    if not conv:
        return ""
    parts, converged = [], True
    for arm, curve in conv["curves"].items():
        change = relative_change(curve, conv["primary_tokens"])
        if change is None:
            return ""
        converged &= abs(change) < max_rel_change
        parts.append(f"{arms.get(arm).label} {100 * change:+.1f}%")
    return (f"Convergence (validation ΔCE, plain-encode, seed {conv['seed']}, reported only): doubling the training "
            f"length ({conv['primary_tokens']:,} tokens) changed it by {', '.join(parts)} (criterion < "
            f"{100 * max_rel_change:g}%): {'converged' if converged else 'not converged'}.\n")


def _abs(x: float, metric: str, d_sae: int | None) -> str:
    """An arm's mean in the metric's own unit: nats for CE and KL, a count of latents for a dead fraction."""
    if metric.startswith("dead_fraction") and d_sae:
        return f"{x * d_sae:.1f} of {d_sae:,} latents"
    if metric.startswith(("delta_ce", "kl")):
        return f"{x:.3f} nats"
    return f"{x:.3f}"


def render_answer(results: list[ClaimResult], pre: dict[str, Any], d_sae: int | None,
                  checks: list[LengthCheck], points: list[dose.DosePoint] = ()) -> str:
    """The answer in plain words: per claim its verdict, both arms' means in the metric's unit and the gain with
    its deciding interval; then the convention, the chosen beta with how much the gradient changes the selection,
    and the length check, in one line."""
    lines = []
    for c in results:
        specs = {f"{t['metric']} ({t['encode_mode']})": t for t in pre["claims"][c.claim]["tests"]}
        parts = []
        for r in c.primary:
            t = specs[r.test]
            metric = t["metric"]
            words = METRIC_WORDS.get(metric, metric)
            means = f"TopK {_abs(r.baseline_mean, metric, d_sae)}, g-SAE {_abs(r.treatment_mean, metric, d_sae)}"
            if math.isnan(r.estimate):
                parts.append(f"{words}: " + (f"{means}; " if not math.isnan(r.baseline_mean) else "") + r.verdict)
                continue
            if t["rule"] == "equivalence":
                need = f"comparable if the difference stays above −{t['margin']:g}"
                parts.append(f"{words}: {means}; difference {effect_text(r, True)} ({need})")
            else:
                need = f"the claim needs ≥ {100 * float(t['min_rel_effect']):g}%"
                if r.lower > 0 and r.verdict == "not replicated":  # a resolved gain, short of the registered minimum
                    need = f"above 0 but short of the {100 * float(t['min_rel_effect']):g}% the claim needs"
                parts.append(f"{words}: {means}; gain {effect_text(r)} ({need})")
        n = max((r.n for r in c.primary), default=0)
        lines.append(f"- **{PLAIN_NAMES.get(c.claim, c.claim)} ({c.claim}): {c.verdict}.** " + "; ".join(parts)
                     + f"; {n} paired seeds.")
    k = ", ".join(str(k) for k in pre["primary_k"])
    tail = (f"- At k = {k}. Gains are (TopK − g-SAE) / TopK, positive = g-SAE better, with the deciding 95% "
            f"Bonferroni interval.")
    chosen = next((pt for pt in points if pt.chosen), None)
    if chosen is not None:
        share = chosen.means.get("selection_changed_share (g)", math.nan)
        tail += (f" The g-SAE's β = {chosen.beta:.3g} was chosen on the validation split from "
                 f"{', '.join(f'{pt.beta:.3g}' for pt in points if pt.tests)}; at it the gradient changes "
                 f"{100 * share:.0f}% of the {', '.join(str(k) for k in pre['primary_k'])} selected latents.")
    if checks:
        stable = ledger.length_stable(checks)
        tail += (f" {pre['length_check']['claim']} is " + ("length-stable over one doubling of training." if stable
                                                           else "not length-stable over one doubling of training."))
    return "\n".join(lines + [tail]) + "\n"


def render_claims_table(results: list[ClaimResult], pre: dict[str, Any]) -> str:
    """One row per claim: verdict, each deciding test's gain with its Bonferroni interval, what it needs, n."""
    lines = ["| claim | verdict | deciding test at k = " + ", ".join(str(k) for k in pre["primary_k"])
             + " | gain [95% Bonferroni interval] | needs | n |", "|---|---|---|---|---|---|"]
    for c in results:
        specs = {f"{t['metric']} ({t['encode_mode']})": t for t in pre["claims"][c.claim]["tests"]}
        for i, r in enumerate(c.primary):
            t = specs[r.test]
            eq = t["rule"] == "equivalence"
            need = f"> −{t['margin']:g} (difference)" if eq else f"≥ {100 * float(t['min_rel_effect']):g}%"
            head = (f"**{c.claim}** {c.title}", f"**{c.verdict}**") if i == 0 else ("", "")
            lines.append(f"| {head[0]} | {head[1]} | {r.test} | {effect_text(r, eq)} | {need} | {r.n} |")
    return "\n".join(lines) + "\n"


def build(pre: dict[str, Any], rows: list[dict], *, d_sae: int | None = None, superseded: str = "",
          convergence: str = "", chosen_beta: float | None = None) -> Report:
    """Apply ``pre`` (already ``prereg_for`` the profile) to ``rows`` (metrics.jsonl) and render everything, with
    the dose-response around ``chosen_beta`` (the g-SAE's beta chosen on validation) when one was trained; writes
    nothing."""
    results = ledger.evaluate(pre, rows)
    points = dose.evaluate_dose(pre, rows, chosen_beta)
    kl_gains, kl_inter = kl.evaluate_kl(pre, rows)
    half = [r.half_width_pct for c in results if c.claim == "C1" for r in c.primary if r.test.startswith("delta_ce")]
    power = (f"C1 at k = {pre['primary_k']}: 95% half-width of the paired ΔCE gain = "
             + ", ".join("—" if math.isnan(h) else f"{h:.2f}%" for h in half)
             + f" of TopK's ΔCE (design target ≤ {100 * pre['power_target_half_width']:.1f}%).\n")
    checks = ledger.evaluate_length_check(pre, rows)
    curve_head = ("C1 across the k grid, on its own curve tests at every k (never decisive; the verdict reads C1's "
                  "registered tests), with each test's detection limit and replication threshold at that k's seed "
                  "count and measured SD (80% power).\n")
    md = "\n".join(part for part in (
        "# Claims ledger (generated from metrics.jsonl and prereg.yaml; do not edit)\n",
        "Gains are (TopK − g-SAE) / TopK in % (positive = g-SAE better) unless marked as a difference.\n",
        render(results, pre) + power, dose.render_dose(points), kl.render_kl(kl_gains, kl_inter),
        render_limits(results, pre),
        render_claim_rates(rows, pre), superseded,
        convergence,
        render_length_check(checks, pre),
        render_secondary(results, pre), curve_head, render_curve(results, pre), QUALITY_NOTE + "\n",
        render_quality(rows)) if part)
    record = {"prereg_version": pre["version"],
              "claims": [c._asdict() | {key: [r._asdict() for r in getattr(c, key)]
                                        for key in ("primary", "curve", "secondary")} for c in results],
              "length_check": [c._asdict() for c in checks], "dose": dose.record(points),
              "kl_finetune": {"gains": [r._asdict() for r in kl_gains], "interaction": [i._asdict() for i in kl_inter]}}
    return Report(render_answer(results, pre, d_sae, checks, points), render_claims_table(results, pre), md, record,
                  results, checks)


def render_length_check(checks: list[LengthCheck], prereg: dict[str, Any]) -> str:
    """One line per test of the length check, and whether the claim's verdict is length-stable."""
    if not checks:
        return ""
    lc = prereg["length_check"]
    lines = [f"- {c.test} at k = {c.k}: gain {pct(c.gain_primary)} (primary) → {pct(c.gain_variant)} ({c.variant}); "
             f"change {pct(c.estimate)} [{pct(c.lower)}, {pct(c.upper)}], n = {c.n}: **{c.outcome}**"
             for c in checks]
    head = (f"Length check (PREREG §5): the change of {lc['claim']}'s paired gain when the training length is "
            f"multiplied by {lc.get('multiplier', '?')} (group {lc['variant']}), Bonferroni interval; stable if inside "
            f"±{100 * float(lc['margin']):g} points. {lc['claim']}'s verdict is "
            + ("**length-stable over one doubling** of training (every test)." if ledger.length_stable(checks)
               else "**length-dependent or undetermined** (not every test is length-stable)."))
    return head + "\n\n" + "\n".join(lines) + "\n"


def length_check_sentence(checks: list[LengthCheck], prereg: dict[str, Any]) -> str:
    """The length check in one sentence, for the README's bottom line."""
    lc = prereg["length_check"]
    parts = "; ".join(f"{c.test} {pct(c.estimate)} [{pct(c.lower)}, {pct(c.upper)}] ({c.outcome})" for c in checks)
    return (f"Length check (training {lc.get('multiplier', '?')}× longer, n = {max(c.n for c in checks)}): the "
            f"paired gain changed by {parts}, so {lc['claim']}'s verdict is "
            + ("length-stable over one doubling." if ledger.length_stable(checks) else "**not length-stable**."))


def pct(x: float) -> str:
    """A fraction as a signed percentage ("—" for NaN)."""
    return "—" if math.isnan(x) else f"{100 * x:+.1f}%"


def render(results: list[ClaimResult], prereg: dict[str, Any]) -> str:
    """The claims table (Markdown): verdict, the primary-k tests with their intervals, robustness."""
    lines = ["| claim | verdict | test at the primary k | effect [interval] | 95% half-width | n | robustness |",
             "|---|---|---|---|---|---|---|"]
    for c in results:
        for i, r in enumerate(c.primary):
            equiv = any(t["rule"] == "equivalence" and f"{t['metric']} ({t['encode_mode']})" == r.test
                        for t in prereg["claims"][c.claim]["tests"])
            fmt = (lambda x: "—" if math.isnan(x) else f"{x:+.4f}") if equiv else pct
            effect = f"{fmt(r.estimate)} [{fmt(r.lower)}, {fmt(r.upper)}]"
            half = "—" if math.isnan(r.half_width_pct) else f"{r.half_width_pct:.1f}%"
            rob = "; ".join(f"{v}: {w} (primary SAEs on the same seeds: {c.robustness_same_seeds.get(v, '—')})"
                            for v, w in c.robustness.items()) or "—"
            head = (f"**{c.claim}** {c.title}", f"**{c.verdict}**") if i == 0 else ("", "")
            lines.append(f"| {head[0]} | {head[1]} | {r.test} at k = {r.k}: {r.verdict} | {effect} | {half} | "
                         f"{r.n} | {rob if i == 0 else ''} |")
    return "\n".join(lines) + "\n"


def test_spec(prereg: dict[str, Any], claim: str, test: str) -> dict[str, Any]:
    """The registered test of ``claim`` whose name ("<metric> (<encoder>)") is ``test``."""
    c = prereg["claims"][claim]
    for t in c["tests"] + [ledger.secondary_test(c, s) for s in c.get("secondary", [])]:
        if f"{t['metric']} ({t['encode_mode']})" == test:
            return t
    raise ledger.LedgerError(f"claim {claim} registers no test {test!r}")


def render_secondary(results: list[ClaimResult], prereg: dict[str, Any]) -> str:
    """One line per secondary test (own 95 % interval, same rule), marked as never decisive."""
    lines = [f"- {c.claim}, {r.test} at k = {r.k}: {pct(r.estimate)} [{pct(r.lower)}, {pct(r.upper)}], n = {r.n} "
             f"({test_spec(prereg, c.claim, r.test).get('note', 'secondary')}; by the same rule it would read "
             f"\"{r.verdict}\")" for c in results for r in c.secondary]
    if not lines:
        return ""
    return "Secondary tests (reported, never part of a verdict):\n\n" + "\n".join(lines) + "\n"


def limits(r: TestResult, alpha: float, family: int, min_effect: float, power: float = 0.8) -> tuple[float, float]:
    """Two sizes of a relative test at its seed count and measured SD, never to be confused:

    * the **detection limit**: the smallest true gain whose interval excludes 0 (lower > 0) with probability
      ``power``, the sensitivity of the design;
    * the **replication threshold**: the smallest true gain the rule calls "replicated" with probability ``power``;
      it includes "the estimate reaches the minimum effect", so it is at least ``min_effect`` by construction.

    Both from ``decision.minimum_detectable_effect`` (nan when the SD is not positive)."""
    if not r.sd > 0:
        return math.nan, math.nan
    return (decision.minimum_detectable_effect(r.sd, r.n, alpha, power, family, 0.0),
            decision.minimum_detectable_effect(r.sd, r.n, alpha, power, family, min_effect))


def _size(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.1f}%"


def render_limits(results: list[ClaimResult], prereg: dict[str, Any], power: float = 0.8) -> str:
    """One line per deciding relative test: its detection limit and its replication threshold (``limits``)."""
    lines = []
    for c in results:
        specs = {f"{t['metric']} ({t['encode_mode']})": t for t in prereg["claims"][c.claim]["tests"]}
        for r in c.primary:
            t = specs[r.test]
            if t["rule"] != "relative" or math.isnan(r.estimate):
                continue
            detect, replicate = limits(r, float(prereg["alpha"]), len(c.primary), float(t["min_rel_effect"]), power)
            lines.append(f"- {c.claim}, {r.test} at k = {r.k}, n = {r.n}: detection limit {_size(detect)}, "
                         f"replication threshold {_size(replicate)}")
    if not lines:
        return ""
    return (f"Sizes of the deciding tests at their measured SD ({100 * power:g}% power, the deciding interval): the "
            f"**detection limit** is the smallest true gain whose interval would exclude 0; the **replication "
            f"threshold** the smallest the rule would call \"replicated\" (at least the minimum effect, by "
            f"construction). A \"not replicated\" says the gain is below the minimum effect, not that there is "
            f"none. Every interval counts seeds only: it is conditional on the one test set all SAEs are scored on."
            f"\n\n" + "\n".join(lines) + "\n")


CLAIM_SCENARIOS = ((0.0, 0.0), (0.05, 0.05), (0.10, 0.10), (0.10, 0.03), (0.03, 0.10))
"""True gains (ΔCE test, KL test) at which C1's claim-level rates are simulated."""


def render_claim_rates(rows: list[dict[str, Any]], prereg: dict[str, Any], claim: str = "C1") -> str:
    """The claim-level operating characteristics of ``claim`` (two or more relative co-primary tests) at the
    measured SDs and correlation of its per-seed gains (``ledger.claim_rates``): how often it would read each
    outcome if the true gains were those of ``CLAIM_SCENARIOS``."""
    tests = [t for t in prereg["claims"][claim]["tests"] if t["rule"] == "relative"]
    if len(tests) != 2:
        return ""
    k = prereg["primary_k"][0]
    per = [ledger.seed_gains(rows, t, k) for t in tests]
    seeds = sorted(set(per[0]) & set(per[1]))
    if len(seeds) < 3:
        return ""
    a, b = (np.array([p[s] for s in seeds]) for p in per)
    sds, corr = [float(a.std(ddof=1)), float(b.std(ddof=1))], float(np.corrcoef(a, b)[0, 1])
    names = [f"{t['metric']} ({t['encode_mode']})" for t in tests]
    lines = [f"| true gain: {names[0]} | {names[1]} | replicated | not replicated | mixed | underpowered |",
             "|---|---|---|---|---|---|"]
    for g in CLAIM_SCENARIOS:
        r = ledger.claim_rates(list(g), sds, corr, len(seeds), [float(t["min_rel_effect"]) for t in tests],
                               float(prereg["alpha"]))
        lines.append(f"| {100 * g[0]:+.0f}% | {100 * g[1]:+.0f}% | " + " | ".join(
            f"{100 * r[o]:.0f}%" for o in ("replicated", "not replicated", "mixed", "underpowered")) + " |")
    return (f"{claim} as a claim, simulated (20,000 draws at its measured per-seed SDs {100 * sds[0]:.2f}% and "
            f"{100 * sds[1]:.2f}% of TopK's mean, correlation {corr:.2f}, n = {len(seeds)}): how often the claim "
            f"would read each outcome at these true gains. A gain above the minimum on one test and below it on "
            f"the other reads \"mixed\", never \"replicated\".\n\n" + "\n".join(lines) + "\n")


def render_curve(results: list[ClaimResult], prereg: dict[str, Any], claim: str = "C1", power: float = 0.8) -> str:
    """Per k of the grid, ``claim``'s tests (the primary k's interval is Bonferroni-adjusted, the others per k)
    with two sizes at that k's seed count and measured SD (``limits``): the detection limit and the replication
    threshold."""
    c = next(c for c in results if c.claim == claim)
    own = "curve_tests" in prereg["claims"][claim]  # the curve's own tests at every k (PREREG §3)
    tests = [t for t in prereg["claims"][claim]["curve_tests" if own else "tests"] if t["rule"] == "relative"]
    by_k: dict[int, list[TestResult]] = {}
    for r in c.curve if own else c.primary + c.curve:
        by_k.setdefault(r.k, []).append(r)
    names = [f"{t['metric']} ({t['encode_mode']})" for t in tests]
    head = " | ".join(f"{n}: gain [interval] | verdict | detection limit | replication threshold" for n in names)
    lines = [f"| k | n | {head} |", "|---|---|" + "---|---|---|---|" * len(names)]
    alpha = float(prereg["alpha"])
    for k in sorted(by_k):
        cells = []
        for t, name in zip(tests, names, strict=True):
            r = next((x for x in by_k[k] if x.test == name), None)
            if r is None or math.isnan(r.estimate):
                cells.append(f"— | {r.verdict if r else 'not tested'} | — | —")
                continue
            family = len(c.primary) if k in prereg["primary_k"] and not own else len(tests)
            detect, replicate = limits(r, alpha, family, float(t["min_rel_effect"]), power)
            cells.append(f"{pct(r.estimate)} [{pct(r.lower)}, {pct(r.upper)}] | {r.verdict} | {_size(detect)} | "
                         f"{_size(replicate)}")
        star = " (primary)" if k in prereg["primary_k"] else ""
        lines.append(f"| {k}{star} | {by_k[k][0].n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


QUALITY = (("ce_loss_score", "{:.3f}"), ("explained_variance", "{:.3f}"), ("explained_variance_typical", "{:.3f}"),
           ("kl_div", "{:.3f}"), ("l0", "{:.0f}"))
"""The per-SAE quality figures under SAELens' run_evals / SAEBench names, and their format."""


def quality_rows(rows: list[dict[str, Any]], variant: str = "primary") -> dict[tuple[int, str], dict[str, Any]]:
    """(k, arm label with encoder) -> {metric: (mean, 95 % half-width), "n": seeds}."""
    values: dict[tuple[int, str], dict[str, list[float]]] = {}
    for r in rows:
        arm = arms.get(r["arm"])
        if r["variant"] != variant or r["encode_mode"] not in arm.encode_modes():
            continue
        per = values.setdefault((int(r["k"]), arm.label_for(r["encode_mode"])), {})
        for m, _ in QUALITY:
            v = r["metrics"].get(m)
            if isinstance(v, (int, float)) and math.isfinite(v):
                per.setdefault(m, []).append(float(v))
    return {key: {"n": max((len(v) for v in per.values()), default=0)}
            | {m: mean_t_interval(v) for m, v in per.items()} for key, per in values.items()}


def render_quality(rows: list[dict[str, Any]]) -> str:
    """Per k and SAE (arm and encoder): mean ± 95 % half-width over seeds of each ``QUALITY`` figure ("—" where
    that encoder's LM metrics were not measured)."""
    now = quality_rows(rows)

    def cell(stats: dict[str, Any], m: str, fmt: str) -> str:
        if m not in stats:
            return "—"
        mean, half = stats[m]
        return fmt.format(mean) + ("" if math.isnan(half) or m == "l0" else " ± " + fmt.format(half))

    lines = ["| k | SAE | n | " + " | ".join(m for m, _ in QUALITY) + " |", "|---|---|---|" + "---|" * len(QUALITY)]
    for key in sorted(now):
        cells = [cell(now[key], m, fmt) for m, fmt in QUALITY]
        lines.append(f"| {key[0]} | {key[1]} | {now[key]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def effect_text(r: TestResult, equivalence: bool = False) -> str:
    """A test's effect as "estimate [lower, upper]" (percent for relative tests, raw for equivalence), or its
    verdict when there is no estimate."""
    if math.isnan(r.estimate):
        return r.verdict
    if equivalence:
        return f"{r.estimate:+.4f} [{r.lower:+.4f}, {r.upper:+.4f}]"
    return f"{pct(r.estimate)} [{pct(r.lower)}, {pct(r.upper)}]"
