"""SAELens interop: save any registered arm in SAELens' on-disk format and load it back through the registry.

``save_sae(arm, sae, path)`` writes ``cfg.json`` + ``sae_weights.safetensors`` (the arm's ``to_saelens``). The
built-in arms write SAELens' own ``"topk"`` architecture, so stock ``sae_lens.SAE.load_from_disk(path)`` loads
them without gsae; the arm's name and its own settings (the g-SAE's beta, ...) are entries of the cfg.json
metadata. ``load_sae(path)`` picks the arm from the architecture and the metadata's ``arm`` entry
(``registry.by_architecture``) and returns the arm's own module (``from_saelens``); ``load_saelens(path)`` returns
the SAELens SAE (with the arm's extra methods, ``Arm.saelens_view``). Directories an arm wrote in an earlier
format (the g-SAE's ``"gtopk"``, in trained-SAE caches under runs/) are read through ``Arm.upgrade_cfg``, so they
load unchanged. The helpers below are shared by the arms built on ``gsae.sae.GSAE`` (TopK-family SAELens classes).
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

from ..config import SAEConfig
from .registry import Arm, by_architecture

CFG_FILE = "cfg.json"


def topk_saelens_fields(cfg: SAEConfig, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SAELens ``TopKSAEConfig`` fields of a ``GSAE`` (b_dec subtracted from the input, no normalisation)."""
    return dict(d_in=cfg.d_in, d_sae=cfg.d_sae, k=cfg.k, dtype="float32", device="cpu", apply_b_dec_to_input=True,
                normalize_activations="none", rescale_acts_by_decoder_norm=False,
                metadata=SAEMetadata(**(metadata or {})))


def gsae_from_topk_saelens(sl: SAE, build: Callable[[SAEConfig], nn.Module], **extra: Any) -> nn.Module:
    """A module built by ``build(SAEConfig)`` holding the weights of a SAELens ``TopKSAE`` (or subclass), in
    float32 on ``sl``'s device."""
    if not isinstance(sl, TopKSAE):
        raise TypeError(f"expected a SAELens TopKSAE (or subclass), got {type(sl).__name__}")
    c = sl.cfg
    if not c.apply_b_dec_to_input or c.normalize_activations != "none" or c.rescale_acts_by_decoder_norm:
        raise ValueError("only TopK SAEs with apply_b_dec_to_input=True, normalize_activations='none' and "
                         "rescale_acts_by_decoder_norm=False map onto gsae.GSAE")
    sae = build(SAEConfig(d_in=c.d_in, d_sae=c.d_sae, k=c.k, **extra))
    sae.load_state_dict({k: v.detach().to(torch.float32).clone() for k, v in sl.state_dict().items()})
    return sae.to(sl.W_enc.device)


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


def read_cfg(path: str | Path) -> dict[str, Any]:
    """The cfg.json of SAELens directory ``path``, as written (a clear error when there is none)."""
    path = Path(path)
    if not (path / CFG_FILE).exists():
        raise FileNotFoundError(f"{path} has no cfg.json: not a SAELens SAE directory (train the SAE first)")
    return json.loads((path / CFG_FILE).read_text())


def saved_architecture(path: str | Path) -> str:
    return read_cfg(path)["architecture"]


def saved_arm(path: str | Path) -> Arm:
    """The registered arm that wrote SAELens directory ``path`` (architecture + the metadata's ``arm`` entry)."""
    cfg = read_cfg(path)
    return by_architecture(cfg["architecture"], cfg.get("metadata") or {})


def load_saelens(path: str | Path, device: str = "cpu") -> tuple[Arm, SAE]:
    """(arm, SAELens SAE) of directory ``path``: the SAE as ``sae_lens.SAE.load_from_disk`` makes it (an arm's
    legacy cfg.json upgraded in memory first, ``Arm.upgrade_cfg``), viewed with the arm's extra methods
    (``Arm.saelens_view``: the g-SAE's ``encode_with_grad``)."""
    from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader

    arm = saved_arm(path)

    def converter(p: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None):
        cfg, state = sae_lens_disk_loader(p, device, cfg_overrides)
        return arm.upgrade_cfg(cfg), state

    return arm, arm.saelens_view(SAE.load_from_disk(Path(path), device=device, converter=converter))


def load_sae(path: str | Path) -> nn.Module:
    """Load an SAE written by ``save_sae`` (or any SAELens SAE of a registered arm's architecture) as the arm's
    own module."""
    arm, sl = load_saelens(path)
    return arm.from_saelens(sl)


def upgrade_saved(path: str | Path) -> bool:
    """Rewrite ``path``'s cfg.json in its arm's current format if it is a legacy one (weights untouched; indented
    and key-sorted like ``gsae.io.write_json``). Returns whether it changed."""
    from .. import io

    cfg = read_cfg(path)
    new = saved_arm(path).upgrade_cfg(cfg)
    if new == cfg:
        return False
    io.write_json(Path(path) / CFG_FILE, new)
    return True
