"""g-SAE (Olmo et al., arXiv 2411.10397): TopK whose k latents are chosen by s = z + beta z |W_dec g|.

The module is ``gsae.sae.GSAE`` (beta > 0). Its plain-encode (no gradient) is exactly a TopK SAE, so it is saved
as SAELens' own ``"topk"`` architecture: stock ``sae_lens.SAE.load_from_disk`` returns a ``TopKSAE`` whose
``encode(x)`` is the plain-encode, without gsae. The gradient settings the g-encode needs (``GRADIENT_FIELDS``:
beta, value_mode, grad_norm, grad_scale) and ``arm: "gsae"`` are entries of the cfg.json metadata; gsae's loaders
(``gsae.load_pretrained``, ``gsae.arms.saelens.load_saelens``) return a ``GTopKSAE``, the same TopKSAE plus
``encode_with_grad(x, g)``, the g-encode. Earlier versions saved a g-SAE as the architecture ``"gtopk"`` with
these fields at the top level of cfg.json; such directories still load (``upgrade_cfg``)."""

from __future__ import annotations

from typing import Any

import torch
from sae_lens import SAE, TopKSAE, TopKSAEConfig
from torch import nn

from ..config import SAEConfig
from .registry import Arm, register
from .saelens import gsae_from_topk_saelens, topk_saelens_fields

ARCHITECTURE = "topk"
LEGACY_ARCHITECTURE = "gtopk"
"""What a g-SAE's cfg.json named as its architecture before it was saved as SAELens' stock "topk"."""
GRADIENT_FIELDS = ("beta", "value_mode", "grad_norm", "grad_scale")
"""The ``SAEConfig`` fields a g-SAE adds to TopK, stored in its cfg.json metadata."""


def gradient_settings(sl: SAE) -> dict[str, Any]:
    """The g-SAE's ``GRADIENT_FIELDS`` from the metadata of SAELens SAE ``sl`` (a clear error if any is missing)."""
    meta = sl.cfg.metadata
    missing = [f for f in GRADIENT_FIELDS if f not in meta]
    if missing:
        raise ValueError(f"this SAELens SAE's metadata lacks the g-SAE setting(s) {missing}: it was not saved by "
                         f"gsae's g-SAE arm (its encode is a plain TopK; there is no g-encode to rebuild)")
    return {f: meta[f] for f in GRADIENT_FIELDS}


class GTopKSAE(TopKSAE):
    """SAELens view of a g-SAE: a stock ``TopKSAE`` (``encode`` = plain-encode, ``save_model`` writes a stock
    "topk" directory) plus ``encode_with_grad``, the g-encode, with the settings in ``cfg.metadata``."""

    def encode_with_grad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] latent activations chosen with the gradient ``g`` (d loss / d x at the hook, unscaled;
        ``metadata.grad_scale`` is applied inside)."""
        gsae = GSAEArm().from_saelens(self)
        return gsae.to_dense(gsae.encode(x, g))


class GSAEArm(Arm):
    name = "gsae"
    label = "g-SAE"
    color = "#d62728"
    architecture = ARCHITECTURE
    legacy_architectures = (LEGACY_ARCHITECTURE,)
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
        own = {"arm": self.name, **{f: getattr(sae.cfg, f) for f in GRADIENT_FIELDS}}
        out = GTopKSAE(TopKSAEConfig(**topk_saelens_fields(sae.cfg, {**(metadata or {}), **own})))
        out.load_state_dict({k: v.detach().clone() for k, v in sae.state_dict().items()})
        return out

    def from_saelens(self, sl: SAE) -> nn.Module:
        return gsae_from_topk_saelens(sl, self.build, **gradient_settings(sl))

    def saelens_view(self, sl: SAE) -> GTopKSAE:
        if isinstance(sl, GTopKSAE):
            return sl
        if type(sl) is not TopKSAE:
            raise TypeError(f"a g-SAE loads as a SAELens TopKSAE, got {type(sl).__name__}")
        gradient_settings(sl)  # refuse a plain TopK here, not at the first encode_with_grad
        view = GTopKSAE(sl.cfg, use_error_term=sl.use_error_term)
        view.load_state_dict(sl.state_dict(), assign=True)  # the same tensors, no copy
        return view

    def upgrade_cfg(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """A legacy "gtopk" cfg.json as the current "topk" one: the gradient fields move into the metadata (which
        keeps its ``arm``, e.g. "gsae_free", or gets this arm's name)."""
        if cfg.get("architecture") != LEGACY_ARCHITECTURE:
            return cfg
        meta = dict(cfg.get("metadata") or {})
        meta.setdefault("arm", self.name)
        meta.update({f: cfg[f] for f in GRADIENT_FIELDS if f in cfg})
        return {**{k: v for k, v in cfg.items() if k not in GRADIENT_FIELDS}, "architecture": ARCHITECTURE,
                "metadata": meta}


class LabelFreeGSAEArm(GSAEArm):
    """The g-SAE trained and encoded with the label-free gradient (the CE against the model's own argmax), so no
    next token is needed at training or inference. Same module and SAELens format as the g-SAE (its metadata's
    ``arm`` is "gsae_free"); only the gradient it is fed differs."""

    name = "gsae_free"
    label = "g-SAE (label-free)"
    color = "#9467bd"
    gradient = "g_free"
    sensitivity_variants = {}


register(GSAEArm())
register(LabelFreeGSAEArm())
