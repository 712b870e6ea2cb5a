"""gsae.pipeline: what ``./run_all.sh --force`` (and ``--reselect``) drop before a profile reruns."""

from __future__ import annotations

import pytest

from gsae import pipeline

COMPUTED = ("metrics.jsonl", "provenance.json")
KEPT = ("convergence_extension.json", "ledger.json")  # exploratory (by hand) / rewritten by the claims stage


@pytest.mark.parametrize("reselect", [False, True])
def test_force_drops_the_stage_caches_and_reselect_also_the_selection_records(tmp_path, monkeypatch, reselect):
    monkeypatch.setattr(pipeline, "run_dir", lambda p: tmp_path / "runs" / p.name)
    monkeypatch.setattr(pipeline, "results_dir", lambda p: tmp_path / "results" / p.name)
    everything = COMPUTED + pipeline.SELECTION_RECORDS + KEPT
    for profile in ("smoke", "default"):
        (tmp_path / "runs" / profile / "saes").mkdir(parents=True)
        (tmp_path / "results" / profile).mkdir(parents=True)
        for name in everything:
            (tmp_path / "results" / profile / name).write_text("{}")
    pipeline.main(["clean", "--profile", "smoke"] + (["--reselect"] if reselect else []))
    left = sorted(f.name for f in (tmp_path / "results" / "smoke").iterdir())
    assert left == sorted(KEPT + (() if reselect else pipeline.SELECTION_RECORDS))
    assert not (tmp_path / "runs" / "smoke").exists()
    # another profile's results and caches are untouched
    assert (tmp_path / "runs" / "default" / "saes").is_dir()
    assert sorted(f.name for f in (tmp_path / "results" / "default").iterdir()) == sorted(everything)
