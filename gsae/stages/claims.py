"""Stage ``claims``: the one writer of ``results/<profile>/metrics.jsonl`` (``gsae.metrics``), then the
pre-registered verdicts: for a v2 profile (``selection.protocol: per_arm``) the three-way ledger of
``prereg_v5.yaml`` (``gsae.ledger.CURRENT``), written to ``results/<profile>/ledger.json`` and, for the registered
profile, the README claims block; for a v1 profile ``gsae.claims`` (README table + SENSITIVITY.md)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

from .. import arms, claims, io, ledger, metrics
from ..config import Profile
from ..paths import ROOT, results_dir
from ..specs import length_group
from . import selection

V1_METRICS = ROOT / "results" / "v1" / "metrics.jsonl"
"""The superseded v1 study's rows (PREREG.md version 1), shown beside v2's quality figures."""

QUALITY_NOTE = (
    "Per-SAE quality on the test split, mean ± 95% t-interval over seeds, under the names SAELens' `run_evals` and "
    "SAEBench use: `ce_loss_score` = CE recovered against zero-ablation, `explained_variance` = 1 − FVU over all "
    "test tokens (`_typical`: without the massive-activation tokens, which hold much of the squared error), "
    "`kl_div` = KL(clean ‖ spliced) in nats per token, L0 = active latents per token. The v1 columns are the "
    "superseded v1 study (121 Adam steps per SAE, massive tokens spliced; `results/v1/`). For scale only: OpenAI's "
    "GPT-2-small TopK SAEs (another model, far more training) reach a CE score ≈ 0.99, explained variance ≈ 0.93 "
    "and KL ≈ 0.07 at L0 32.")


class LedgerReport(NamedTuple):
    markdown: str
    """The README claims block: verdicts, C1's half-width, convergence, secondary tests, C1 per k with its minimum
    detectable effect, and the per-SAE quality table."""
    record: dict[str, Any]
    """What ledger.json holds."""
    bottom_line: str
    """One line per claim with its verdict and intervals, plus power and robustness (the README's bottom line)."""


def convergence_note(p: Profile, max_rel_change: float, decisive: bool = True) -> str:
    """The per-arm convergence criterion (PREREG v2 §3) from results/<profile>/convergence.json, or "" without it;
    not ``decisive`` (PREREG v3 §2): reported only, the length check decides whether C1 is final."""
    path = results_dir(p) / "convergence.json"
    if not path.exists():
        return ""
    conv = io.read_json(path)
    parts, converged = [], True
    for arm, curve in conv["curves"].items():
        change = selection.relative_change(curve, conv["primary_tokens"])
        if change is None:
            return ""
        converged &= abs(change) < max_rel_change
        parts.append(f"{arms.get(arm).label} {100 * change:+.1f}%")
    if converged or not decisive:
        verdict = "converged" if converged else "not converged"
    else:
        verdict = "**not converged**, so every C1 verdict is provisional (PREREG v2 §3)"
    if not decisive:
        verdict += " (reported only: the length check below decides whether C1 is final, PREREG v3 §2)"
    return (f"Convergence (validation ΔCE, plain-encode, seed {conv['seed']}): doubling the training length "
            f"({conv['primary_tokens']:,} tokens) changed it by {', '.join(parts)} (criterion < "
            f"{100 * max_rel_change:g}%): {verdict}.\n")


def prereg_for(p: Profile, prereg_path: Path = ROOT / ledger.CURRENT) -> dict[str, Any]:
    """The registered pre-registration as it applies to ``p``: the registered profile gets it as written; another
    (smoke) is analysed on its own k grid, with the length check on its own length group, if it has one."""
    pre = ledger.load_prereg(prereg_path)
    if p.name == pre.get("profile"):
        return pre
    pre = {**pre, "primary_k": list(p.experiment.primary_k or p.experiment.k_grid), "k_grid": list(p.experiment.k_grid)}
    if "length_check" in pre and length_group(p):
        lc = {key: v for key, v in pre["length_check"].items() if key != "seeds"}  # the registered profile's seeds
        pre["length_check"] = {**lc, "variant": length_group(p), "multiplier": p.variants.length_multiplier,
                               **({"seeds": list(p.variants.length_seeds)} if p.variants.length_seeds else {})}
    elif "length_check" in pre:
        del pre["length_check"]  # a profile without a length group has nothing to check
    return pre


def superseded_note(p: Profile, rows: list[dict], path: Path = ROOT / ledger.SUPERSEDED) -> str:
    """For the registered profile: C1 as the superseded pre-registration reads the same rows (PREREG v4 §3 shows
    both verdicts), or "" for any other profile."""
    old = ledger.load_prereg(path) if path.exists() else {}
    if p.name != old.get("profile"):
        return ""
    c1 = next(c for c in ledger.evaluate(old, rows) if c.claim == "C1")
    tests = "; ".join(f"{r.test} {ledger.effect_text(r)}" for r in c1.primary)
    return (f"Under the superseded version {old['version']} ({path.name}, the same SAEs): C1 **{c1.verdict}** — "
            f"{tests}, n = {max(r.n for r in c1.primary)}.\n")


def ledger_report(p: Profile, rows: list[dict], prereg_path: Path = ROOT / ledger.CURRENT,
                  v1_metrics: Path = V1_METRICS) -> LedgerReport:
    """Apply the registered pre-registration (``prereg_for``) to ``rows`` (metrics.jsonl) without writing anything."""
    pre = prereg_for(p, prereg_path)
    results = ledger.evaluate(pre, rows)
    half = [r.half_width_pct for c in results if c.claim == "C1" for r in c.primary if r.test.startswith("delta_ce")]
    note = (f"\nC1 at k = {pre['primary_k']}: 95% half-width of the paired ΔCE difference = "
            + ", ".join("—" if math.isnan(h) else f"{h:.2f}%" for h in half)
            + f" of TopK's ΔCE (design target ≤ {100 * pre['power_target_half_width']:.1f}%).\n")
    conv_cfg = pre.get("convergence", {})
    conv = convergence_note(p, float(conv_cfg.get("max_rel_change", 0.02)), bool(conv_cfg.get("decisive", True)))
    lengths = ledger.evaluate_length_check(pre, rows)
    length_md = ledger.render_length_check(lengths, pre)
    secondary = ledger.render_secondary(results, pre)
    v1 = claims.load_metrics(v1_metrics) if p.name == pre.get("profile") and v1_metrics.exists() else None
    curve_head = ("C1 across the k grid, on its own curve tests at every k (never decisive; the verdict above reads "
                  "C1's registered tests)" if "curve_tests" in pre["claims"]["C1"] else
                  "C1 across the k grid (the primary k decides, Bonferroni over its tests; the other k have fewer "
                  "seeds and are never decisive)")
    superseded = superseded_note(p, rows)
    md = "\n".join(part for part in (
        ledger.render(results, pre) + note, superseded, conv, length_md, secondary,
        curve_head + ". MDE: the smallest true gain the rule would call \"replicated\" with 80% power at that k's "
        "seed count and measured SD.\n", ledger.render_curve(results, pre),
        QUALITY_NOTE + "\n", ledger.render_quality(rows, v1)) if part)
    record = {"prereg_version": pre["version"],
              "claims": [c._asdict() | {key: [r._asdict() for r in getattr(c, key)]
                                        for key in ("primary", "curve", "secondary")} for c in results],
              "length_check": [c._asdict() for c in lengths]}
    bottom_note = ledger.length_check_sentence(lengths, pre) if lengths else conv
    bottom = ledger.render_bottom_line(results, pre, half, bottom_note) + (f"- {superseded}" if superseded else "")
    return LedgerReport(md, record, bottom)


def write_ledger(p: Profile, rows: list[dict], prereg_path: Path = ROOT / ledger.CURRENT) -> str:
    """Apply prereg v2 to ``rows``; write ledger.json (and the README block for the registered profile)."""
    from ..report import BOTTOM_LINE, update_readme

    rep = ledger_report(p, rows, prereg_path)
    io.write_json(results_dir(p) / "ledger.json", rep.record)
    if p.name == ledger.load_prereg(prereg_path).get("profile"):
        update_readme(ROOT / "README.md", rep.markdown)
        update_readme(ROOT / "README.md", rep.bottom_line, BOTTOM_LINE)
    return rep.markdown


def run(p: Profile, lm=None, progress: bool = True) -> str:
    """Make sure every SAE is evaluated, steered and probed, write metrics.jsonl, then the verdicts; returns the
    claims table (Markdown)."""
    from . import evaluate, full_test, load_lm, probe, steer
    from .train import all_specs

    lm = lm or load_lm(p, progress)
    specs = all_specs(p, lm)
    evaluate.evaluate_specs(p, lm, specs, "test", progress)
    full_test.run_full_test(p, lm, specs, progress)
    steer.run_steering(p, lm, specs, progress)
    probe.run_probing(p, lm, specs, progress)
    path = metrics.write_metrics(p, lm, specs)
    if p.selection.protocol == "per_arm":
        return write_ledger(p, [r.row() for r in metrics.records(p, lm, specs)])
    if claims.main(["--profile", p.name]) != 0:
        raise RuntimeError(f"gsae.claims failed on {path}; its message above says what to fix")
    from ..report import verdict_for_profile

    return verdict_for_profile(p.name).claims_table
