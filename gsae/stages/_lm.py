"""The profile's LM, loaded once and handed to every stage."""

from __future__ import annotations

from typing import Any

from .. import models
from ..config import ConfigError, Profile
from ..paths import cache_dir
from ..runtime import setup


def load_lm(p: Profile, progress: bool = True):
    """The profile's LM as ``gsae.models.LoadedModel`` on the profile's device (``runtime.device``, see
    ``gsae.runtime``); also validates the layer and context length against it. Every stage computes on the
    device of the LM it is given."""
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
