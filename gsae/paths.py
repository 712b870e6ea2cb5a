"""Where things live: the repository root, a profile's caches, results and figures.

``runs/<profile>/`` holds caches keyed by config hashes (never committed), ``runs/_cache`` the corpus and the
LM weights shared by all profiles, ``results/<profile>/`` the small JSON results (committed for the default
profile) and ``figures/`` the default profile's figures (other profiles draw into ``results/<profile>/figures``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Profile

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (the one definition)."""
SPLITS = ("train", "val", "test")


def run_dir(p: Profile) -> Path:
    return ROOT / "runs" / p.name


def cache_dir() -> Path:
    """Shared across profiles: the corpus and converted / trained LM weights."""
    return ROOT / "runs" / "_cache"


def results_dir(p: Profile) -> Path:
    """Small JSON results (committed for the default profile; results/smoke is git-ignored)."""
    return ROOT / "results" / p.name


def figures_dir(profile: Profile | str, root: Path = ROOT) -> Path:
    """figures/ holds the committed default-profile figures; other profiles draw into results/<profile>/figures."""
    name = profile if isinstance(profile, str) else profile.name
    return root / "figures" if name == "default" else root / "results" / name / "figures"
