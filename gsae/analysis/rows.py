"""The rows of ``results/<profile>/metrics.jsonl`` (one per SAE, split view and encoder) and the paired values
every test reads from them.

A row is ``{"variant", "arm", "k", "seed", "encode_mode", "metrics": {name: value}}``; ``index_rows`` keys them by
(variant, arm, encode_mode, k) and seed, and ``seed_values`` returns one metric per seed, the unit the paired tests
pair on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from .. import arms
from ..evals import ALL_ENCODE_MODES

BASELINE, TREATMENT = "topk", "gsae"
"""The arms every claim compares (treatment against baseline)."""


class ResultsError(ValueError):
    """metrics.jsonl is malformed (bad line, duplicate row); the message says what to fix."""


Key = tuple[str, str, str, int]
"""(variant, arm, encode_mode, k)"""


def load_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read metrics.jsonl (one JSON object per line; blank lines skipped), validating every row."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the pipeline first (./run_all.sh --profile <name>)")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ResultsError(f"{path}:{lineno} is not valid JSON ({e}); fix or delete that line") from e
            validate_row(row, f"{path}:{lineno}")
            rows.append(row)
    index_rows(rows)  # raises on duplicates
    return rows


def validate_row(row: Any, where: str) -> None:
    """Raise ``ResultsError`` naming ``where`` if ``row`` is not a well-formed metrics row."""
    if not isinstance(row, dict):
        raise ResultsError(f"{where}: expected a JSON object")
    missing = {"variant", "arm", "k", "seed", "encode_mode", "metrics"} - set(row)
    if missing:
        raise ResultsError(f"{where}: missing field(s) {sorted(missing)}")
    if row["arm"] not in arms.names():
        raise ResultsError(f"{where}: arm must be a registered arm {sorted(arms.names())}, got {row['arm']!r}")
    if row["encode_mode"] not in ALL_ENCODE_MODES:
        raise ResultsError(f"{where}: encode_mode must be one of {ALL_ENCODE_MODES}, got {row['encode_mode']!r}")
    if not isinstance(row["metrics"], dict):
        raise ResultsError(f"{where}: metrics must be an object")


def index_rows(rows: list[dict[str, Any]]) -> dict[Key, dict[int, dict[str, Any]]]:
    """rows -> {(variant, arm, encode_mode, k): {seed: metrics}}; a duplicate row is an error, not a silent pick."""
    out: dict[Key, dict[int, dict[str, Any]]] = {}
    for row in rows:
        key = (row["variant"], row["arm"], row["encode_mode"], int(row["k"]))
        seeds = out.setdefault(key, {})
        seed = int(row["seed"])
        if seed in seeds:
            raise ResultsError(f"two rows for variant={key[0]} arm={key[1]} encode_mode={key[2]} k={key[3]} "
                               f"seed={seed} in metrics.jsonl; delete the stale one")
        seeds[seed] = row["metrics"]
    return out


def seed_values(index: dict, variant: str, arm: str, encode: str, k: int, metric: str) -> dict[int, float]:
    """{seed: finite metric value}; missing or non-finite values are left out (their pair is then dropped)."""
    if not arms.get(arm).has_gradient_encoder:  # both encoders are the same code: take either row (plain first)
        per_seed = {**index.get((variant, arm, "g", k), {}), **index.get((variant, arm, "plain", k), {})}
    else:
        per_seed = index.get((variant, arm, encode, k), {})
    out = {}
    for seed, m in per_seed.items():
        v = m.get(metric)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[seed] = float(v)
    return out


def mean_t_interval(values: list[float], ci: float = 0.95) -> tuple[float, float]:
    """Mean and t-interval half-width over seeds (nan half-width below two values)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return math.nan, math.nan
    if a.size < 2:
        return float(a.mean()), math.nan
    return float(a.mean()), float(sps.t.ppf(0.5 + ci / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
