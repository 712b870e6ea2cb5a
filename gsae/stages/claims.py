"""Stage ``claims``: the one writer of ``results/<profile>/metrics.jsonl`` (``gsae.metrics``), then the
pre-registered verdicts: for a v2 profile (``selection.protocol: per_arm``) the three-way ledger of
``prereg_v2.yaml`` (``gsae.ledger``), written to ``results/<profile>/ledger.json`` and, for the registered
profile, the README claims block; for a v1 profile ``gsae.claims`` (README table + SENSITIVITY.md)."""

from __future__ import annotations

import math
from pathlib import Path

from .. import claims, io, ledger, metrics
from ..config import Profile
from ..paths import ROOT, results_dir


def write_ledger(p: Profile, rows: list[dict], prereg_path: Path = ROOT / "prereg_v2.yaml") -> str:
    """Apply prereg v2 to ``rows``; write ledger.json (and the README block for the registered profile)."""
    from ..report import update_readme

    pre = ledger.load_prereg_v2(prereg_path)
    if p.name != pre.get("profile"):  # an unregistered profile (smoke_v2) is analysed on its own grid
        pre = {**pre, "primary_k": list(p.experiment.primary_k or p.experiment.k_grid),
               "k_grid": list(p.experiment.k_grid)}
    results = ledger.evaluate(pre, rows)
    table = ledger.render(results, pre)
    half = [r.half_width_pct for c in results if c.claim == "C1" for r in c.primary if r.test.startswith("delta_ce")]
    note = (f"\nC1 at k = {pre['primary_k']}: 95% half-width of the paired ΔCE difference = "
            + ", ".join("—" if math.isnan(h) else f"{h:.2f}%" for h in half)
            + f" of TopK's ΔCE (design target ≤ {100 * pre['power_target_half_width']:.1f}%).\n")
    io.write_json(results_dir(p) / "ledger.json", {
        "prereg_version": pre["version"], "claims": [c._asdict() | {"primary": [r._asdict() for r in c.primary],
                                                                     "curve": [r._asdict() for r in c.curve]}
                                                     for c in results]})
    if p.name == pre.get("profile"):
        update_readme(ROOT / "README.md", table + note)
    return table + note


def run(p: Profile, lm=None, progress: bool = True) -> str:
    """Make sure every SAE is evaluated, steered and probed, write metrics.jsonl, then the verdicts; returns the
    claims table (Markdown)."""
    from . import evaluate, load_lm, probe, steer
    from .train import all_specs

    lm = lm or load_lm(p, progress)
    specs = all_specs(p, lm)
    evaluate.evaluate_specs(p, lm, specs, "test", progress)
    steer.run_steering(p, lm, specs, progress)
    probe.run_probing(p, lm, specs, progress)
    path = metrics.write_metrics(p, lm, specs)
    if p.selection.protocol == "per_arm":
        return write_ledger(p, [r.row() for r in metrics.records(p, lm, specs)])
    if claims.main(["--profile", p.name]) != 0:
        raise RuntimeError(f"gsae.claims failed on {path}; its message above says what to fix")
    from ..report import verdict_for_profile

    return verdict_for_profile(p.name).claims_table
