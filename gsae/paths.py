"""Where a profile's outputs live, and the runs registry.

``runs/<profile>/`` holds caches keyed by config hashes (never committed), ``runs/_cache`` the corpus and the
LM weights shared by all profiles, ``results/<profile>/`` the small JSON results (committed for the default
profile) and ``figures/`` the default profile's figures (other profiles draw into ``results/<profile>/figures``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from . import io
from .config import Profile

ROOT = Path(__file__).resolve().parent.parent
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


def registry_append(p: Profile, event: dict[str, Any]) -> None:
    """Append one line to the runs registry (every launch, failed ones included); one locked write per line,
    so processes of a torchrun launch never interleave."""
    from .distributed import locked_append

    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "profile": p.name,
           "git": io.git_commit()["commit"], **event}
    path = results_dir(p) / "runs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    locked_append(path, json.dumps(row, sort_keys=True, default=str))
