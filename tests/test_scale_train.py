"""The train stage under torchrun (2 processes, gloo, 1 thread each): selection rounds and the SAE grid spread over
the ranks give the same selection and the same SAE bytes as one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from scale_helpers import finish, launch, run_stage, sae_hashes, write_profile


def selection(root: Path) -> dict:
    sel = json.loads((root / "results" / "scale" / "selection.json").read_text())
    return {k: sel[k] for k in ("lr", "lr_trials", "trials", "grad_scale")}


def test_grid_over_two_ranks_gives_the_same_saes_as_one_process(tmp_path):
    profile = write_profile(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    try:
        assert run_stage(one, profile, "harvest") == 0
        shutil.copytree(one / "runs", two / "runs")  # the same harvest under both
        assert run_stage(one, profile, "train") == 0
    finally:
        torch.set_num_threads(threads)
    code, log = finish(launch(two, profile, "train"), timeout=240)
    assert code == 0, log[-6000:]

    ref, got = sae_hashes(one), sae_hashes(two)
    # selection: 2 lr trials x 2 arms on one selection seed; grid: 2 k x 3 seeds x 2 arms; variants at k=4, seed 0:
    # 2 of the g-SAE's own + auxk_off for both arms.
    assert len(ref) == 4 + 12 + 4, sorted(ref)
    assert got == ref, sorted(n for n in ref if got.get(n) != ref[n])
    assert selection(two) == selection(one)
    events = [json.loads(line) for line in (two / "results" / "scale" / "runs.jsonl").read_text().splitlines()]
    done = [e["sae"] for e in events if e["event"] == "train_done"]
    assert sorted(done) == sorted(ref)  # every SAE trained exactly once over the two ranks
    print(f"2 ranks: {len(ref)} SAEs, every sha256 equal to one process; lr {selection(two)['lr']}")


def test_stages_that_do_not_spread_are_refused_under_torchrun(monkeypatch):
    from gsae import distributed, stages
    from gsae.config import ConfigError, load_profile

    monkeypatch.setattr(distributed, "current", lambda: distributed.Dist(0, 2, 0, torch.device("cpu")))
    with pytest.raises(ConfigError, match="stage 'evaluate' does not spread over processes; run it without torchrun"):
        stages.run("evaluate", load_profile("smoke"))
