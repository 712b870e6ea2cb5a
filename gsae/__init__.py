"""gsae: a replication of g-SAEs (arXiv 2411.10397). ``import gsae`` is light: submodules load on first use."""

from __future__ import annotations

from typing import Any

__all__ = ["load_pretrained"]


def load_pretrained(name: str, device: str = "cpu") -> Any:
    """A released SAE as a SAELens ``TopKSAE``, e.g. ``gsae.load_pretrained("default/gsae-k32-s0")``
    (``gsae.release``); a g-SAE's also offers ``encode_with_grad(x, g)``, the g-encode. An unknown name raises an
    error listing the available ones. (Stock ``sae_lens.SAE.load_from_disk`` loads the same directories without
    gsae, with the plain-encode only.)"""
    from .release import load_pretrained as load

    return load(name, device=device)
