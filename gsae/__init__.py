"""gsae: a replication of g-SAEs (arXiv 2411.10397). ``import gsae`` is light: submodules load on first use."""

from __future__ import annotations

from typing import Any

__all__ = ["load_pretrained"]


def load_pretrained(name: str, device: str = "cpu") -> Any:
    """A released SAE as a SAELens SAE, e.g. ``gsae.load_pretrained("default/gsae-k32-s0")`` (``gsae.release``);
    an unknown name raises an error listing the available ones."""
    from .release import load_pretrained as load

    return load(name, device=device)
