"""The replication as stages, one module each: contexts -> harvest -> train -> evaluate -> steer -> probe ->
claims. Each module's ``run(p, lm=None)`` is what both its notebook and ``python -m gsae.pipeline STAGE --profile
P`` call; it reads the previous stage's outputs, writes its own (skipping what a manifest marks done, so a rerun
resumes) and returns them. ``load_lm`` is shared: pass its result to several stages to load the LM once.
"""

from __future__ import annotations

from typing import Any

from ..config import ConfigError, Profile
from ..paths import cache_dir

ORDER = ("contexts", "harvest", "train", "evaluate", "steer", "probe", "claims")
"""Stage names in dependency order (the CLI's choices)."""


def load_lm(p: Profile, progress: bool = True):
    """The profile's LM as ``gsae.models.LoadedModel``; also validates the layer and context length against it."""
    from .. import models

    kw: dict[str, Any] = {}
    if p.model.name == "tiny":
        kw = {"config": models.TinyLMConfig(corpus=p.data.corpus, split_fracs=p.data.split_fracs,
                                            split_seed=p.data.split_seed), "progress": progress,
              "data_dir": cache_dir() / "corpus"}
    lm = models.load_model(p.model.name, cache_dir=cache_dir() / "models", **kw)
    n_layers = lm.model.cfg.n_layers
    if not 0 <= p.model.layer < n_layers:
        raise ConfigError(f"layer {p.model.layer} is out of range for {p.model.name} ({n_layers} blocks); "
                          f"choose 0..{n_layers - 1} in profiles/{p.name}.yaml")
    if p.data.ctx_len > lm.model.cfg.n_ctx:
        raise ConfigError(f"data.ctx_len={p.data.ctx_len} exceeds the model's n_ctx={lm.model.cfg.n_ctx}")
    return lm


def run(stage: str, p: Profile, lm=None, progress: bool = True) -> Any:
    """Run one stage by name (the CLI's entry)."""
    import importlib

    if stage not in ORDER:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {ORDER}")
    return importlib.import_module(f"{__name__}.{stage}").run(p, lm, progress=progress)
