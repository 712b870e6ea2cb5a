"""Start a profile's caches from another profile's: ``python -m gsae.pipeline adopt --profile P --from SOURCE``.

A profile that repeats part of another (``robustness`` retrains the default study's primary group on one thread
and at twice the length; ``kl`` trains KL fine-tuned arms beside the same TopK and g-SAE) would otherwise harvest
the same text again and retrain SAEs that already exist. Every cache under ``runs/<profile>/`` is named by config
hashes and SAE names, and every stage re-checks what it reuses (a harvest by its plan hash, an SAE by its SAE and
training configs, a cached metric by its code and settings), so the source's caches can serve as they are: each
is linked in whole (hard links, copies across file systems) only where the target has nothing of that name, and
nothing of the source changes. The source's selection and convergence records are copied when both profiles
select the same way (so the target trains at the same learning rates); the beta selection only when the whole
experiment is the same. Each adopted thing is one ``adopted`` line in the target's runs registry.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from .config import ConfigError, Profile
from .io import registry_append
from .paths import ROOT, results_dir, run_dir

SAME = ("model", "data", "harvest", "eval")
"""Sections that must be equal: the harvest and contexts they key, and the rules training and evaluation share
(a KL fine-tune splices with the evaluation's massive-activation rule, which no SAE manifest records)."""

NOT_ADOPTED = ("notebooks",)
"""Run-directory entries that belong to one run, never to another profile."""


def _selects_alike(a: Profile, b: Profile) -> bool:
    """Whether ``selection.json`` / ``convergence.json`` of ``a`` hold what ``b``'s selection would compute: the
    same trials (selection section, arms, selection k, the first beta) trained the same way (train section)."""
    key = lambda p: (p.selection, p.train, p.experiment.arms, p.experiment.beta_select_k,  # noqa: E731
                     p.experiment.beta_grid[:1])
    return key(a) == key(b)


def records_to_copy(target: Profile, source: Profile) -> tuple[str, ...]:
    """The source's records the target takes over (``pipeline.SELECTION_RECORDS``, by the rules above)."""
    if not _selects_alike(target, source):
        return ()
    same_betas = target.experiment == source.experiment
    return ("selection.json", "convergence.json") + (("beta_selection.json",) if same_betas else ())


def units(source_run: Path) -> list[Path]:
    """What is adopted whole, relative to the run directory: each SAE directory (saes/<hash>/<group>/<name>) and
    every other top-level entry (contexts, harvest, splice sums, ...)."""
    out = []
    for entry in sorted(source_run.iterdir()):
        if entry.name in NOT_ADOPTED:
            continue
        if entry.name == "saes" and entry.is_dir():
            out += [d.relative_to(source_run) for d in sorted(entry.glob("*/*/*")) if d.is_dir()]
        else:
            out.append(entry.relative_to(source_run))
    return out


def _link_tree(src: Path, dst: Path) -> None:
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:  # another file system, or links not allowed: a copy serves as well
            shutil.copy2(a, b)

    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link, symlinks=False)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        link(str(src), str(dst))


def adopt(target: Profile, source: Profile) -> dict[str, Any]:
    """Link ``source``'s caches into ``target``'s run directory and copy the records it may share; returns counts
    of what was adopted and kept."""
    if target.name == source.name:
        raise ConfigError(f"adopt needs two profiles; --from names {source.name}, the profile itself")
    differ = [s for s in SAME if getattr(target, s) != getattr(source, s)]
    if differ:
        raise ConfigError(f"profiles {target.name} and {source.name} differ in {', '.join(differ)}: their caches "
                          f"are not interchangeable, so nothing was adopted; run {target.name} from its own caches")
    src_run, dst_run = run_dir(source), run_dir(target)
    if not src_run.is_dir():
        raise ConfigError(f"{src_run} does not exist: run profile {source.name} first (./run_all.sh --profile "
                          f"{source.name}), or run {target.name} from its own caches")
    done = {"adopted": 0, "kept": 0, "records": []}
    for rel in units(src_run):
        if (dst_run / rel).exists():
            done["kept"] += 1
            continue
        tmp = (dst_run / rel).with_name(f".adopting-{rel.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        _link_tree(src_run / rel, tmp)
        tmp.rename(dst_run / rel)  # whole or not at all: a stage never sees half a directory
        registry_append(target, {"event": "adopted", "from": source.name, "path": rel.as_posix()})
        done["adopted"] += 1
    for name in records_to_copy(target, source):
        src, dst = results_dir(source) / name, results_dir(target) / name
        if src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            registry_append(target, {"event": "adopted", "from": source.name, "record": name})
            done["records"].append(name)
    return done


def describe(done: dict[str, Any], target: Profile, source: Profile) -> str:
    records = ", ".join(done["records"]) or "none"
    where = run_dir(target).relative_to(ROOT).as_posix()
    return (f"adopted from {source.name} into {where}: {done['adopted']} caches linked, {done['kept']} "
            f"already there kept; records copied: {records}")


__all__ = ["adopt", "describe", "records_to_copy", "units"]
