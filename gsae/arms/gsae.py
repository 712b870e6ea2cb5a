"""g-SAE (Olmo et al., arXiv 2411.10397): TopK whose k latents are chosen by s = z + beta z |W_dec g|.

The module is ``gsae.sae.GSAE`` (beta > 0). It is saved as the SAELens architecture ``"gtopk"``: a ``TopKSAE``
subclass whose ``encode(x)`` is the plain-encode (TopK on z; SAELens has no slot for a gradient) and whose
``encode_with_grad(x, g)`` is the g-encode. Loading it needs only ``import gsae.arms`` (which registers it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import SAE, TopKSAE, TopKSAEConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from torch import nn

from ..config import SAEConfig
from ..saelens import gsae_from_topk_saelens, topk_saelens_fields
from . import Arm, register

ARCHITECTURE = "gtopk"
GRADIENT_FIELDS = ("beta", "value_mode", "grad_norm", "grad_scale")
"""The ``SAEConfig`` fields a g-SAE adds to TopK, stored in its SAELens cfg.json."""


@dataclass
class GTopKSAEConfig(TopKSAEConfig):
    """SAELens config of a g-SAE: TopK plus the gradient-selection settings (see gsae.config.SAEConfig)."""

    beta: float = 0.0
    value_mode: str = "z"
    grad_norm: str = "dataset"
    grad_scale: float = 1.0

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


class GTopKSAE(TopKSAE):
    """SAELens view of a g-SAE. ``encode`` = plain-encode; ``encode_with_grad`` = g-encode."""

    cfg: GTopKSAEConfig  # type: ignore[assignment]

    def encode_with_grad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        gsae = GSAEArm().from_saelens(self)
        return gsae.to_dense(gsae.encode(x, g))


if ARCHITECTURE not in SAE_CLASS_REGISTRY:  # SAELens raises on re-registration (notebooks re-import)
    register_sae_class(ARCHITECTURE, GTopKSAE, GTopKSAEConfig)


class GSAEArm(Arm):
    name = "gsae"
    label = "g-SAE"
    color = "#d62728"
    architecture = ARCHITECTURE
    hyperparameters = ("beta",)
    has_gradient_encoder = True
    sensitivity_variants = {"value_mode_score": {"value_mode": "score"}, "grad_norm_token": {"grad_norm": "token"}}

    def make_config(self, **fields: Any) -> SAEConfig:
        if not fields.get("beta", 0.0) > 0:
            raise ValueError(f"a g-SAE needs beta > 0 (beta = 0 is the TopK arm), got {fields.get('beta')}")
        return SAEConfig(**fields)

    def hyperparameter_grid(self, experiment: Any) -> dict[str, tuple[float, ...]]:
        return {"beta": tuple(experiment.beta_grid)}

    def to_saelens(self, sae: nn.Module, metadata: dict[str, Any] | None = None) -> GTopKSAE:
        own = {f: getattr(sae.cfg, f) for f in GRADIENT_FIELDS}
        out = GTopKSAE(GTopKSAEConfig(**topk_saelens_fields(sae.cfg, metadata), **own))
        out.load_state_dict({k: v.detach().clone() for k, v in sae.state_dict().items()})
        return out

    def from_saelens(self, sl: SAE) -> nn.Module:
        return gsae_from_topk_saelens(sl, self.build, **{f: getattr(sl.cfg, f) for f in GRADIENT_FIELDS})


class LabelFreeGSAEArm(GSAEArm):
    """The g-SAE trained and encoded with the label-free gradient (the CE against the model's own argmax), so no
    next token is needed at training or inference. Same module and SAELens format as the g-SAE (it loads back as
    one); only the gradient it is fed differs."""

    name = "gsae_free"
    label = "g-SAE (label-free)"
    color = "#9467bd"
    gradient = "g_free"
    sensitivity_variants = {}


register(GSAEArm())
register(LabelFreeGSAEArm())
