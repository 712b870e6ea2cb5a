"""The replication as stages, one module each: contexts -> harvest -> train -> evaluate -> steer -> probe ->
claims. Each module's ``run(p, lm=None)`` is what both its notebook and ``python -m gsae.pipeline STAGE --profile
P`` call; it reads the previous stage's outputs, writes its own (skipping what a manifest marks done, so a rerun
resumes) and returns them. ``load_lm`` is shared: pass its result to several stages to load the LM once.
"""

from __future__ import annotations

from typing import Any

from ..config import ConfigError, Profile
from ..paths import cache_dir

ORDER = ("contexts", "harvest", "train", "evaluate", "full_test", "steer", "probe", "claims")
"""Stage names in dependency order (the CLI's choices)."""


def load_lm(p: Profile, progress: bool = True):
    """The profile's LM as ``gsae.models.LoadedModel`` on the profile's device (``runtime.device``, see
    ``gsae.runtime``); also validates the layer and context length against it. Every stage computes on the
    device of the LM it is given."""
    from .. import models
    from ..runtime import setup

    device = setup(p)
    kw: dict[str, Any] = {}
    if p.model.name == "tiny":
        kw = {"config": models.TinyLMConfig(corpus=p.data.corpus, split_fracs=p.data.split_fracs,
                                            split_seed=p.data.split_seed), "progress": progress,
              "data_dir": cache_dir() / "corpus"}
    if p.model.name == "gpt2":
        kw = {"device": str(device)}
    lm = models.load_model(p.model.name, cache_dir=cache_dir() / "models", **kw)
    if device.type != "cpu":
        lm.model.to(device, print_details=False)
    n_layers = lm.model.cfg.n_layers
    if not 0 <= p.model.layer < n_layers:
        raise ConfigError(f"layer {p.model.layer} is out of range for {p.model.name} ({n_layers} blocks); "
                          f"choose 0..{n_layers - 1} in profiles/{p.name}.yaml")
    if p.data.ctx_len > lm.model.cfg.n_ctx:
        raise ConfigError(f"data.ctx_len={p.data.ctx_len} exceeds the model's n_ctx={lm.model.cfg.n_ctx}")
    return lm


SPREAD = ("harvest", "train")
"""Stages that split their work over the ranks of a torchrun launch; the others run in one process."""


def run(stage: str, p: Profile, lm=None, progress: bool = True) -> Any:
    """Run one stage by name (the CLI's entry). Under torchrun only the stages in ``SPREAD`` run; the others are
    refused (they would train missing SAEs on rank 0 alone, out of step with the other ranks' collectives)."""
    import importlib

    from .. import distributed

    if stage not in ORDER:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {ORDER}")
    if stage not in SPREAD and distributed.current().world_size > 1:
        raise ConfigError(f"stage {stage!r} does not spread over processes; run it without torchrun "
                          f"(python -m gsae.pipeline {stage} --profile {p.name}); torchrun runs {SPREAD}")
    return importlib.import_module(f"{__name__}.{stage}").run(p, lm, progress=progress)
