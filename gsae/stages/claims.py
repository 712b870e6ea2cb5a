"""Stage ``claims``: the one writer of ``results/<profile>/metrics.jsonl`` (``gsae.metrics``), then the
pre-registered verdicts (``gsae.claims``): the README claims table (registered profile) and SENSITIVITY.md."""

from __future__ import annotations

from pathlib import Path

from .. import claims, metrics
from ..config import Profile


def run(p: Profile, lm=None, progress: bool = True) -> Path:
    """Make sure every SAE is evaluated, steered and probed, write metrics.jsonl, then the verdicts."""
    from . import evaluate, load_lm, probe, steer
    from .train import all_specs

    lm = lm or load_lm(p, progress)
    specs = all_specs(p, lm)
    evaluate.evaluate_specs(p, lm, specs, "test", progress)
    steer.run_steering(p, lm, specs, progress)
    probe.run_probing(p, lm, specs, progress)
    path = metrics.write_metrics(p, lm, specs)
    if claims.main(["--profile", p.name]) != 0:
        raise RuntimeError(f"gsae.claims failed on {path}; its message above says what to fix")
    return path
