"""gsae.pipeline: what ``./run_all.sh --force`` drops before a profile reruns."""

from __future__ import annotations

from gsae import pipeline
from gsae.config import load_profile


def test_force_drops_the_stage_caches_the_selection_and_the_convergence_check(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "run_dir", lambda p: tmp_path / "runs" / p.name)
    monkeypatch.setattr(pipeline, "results_dir", lambda p: tmp_path / "results" / p.name)
    recomputed = ("selection.json", "selection_edges.json", "convergence.json", "metrics.jsonl", "provenance.json")
    kept = ("convergence_extension.json", "ledger.json")  # exploratory (by hand) / rewritten by the claims stage
    for profile in ("smoke", "default"):
        (tmp_path / "runs" / profile / "saes").mkdir(parents=True)
        (tmp_path / "results" / profile).mkdir(parents=True)
        for name in recomputed + kept:
            (tmp_path / "results" / profile / name).write_text("{}")
    pipeline.clean(load_profile("smoke"))
    left = sorted(f.name for f in (tmp_path / "results" / "smoke").iterdir())
    assert left == sorted(kept)
    assert not (tmp_path / "runs" / "smoke").exists()
    # another profile's results and caches are untouched
    assert (tmp_path / "runs" / "default" / "saes").is_dir()
    assert sorted(f.name for f in (tmp_path / "results" / "default").iterdir()) == sorted(recomputed + kept)
