"""Stage ``full_test``: C1's co-primary metrics on every context of the test split (PREREG §4).

The ``evaluate`` stage splices every SAE into the LM on the test split's first ``eval.lm_contexts`` contexts (50 of
the default profile's 400). At that size a seed's paired ΔCE gain is mostly evaluation noise
(``docs/checks/eval_noise_check.txt``), so this stage scores the SAEs C1 decides on -- every group's SAEs at
``experiment.primary_k`` -- on all harvested test contexts, plain-encode only (no gradient, so no label at
inference). The splice rule, the massive-activation rule and the ablation baselines are ``evaluate``'s, on these
tokens. Per SAE it writes ``fulltest_test-<key>.json`` with ``delta_ce_all``, ``kl_all``, ``ce_loss_score_all``,
``ce_clean_all`` and ``n_lm_tokens_all``; ``stages.metrics`` picks them up like any other stage's metrics.

The stage is separate from ``evaluate`` so that its cached files (keyed by ``evaluate``'s code and settings) stay
valid: adding it recomputes nothing that was already measured."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .. import evals, io
from .. import lm as lm_passes
from ..config import Profile, config_hash
from ..paths import run_dir
from ..runtime import module_device
from ..specs import SAESpec, load_trained, sae_dir, source_version, stage_file
from . import evaluate

SUFFIX = "_all"
"""Appended to each metric name, so that the full-test numbers never mix with ``evaluate``'s subset numbers."""


def full_test_file(p: Profile) -> str:
    """Per-SAE result file name, keyed by the eval settings and by the code of this stage, ``evals``, ``lm`` and
    ``evaluate`` (whose ``eval_context`` gives the tokens, baselines and massive cap)."""
    return stage_file(p, "fulltest", "test", source_version(evals, lm_passes, evaluate, sys.modules[__name__]))


def c1_specs(p: Profile, specs: list[SAESpec]) -> list[SAESpec]:
    """The SAEs C1 decides on: those at ``experiment.primary_k`` in every group (the primary seeds, the length check
    and the robustness reruns); none when the profile sets no primary k or ``eval.full_test`` is off."""
    if not p.eval.full_test or not p.experiment.primary_k:
        return []
    return [s for s in specs if s.k in p.experiment.primary_k]


def encoders(p: Profile, spec: SAESpec) -> tuple[str, ...]:
    """The encoders ``spec`` is spliced with on every test context: ``eval.full_test_encoders`` for an arm whose code
    uses the gradient, plain-encode for one whose code ignores it."""
    return tuple(p.eval.full_test_encoders) if spec.arm_impl.has_gradient_encoder else ("plain",)


def section(r: Any) -> dict[str, float]:
    """One encoder's numbers (an ``evals`` fidelity result) under the stage's metric names."""
    numbers = {"delta_ce": r.delta_ce, "kl": r.kl, "ce_loss_score": r.recovered_zero, "ce_clean": r.ce_clean,
               "n_lm_tokens": r.n_tokens}
    return {f"{k}{SUFFIX}": v for k, v in numbers.items()}


def run_full_test(p: Profile, lm, specs: list[SAESpec], progress: bool = True) -> dict[str, dict[str, Any]]:
    """Score each of ``c1_specs(p, specs)`` on every test context (cached per SAE); returns {name: file contents}."""
    mh = lm.info["model_hash"]
    chosen, name = c1_specs(p, specs), full_test_file(p)
    todo = [s for s in chosen if not (sae_dir(p, s, mh) / name).exists()]
    if todo:
        tokens, base, _, cap = evaluate.eval_context(p, lm, "test", every_context=True, progress=progress)
        saes = {s.name: load_trained(p, s, mh, module_device(lm.model)) for s in todo}
        # The running sums survive a kill after every batch of contexts (the stage takes most of an hour on a
        # CPU). The file is keyed by this stage's code and settings and by the SAEs still to score; evals refuses
        # one whose SAE weights differ. A first run starts after the contexts ``evaluate`` already spliced these
        # SAEs into (the same batches, so the same sums) when its kept sums cover every one of them.
        ckpt_dir = run_dir(p) / "fulltest_checkpoints"
        res: dict[str, Any] = {}
        stems = []
        for group_modes in dict.fromkeys(encoders(p, s) for s in todo):  # one pass per set of encoders
            group = {s.name: saes[s.name] for s in todo if encoders(p, s) == group_modes}
            stem = f"{Path(name).stem}-{config_hash(sorted(group), group_modes, n=8)}.pt"
            res.update(evals.evaluate_saes(
                lm.model, group, tokens, p.model.hook_name, baselines=base, encode_modes=group_modes,
                batch_contexts=p.eval.batch_contexts, progress=progress,
                clean_above=cap if p.eval.massive == "clean" else None, checkpoint=ckpt_dir / stem,
                resume_from=sorted(evaluate.splice_sums_dir(p, "test").glob("*.pt"))))
            stems.append(stem)
        for s in todo:
            sections = {m: section(res[s.name][m]) for m in encoders(p, s)}
            if not s.arm_impl.has_gradient_encoder:  # its code ignores g: the same under every encoder
                sections = {m: sections["plain"] for m in evals.ALL_ENCODE_MODES}
            io.write_json(sae_dir(p, s, mh) / name, {"metrics": sections, "n_contexts": int(tokens.shape[0])})
        for stem in stems:  # every SAE's file is written
            (ckpt_dir / stem).unlink()
    return {s.name: io.read_json(sae_dir(p, s, mh) / name) for s in chosen}


def run(p: Profile, lm, specs: list[SAESpec], progress: bool = True) -> dict[str, Any]:
    """Score C1's SAEs on every test context."""
    return run_full_test(p, lm, specs, progress)
