"""The replication as stages, one module each: contexts -> harvest -> train -> evaluate -> full_test -> steer ->
probe -> release -> claims. ``run(stage, p)`` is what both the notebooks and ``python -m gsae.pipeline STAGE
--profile P`` call: it loads the LM once (or takes the one given), runs the stages the given one reads from when it
needs them, and hands each stage what the earlier ones produced (the trained grid's ``specs``). Every stage reads the
previous stages' outputs, writes its own (skipping what a manifest marks done, so a rerun resumes) and returns them.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Iterator
from typing import Any

from .. import distributed
from ..config import ConfigError, Profile
from ._lm import load_lm

ORDER = ("contexts", "harvest", "train", "evaluate", "full_test", "steer", "probe", "release", "claims")
"""Stage names in dependency order (the CLI's choices)."""

ON_GRID = ("evaluate", "full_test", "steer", "probe", "release", "claims")
"""Stages that receive the trained grid's specs (``selection.all_specs``)."""

NEEDS = {"claims": ("evaluate", "full_test", "steer", "probe")}
"""Stages whose per-SAE files a stage reads; ``run`` runs them first (each skips what is already done)."""

SPREAD = ("harvest", "train")
"""Stages that split their work over the ranks of a torchrun launch; the others run in one process."""

__all__ = ["NEEDS", "ON_GRID", "ORDER", "SPREAD", "load_lm", "run"]


def run(stage: str, p: Profile, lm=None, progress: bool = True) -> Any:
    """Run one stage by name and return its result. Under torchrun only the stages in ``SPREAD`` run; the others
    are refused (they would train missing SAEs on rank 0 alone, out of step with the other ranks' collectives)."""
    if stage not in ORDER:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {ORDER}")
    if stage not in SPREAD and distributed.current().world_size > 1:
        raise ConfigError(f"stage {stage!r} does not spread over processes; run it without torchrun "
                          f"(python -m gsae.pipeline {stage} --profile {p.name}); torchrun runs {SPREAD}")
    with distributed.main_first():  # rank 0 loads (and on first use converts) the LM first
        lm = lm or load_lm(p, progress)
    module = importlib.import_module(f"{__name__}.{stage}")
    with timed(p, stage, lm):
        if stage not in ON_GRID:
            return module.run(p, lm, progress=progress)
        from .selection import all_specs

        specs = all_specs(p, lm)
        for needed in NEEDS.get(stage, ()):
            importlib.import_module(f"{__name__}.{needed}").run(p, lm, specs, progress=progress)
        return module.run(p, lm, specs, progress=progress)


@contextlib.contextmanager
def timed(p: Profile, stage: str, lm) -> Iterator[None]:
    """Record a finished stage in the runs registry (``results/<profile>/runs.jsonl``): its wall seconds and
    device, and on a GPU the peak memory torch allocated there during it (``pipeline.summary`` prints them)."""
    import torch

    from ..io import registry_append
    from ..runtime import module_device

    device = module_device(lm.model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    yield
    event = {"event": "stage_done", "stage": stage, "seconds": round(time.perf_counter() - started, 1),
             "device": str(device)}
    if device.type == "cuda":
        event["peak_device_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if distributed.is_main():
        registry_append(p, event)
