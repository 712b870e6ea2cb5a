"""Stage ``claims``: the one writer of ``results/<profile>/metrics.jsonl`` (``stages.metrics``), then the
pre-registered verdicts: ``prereg.yaml`` applied by ``analysis.ledger`` and rendered by ``analysis.report`` into
``ledger.json`` and ``claims.md`` beside the metrics and, for the registered profile, the README's answer and
claims table. ``check`` says whether those generated files match the committed metrics, without an LM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .. import io, paths
from ..analysis import ledger, readme, report
from ..analysis.rows import TREATMENT, load_metrics
from ..config import Profile
from ..paths import results_dir
from ..specs import SAESpec, length_group, threads_group
from . import metrics
from .selection import relative_change

PREREG = "prereg.yaml"
"""The registered pre-registration (PREREG.md in words), under the repository root."""
SUPERSEDED = "docs/prereg/v4.yaml"
"""The version PREREG v5 §8 required C1 to be read under as well (one line of the ledger); v6 requires none."""
README = "README.md"
"""Paths are resolved under ``paths.ROOT`` when used, never at import (a test may point ROOT elsewhere)."""


def _at_root(rel: str | Path | None, default: str) -> Path:
    return paths.ROOT / (default if rel is None else rel)


def prereg_for(p: Profile, path: Path | None = None) -> dict[str, Any]:
    """The pre-registration as it applies to ``p`` (``report.prereg_for``)."""
    variants = tuple(v for v in (threads_group(p), length_group(p)) if v)
    return report.prereg_for(p.name, list(p.experiment.primary_k or p.experiment.k_grid), list(p.experiment.k_grid),
                             length_group(p), p.variants.length_multiplier, list(p.variants.length_seeds),
                             ledger.load_prereg(_at_root(path, PREREG)), variants)


def _d_sae(p: Profile) -> int | None:
    """The dictionary size, from the provenance the metrics were written with (d_model x expansion)."""
    path = results_dir(p) / "provenance.json"
    if not path.exists():
        return None
    return int(io.read_json(path)["model"]["d_model"]) * p.experiment.expansion


def analyse(p: Profile, rows: list[dict], prereg_path: Path | None = None) -> report.Report:
    """The verdicts of ``rows`` under the registered pre-registration, rendered; writes nothing."""
    pre = prereg_for(p, prereg_path)
    superseded = _at_root(None, SUPERSEDED)
    old = yaml.safe_load(superseded.read_text()) if superseded.exists() and pre["version"] < 6 else {}
    conv_path = results_dir(p) / "convergence.json"
    conv_cfg = pre.get("convergence", {})
    conv = report.convergence_note(io.read_json(conv_path) if conv_path.exists() else None,
                                   float(conv_cfg.get("max_rel_change", 0.02)), relative_change)
    return report.build(pre, rows, d_sae=_d_sae(p), convergence=conv, chosen_beta=chosen_beta(p),
                        superseded=report.superseded_note(p.name, rows, old, SUPERSEDED) if old else "")


def chosen_beta(p: Profile) -> float | None:
    """The g-SAE's beta chosen on validation (results/<profile>/beta_selection.json), None without a dose-response."""
    path = results_dir(p) / "beta_selection.json"
    if not p.experiment.dose_seeds or not path.exists():
        return None
    rec = io.read_json(path)["arms"].get(TREATMENT)
    return None if rec is None else float(rec["beta"])


def _is_registered(p: Profile, prereg_path: Path | None = None) -> bool:
    return p.name == ledger.load_prereg(_at_root(prereg_path, PREREG)).get("profile")


def write(p: Profile, rep: report.Report, prereg_path: Path | None = None) -> None:
    """ledger.json and claims.md beside the metrics; the README's answer and claims table for the registered
    profile."""
    io.write_json(results_dir(p) / "ledger.json", rep.record)
    with io.atomic_path(results_dir(p) / "claims.md") as tmp:
        tmp.write_text(rep.ledger_md)
    if _is_registered(p, prereg_path):
        readme.update(_at_root(None, README), "answer", rep.answer)
        readme.update(_at_root(None, README), "claims", rep.claims_table)


def rewrite(p: Profile, prereg_path: Path | None = None) -> report.Report:
    """``write`` from the committed metrics.jsonl (no LM): regenerates ledger.json, claims.md and the README blocks."""
    rep = analyse(p, load_metrics(results_dir(p) / "metrics.jsonl"), prereg_path)
    write(p, rep, prereg_path)
    return rep


def check(p: Profile, prereg_path: Path | None = None) -> list[str]:
    """Diffs between the committed generated text (README blocks, claims.md) and what the committed metrics give;
    empty when everything is up to date."""
    rep = analyse(p, load_metrics(results_dir(p) / "metrics.jsonl"), prereg_path)
    diffs = []
    if _is_registered(p, prereg_path):
        path = _at_root(None, README)
        diffs += [readme.stale_diff(path, "answer", rep.answer), readme.stale_diff(path, "claims",
                                                                                     rep.claims_table)]
    md = results_dir(p) / "claims.md"
    if not md.exists() or md.read_text() != rep.ledger_md:
        diffs.append(f"{md.relative_to(paths.ROOT)} is missing or out of date")
    return [d for d in diffs if d]


def run(p: Profile, lm, specs: list[SAESpec], progress: bool = True) -> report.Report:
    """metrics.jsonl from every stage's per-SAE files (``stages.run`` runs evaluate, full_test, steer and probe
    first), then the verdicts; returns the report."""
    metrics.write_metrics(p, lm, specs)
    rows = [r.row() for r in metrics.records(p, lm, specs)]
    rep = analyse(p, rows)
    write(p, rep)
    return rep
