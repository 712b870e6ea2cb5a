"""One metric record per (SAE, encoder, split), and the one writer of ``results/<profile>/metrics.jsonl``.

Every per-SAE stage file (train.json, eval_*, steer_*, probe_*) carries a ``metrics`` section,
``{"all": {...}}`` for numbers that do not depend on the encoder and/or ``{"g": {...}, "plain": {...}}``. A
record is the union of those sections: every numeric scalar any stage wrote, with no list of allowed keys, so
a new metric appears in metrics.jsonl by being written by its stage. Only the ``claims`` stage writes the file;
notebooks call ``records`` to plot the same numbers without writing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

from .. import io
from ..config import Profile
from ..evals import ALL_ENCODE_MODES
from ..paths import SPLITS, results_dir
from ..specs import SAESpec, sae_dir
from .contexts import contexts_manifest
from .evaluate import eval_file
from .full_test import full_test_file
from .harvest import reader
from .probe import probe_file
from .steer import steer_file


class MetricRecord(NamedTuple):
    sae: str
    """The SAE's spec name (group/arm-k-seed)."""
    variant: str
    arm: str
    k: int
    seed: int
    beta: float
    encode_mode: str
    split: str
    metrics: dict[str, float]
    not_measured: tuple[str, ...] = ()
    """Metrics a stage could not measure for this SAE (its file's ``not_measured``), e.g. POS probing on a corpus
    without POS tags; the ledger then reports their claim as "not measured"."""

    def row(self) -> dict[str, Any]:
        """The metrics.jsonl line (what the ledger reads)."""
        row = {"variant": self.variant, "arm": self.arm, "k": self.k, "seed": self.seed,
               "encode_mode": self.encode_mode, "beta": self.beta, "split": self.split, "sae": self.sae,
               "metrics": self.metrics}
        if self.not_measured:
            row["not_measured"] = list(self.not_measured)
        return row


def _numbers(section: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in section.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _stage_files(d: Path, split: str) -> list[Path]:
    """train.json plus every per-SAE result file of ``split`` (the firing-count tensors hold no metrics)."""
    return [d / "train.json"] + sorted(f for f in d.glob(f"*_{split}-*.json"))


def records(p: Profile, lm, specs: list[SAESpec], split: str = "test") -> list[MetricRecord]:
    """Every metric each stage wrote for each spec and encoder on ``split`` (current code's files only)."""
    current = {eval_file(p, split)} | {f.replace("_test-", f"_{split}-")
                                       for f in (full_test_file(p), steer_file(p), probe_file(p))}
    mh = lm.info["model_hash"]
    out = []
    for s in specs:
        d = sae_dir(p, s, mh)
        files = [f for f in _stage_files(d, split) if f.name == "train.json" or f.name in current]
        contents = [io.read_json(f) for f in files]
        sections = [c.get("metrics", {}) for c in contents]
        unmeasured = tuple(sorted({name for c in contents for name in c.get("not_measured", {})}))
        for mode in [m for m in ALL_ENCODE_MODES if m in ("g", "plain") or any(m in sec for sec in sections)]:
            m: dict[str, float] = {}
            for sec in sections:
                m.update(_numbers(sec.get("all", {})))
                m.update(_numbers(sec.get(mode, {})))
            out.append(MetricRecord(s.name, s.group, s.arm, s.k, s.seed, s.sae.beta, mode, split, m, unmeasured))
    return out


def write_metrics(p: Profile, lm, specs: list[SAESpec], split: str = "test") -> Path:
    """results/<profile>/metrics.jsonl from ``records`` (one line per record, sorted keys), plus provenance."""
    path = results_dir(p) / "metrics.jsonl"
    rows = [r.row() for r in records(p, lm, specs, split)]
    with io.atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    write_provenance(p, lm)
    return path


def write_provenance(p: Profile, lm) -> dict[str, Any]:
    mh = lm.info["model_hash"]
    cm = contexts_manifest(p, mh)
    from ..models import public_info

    prov = io.provenance(profile=p.to_dict(), seeds=list(p.experiment.seeds), model=public_info(lm.info),
                         data={"split_hash": cm["split_hash"], "data_hash": cm["data_hash"], "counts": cm["counts"]},
                         harvest={s: reader(p, s, mh).manifest.get("plan_hash") for s in SPLITS})
    io.write_json(results_dir(p) / "provenance.json", prov)
    return prov
