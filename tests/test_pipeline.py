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


def test_stage_times_report_each_stages_latest_record(monkeypatch, tmp_path):
    import json

    from gsae.config import load_profile

    monkeypatch.setattr(pipeline, "results_dir", lambda p: tmp_path)
    rows = [{"time": "2026-01-01T00:00:01Z", "event": "stage_done", "stage": "train", "seconds": 600.0,
             "device": "cpu"},
            {"time": "2026-01-01T00:00:02Z", "event": "train_done", "sae": "x"},
            {"time": "2026-01-01T00:00:03Z", "event": "stage_done", "stage": "harvest", "seconds": 30.0,
             "device": "cuda:0", "peak_device_gib": 7.125},
            {"time": "2026-01-01T00:00:04Z", "event": "stage_done", "stage": "train", "seconds": 90.0,
             "device": "cuda:0", "peak_device_gib": 12.5}]
    (tmp_path / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert pipeline.stage_times(load_profile("smoke")) == [
        "harvest 0.5 min on cuda:0 (peak 7.12 GiB allocated)", "train 1.5 min on cuda:0 (peak 12.50 GiB allocated)"]
    (tmp_path / "runs.jsonl").unlink()
    assert pipeline.stage_times(load_profile("smoke")) == []
