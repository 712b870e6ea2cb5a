"""SAELens interop: save any registered arm in SAELens' on-disk format and load it back through the registry.

``save_sae(arm, sae, path)`` writes ``cfg.json`` + ``sae_weights.safetensors`` (the arm's ``to_saelens``), so
``sae_lens.SAE.load_from_disk(path)`` works once ``gsae.arms`` is imported; ``load_sae(path)`` reads the
architecture from cfg.json and returns the arm's own module (``from_saelens``). The helpers below are shared by
the arms built on ``gsae.sae.GSAE`` (TopK-family SAELens classes).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, TopKSAE
from sae_lens.saes.sae import SAEMetadata
from torch import nn

from .config import SAEConfig


def topk_saelens_fields(cfg: SAEConfig, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SAELens ``TopKSAEConfig`` fields of a ``GSAE`` (b_dec subtracted from the input, no normalisation)."""
    return dict(d_in=cfg.d_in, d_sae=cfg.d_sae, k=cfg.k, dtype="float32", device="cpu", apply_b_dec_to_input=True,
                normalize_activations="none", rescale_acts_by_decoder_norm=False,
                metadata=SAEMetadata(**(metadata or {})))


def gsae_from_topk_saelens(sl: SAE, build: Callable[[SAEConfig], nn.Module], **extra: Any) -> nn.Module:
    """A module built by ``build(SAEConfig)`` holding the weights of a SAELens ``TopKSAE`` (or subclass)."""
    if not isinstance(sl, TopKSAE):
        raise TypeError(f"expected a SAELens TopKSAE (or subclass), got {type(sl).__name__}")
    c = sl.cfg
    if not c.apply_b_dec_to_input or c.normalize_activations != "none" or c.rescale_acts_by_decoder_norm:
        raise ValueError("only TopK SAEs with apply_b_dec_to_input=True, normalize_activations='none' and "
                         "rescale_acts_by_decoder_norm=False map onto gsae.GSAE")
    sae = build(SAEConfig(d_in=c.d_in, d_sae=c.d_sae, k=c.k, **extra))
    sae.load_state_dict({k: v.detach().to(torch.float32).clone() for k, v in sl.state_dict().items()})
    return sae


def save_sae(arm: Any, sae: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` into ``path`` atomically (temp dir, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        arm.to_saelens(sae, metadata).save_model(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def saved_architecture(path: str | Path) -> str:
    path = Path(path)
    if not (path / "cfg.json").exists():
        raise FileNotFoundError(f"{path} has no cfg.json: not a SAELens SAE directory (train the SAE first)")
    return json.loads((path / "cfg.json").read_text())["architecture"]


def load_sae(path: str | Path) -> nn.Module:
    """Load an SAE written by ``save_sae`` (or any SAELens SAE of a registered arm's architecture) as the arm's
    own module."""
    from . import arms

    arm = arms.by_architecture(saved_architecture(path))
    return arm.from_saelens(SAE.load_from_disk(Path(path)))
