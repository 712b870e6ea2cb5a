"""gsae.adopt: another profile's caches linked in whole where the target has nothing of that name, its selection
records copied only when both profiles select alike, and a refusal when the configs make caches differ."""

from __future__ import annotations

import json
import os

import pytest

import gsae.adopt as A
from gsae import io
from gsae.config import ConfigError, load_profile


@pytest.fixture
def roots(tmp_path, monkeypatch):
    runs, results = tmp_path / "runs", tmp_path / "results"
    monkeypatch.setattr(A, "run_dir", lambda p: runs / p.name)
    monkeypatch.setattr(A, "results_dir", lambda p: results / p.name)
    monkeypatch.setattr(io, "results_dir", lambda p: results / p.name)
    return runs, results


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_which_records_each_profile_takes_from_the_default_run():
    default, robustness, kl = (load_profile(n) for n in ("default", "robustness", "kl"))
    # robustness selects exactly as the study does (so it retrains at the study's lr); kl has its own one trial
    assert A.records_to_copy(robustness, default) == ("selection.json", "convergence.json")
    assert A.records_to_copy(kl, default) == ()
    assert A.records_to_copy(default, default) == ("selection.json", "convergence.json", "beta_selection.json")
    with pytest.raises(ConfigError, match="differ in model, harvest, eval: their caches are not interchangeable"):
        A.adopt(load_profile("smoke"), default)
    with pytest.raises(ConfigError, match="--from names default, the profile itself"):
        A.adopt(default, default)


def test_caches_are_linked_whole_and_what_the_target_has_is_kept(roots):
    runs, results = roots
    default, robustness = load_profile("default"), load_profile("robustness")
    src, dst = runs / "default", runs / "robustness"
    files = {"contexts-aa/contexts.safetensors": "ctx", "harvest-bb/train/shard_00000.safetensors": "x and g",
             "harvest-bb/train/manifest.json": "{}", "saes/h1/primary/topk-k32-s0/manifest.json": "src topk",
             "saes/h1/primary/gsae-k32-s0/sae/cfg.json": "src gsae", "steer_control-cc.json": "{}",
             "notebooks/05_steering.ipynb": "a run's own notebook"}
    for rel, text in files.items():
        write(src / rel, text)
    write(dst / "saes/h1/primary/topk-k32-s0/manifest.json", "the target's own")
    for name in ("selection.json", "convergence.json", "beta_selection.json"):
        write(results / "default" / name, json.dumps({"record": name}))
    write(results / "robustness" / "convergence.json", "the target's own record")

    done = A.adopt(robustness, default)
    # contexts, harvest, steer control and one SAE directory adopted; the target's SAE and its record kept
    assert (done["adopted"], done["kept"], done["records"]) == (4, 1, ["selection.json"])
    for rel in ("contexts-aa/contexts.safetensors", "harvest-bb/train/shard_00000.safetensors",
                "saes/h1/primary/gsae-k32-s0/sae/cfg.json"):
        assert (dst / rel).read_text() == files[rel] and os.stat(dst / rel).st_ino == os.stat(src / rel).st_ino
    assert (dst / "saes/h1/primary/topk-k32-s0/manifest.json").read_text() == "the target's own"
    assert not (dst / "notebooks").exists() and not list(dst.rglob(".adopting-*"))
    assert (results / "robustness" / "convergence.json").read_text() == "the target's own record"
    assert not (results / "robustness" / "beta_selection.json").exists()
    assert {rel: (src / rel).read_text() for rel in files} == files  # the source is unchanged
    events = [json.loads(line) for line in (results / "robustness" / "runs.jsonl").read_text().splitlines()]
    assert sorted(e.get("path", e.get("record")) for e in events) == sorted(
        ["contexts-aa", "harvest-bb", "saes/h1/primary/gsae-k32-s0", "steer_control-cc.json", "selection.json"])
    assert {e["from"] for e in events} == {"default"}

    again = A.adopt(robustness, default)  # nothing left to adopt
    assert (again["adopted"], again["kept"], again["records"]) == (0, 5, [])


def test_a_missing_source_run_is_refused_and_nothing_is_written(roots):
    runs, results = roots
    with pytest.raises(ConfigError, match="run profile default first"):
        A.adopt(load_profile("kl"), load_profile("default"))
    assert not runs.exists() and not results.exists()
