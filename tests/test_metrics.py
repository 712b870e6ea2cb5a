"""One metric record per (SAE, encoder, split): every numeric scalar a stage writes reaches metrics.jsonl, with
no list of allowed keys to edit."""

from __future__ import annotations

import json
from types import SimpleNamespace

import yaml

import gsae.specs as specs_mod
from gsae import io
from gsae.config import profile_from_dict
from gsae.paths import ROOT
from gsae.stages import metrics
from gsae.stages.evaluate import eval_file
from gsae.stages.probe import probe_file
from gsae.stages.steer import steer_file


def test_a_new_metric_written_by_a_stage_appears_in_the_record(tmp_path, monkeypatch):
    monkeypatch.setattr(specs_mod, "run_dir", lambda p: tmp_path / "runs" / p.name)
    monkeypatch.setattr(metrics, "results_dir", lambda p: tmp_path / "results" / p.name)
    monkeypatch.setattr(metrics, "write_provenance", lambda p, lm: {})
    p = profile_from_dict("rec", yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text()))
    lm = SimpleNamespace(info={"model_hash": "m"})
    chosen = {"gsae": {"beta": 0.3}, "gsae_free": {"beta": 0.3}}
    spec = next(s for s in specs_mod.experiment_specs(p, 64, 1.0, chosen, 1e-3) if s.arm == "gsae")
    d = specs_mod.sae_dir(p, spec, "m")
    io.write_json(d / "train.json", {"history": [], "seconds": 1.5, "metrics": {"all": {"dead_fraction_train": 0.1}}})
    io.write_json(d / eval_file(p, "test"), {"metrics": {"g": {"delta_ce": 0.2, "brand_new_metric": 7.0,
                                                               "encode_mode": "g"},
                                                         "plain": {"delta_ce": 0.3}}})
    io.write_json(d / steer_file(p), {"kl": [[1.0]], "metrics": {"all": {"steer_kl@0.5": 1.0}}})
    io.write_json(d / probe_file(p), {"pos_auc": [0.7], "metrics": {"plain": {"probe_auc_pos": 0.7}}})
    io.write_json(d / "eval_test-stale0000.json", {"metrics": {"g": {"delta_ce": 99.0}}})  # old code's file: ignored
    recs = {r.encode_mode: r for r in metrics.records(p, lm, [spec])}
    assert recs["g"].metrics == {"dead_fraction_train": 0.1, "delta_ce": 0.2, "brand_new_metric": 7.0,
                                 "steer_kl@0.5": 1.0}
    assert recs["plain"].metrics == {"dead_fraction_train": 0.1, "delta_ce": 0.3, "steer_kl@0.5": 1.0,
                                     "probe_auc_pos": 0.7}
    assert recs["g"].arm == "gsae" and recs["g"].split == "test" and recs["g"].variant == "primary"
    path = metrics.write_metrics(p, lm, [spec])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["metrics"]["brand_new_metric"] == 7.0 and len(rows) == 2
