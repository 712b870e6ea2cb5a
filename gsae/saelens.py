"""SAELens interop: the g-SAE as a registered SAELens architecture, and SAELens' on-disk format.

A TopK arm (beta = 0) is saved as SAELens' own ``"topk"`` architecture, so ``sae_lens.SAE.load_from_disk``
returns a stock ``TopKSAE``. A g-SAE (beta > 0) is saved as ``"gtopk"``: a ``TopKSAE`` subclass whose
``encode(x)`` is the plain-encode (TopK on z; SAELens has no slot for a gradient) and whose
``encode_with_grad(x, g)`` is the g-encode. Both write ``cfg.json`` + ``sae_weights.safetensors``.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, TopKSAE, TopKSAEConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.sae import SAEMetadata

from .config import SAEConfig
from .sae import GSAE

ARCHITECTURE = "gtopk"


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

    def _as_gsae(self) -> GSAE:
        return from_saelens(self)

    def encode_with_grad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        gsae = self._as_gsae()
        return gsae.to_dense(gsae.encode(x, g))


def register() -> None:
    """Register the "gtopk" architecture once (notebooks re-run cells; SAELens raises on re-registration)."""
    if ARCHITECTURE not in SAE_CLASS_REGISTRY:
        register_sae_class(ARCHITECTURE, GTopKSAE, GTopKSAEConfig)


register()


def to_saelens(sae: GSAE, metadata: dict[str, Any] | None = None) -> TopKSAE:
    """An equivalent SAELens SAE (``TopKSAE`` if beta == 0, else ``GTopKSAE``) sharing no storage with ``sae``."""
    c = sae.cfg
    common = dict(d_in=c.d_in, d_sae=c.d_sae, k=c.k, dtype="float32", device="cpu", apply_b_dec_to_input=True,
                  normalize_activations="none", rescale_acts_by_decoder_norm=False,
                  metadata=SAEMetadata(**(metadata or {})))
    if c.beta == 0:
        out: TopKSAE = TopKSAE(TopKSAEConfig(**common))
    else:
        out = GTopKSAE(GTopKSAEConfig(**common, beta=c.beta, value_mode=c.value_mode, grad_norm=c.grad_norm,
                                      grad_scale=c.grad_scale))
    out.load_state_dict({k: v.detach().clone() for k, v in sae.state_dict().items()})
    return out


def from_saelens(sl: SAE) -> GSAE:
    """A ``GSAE`` from a SAELens ``TopKSAE`` / ``GTopKSAE`` (anything else is refused, with the reason)."""
    if not isinstance(sl, TopKSAE):
        raise TypeError(f"expected a SAELens TopKSAE or GTopKSAE, got {type(sl).__name__}")
    c = sl.cfg
    if not c.apply_b_dec_to_input or c.normalize_activations != "none" or c.rescale_acts_by_decoder_norm:
        raise ValueError("only TopK SAEs with apply_b_dec_to_input=True, normalize_activations='none' and "
                         "rescale_acts_by_decoder_norm=False map onto gsae.GSAE")
    extra = {f: getattr(c, f) for f in ("beta", "value_mode", "grad_norm", "grad_scale") if hasattr(c, f)}
    sae = GSAE(SAEConfig(d_in=c.d_in, d_sae=c.d_sae, k=c.k, **extra))
    sae.load_state_dict({k: v.detach().to(torch.float32).clone() for k, v in sl.state_dict().items()})
    return sae


def save_sae(sae: GSAE, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` into ``path`` atomically (temp dir, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        to_saelens(sae, metadata).save_model(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def load_sae(path: str | Path) -> GSAE:
    """Load an SAE written by ``save_sae`` (or any SAELens TopK SAE directory) as a ``GSAE``."""
    path = Path(path)
    if not (path / "cfg.json").exists():
        raise FileNotFoundError(f"{path} has no cfg.json: not a SAELens SAE directory (train the SAE first)")
    return from_saelens(SAE.load_from_disk(path))
