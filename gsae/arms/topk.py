"""TopK SAE (Gao et al. 2024): the k largest pre-activations z = W_enc(x - b_dec) + b_enc are kept.

It is gsae's ``GSAE`` module with beta = 0 (the gradient never enters the selection), saved as SAELens' own
``"topk"`` architecture (metadata ``arm: "topk"``), so ``sae_lens.SAE.load_from_disk`` returns a stock
``TopKSAE``."""

from __future__ import annotations

from typing import Any

from sae_lens import SAE, TopKSAE, TopKSAEConfig
from torch import nn

from ..config import SAEConfig
from .registry import Arm, register
from .saelens import gsae_from_topk_saelens, topk_saelens_fields


class TopKArm(Arm):
    name = "topk"
    label = "TopK"
    color = "#444444"
    architecture = "topk"

    def make_config(self, **fields: Any) -> SAEConfig:
        if fields.get("beta", 0.0) != 0.0:
            raise ValueError("the TopK arm has no beta (it is the g-SAE's beta = 0); drop it or use arm 'gsae'")
        return SAEConfig(**{**fields, "beta": 0.0})

    def to_saelens(self, sae: nn.Module, metadata: dict[str, Any] | None = None) -> TopKSAE:
        out = TopKSAE(TopKSAEConfig(**topk_saelens_fields(sae.cfg, {**(metadata or {}), "arm": self.name})))
        out.load_state_dict({k: v.detach().clone() for k, v in sae.state_dict().items()})
        return out

    def from_saelens(self, sl: SAE) -> nn.Module:
        return gsae_from_topk_saelens(sl, self.build)


register(TopKArm())
