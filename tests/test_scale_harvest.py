"""The harvest stage under torchrun (2 processes, gloo, 1 thread each): sharded by rank, it writes the same bytes as
one process, and a rank killed with SIGKILL mid-harvest resumes, after a relaunch, to the same bytes again."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from scale_helpers import finish, launch, run_stage, write_profile

SPLITS = ("train", "val", "test")


def harvest_files(root: Path) -> dict[str, bytes]:
    """Every shard and sidecar of the profile's harvest, by path relative to the harvest directory."""
    (top,) = (root / "runs" / "scale").glob("harvest-*")
    return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("shard_*"))}


def manifests(root: Path) -> dict[str, dict]:
    (top,) = (root / "runs" / "scale").glob("harvest-*")
    return {s: json.loads((top / s / "manifest.json").read_text()) for s in SPLITS}


def same_manifest(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> bool:
    drop = ("completed_at", *ignore)
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process (world size 1, in this process, one thread): the bytes every sharded run must reproduce."""
    tmp = tmp_path_factory.mktemp("scale")
    profile = write_profile(tmp)
    threads = torch.get_num_threads()
    try:
        assert run_stage(tmp / "one", profile, "harvest") == 0
    finally:
        torch.set_num_threads(threads)
    return tmp, profile, harvest_files(tmp / "one"), manifests(tmp / "one")


def test_sharded_harvest_is_byte_identical_to_one_process(reference):
    tmp, profile, files, ref_manifests = reference
    code, log = finish(launch(tmp / "two", profile, "harvest"))
    assert code == 0, log[-5000:]
    got = harvest_files(tmp / "two")
    assert sorted(got) == sorted(files) and len([f for f in files if f.endswith(".safetensors")]) == 14
    assert all(got[f] == files[f] for f in files), [f for f in files if got[f] != files[f]]
    for split, m in manifests(tmp / "two").items():
        assert same_manifest(m, ref_manifests[split]), split
        assert m["resumed_shards"] == 0 and m["dtype"] == "float16"
    print(f"sharded harvest: {len(files)} shard and sidecar files byte-identical; 3 manifests equal")


def test_a_killed_rank_resumes_to_identical_shards(reference):
    tmp, profile, files, ref_manifests = reference
    root = tmp / "killed"
    root.mkdir()
    proc = launch(root, profile, "harvest", env={"GSAE_TEST_SLOW": "0.25"})
    deadline = time.monotonic() + 120
    # Rank 1 owns the odd shards (round robin); wait for its first, then kill it.
    while not list((root / "runs").glob("scale/harvest-*/train/shard_00001.json")):
        if proc.poll() is not None:
            pytest.fail(f"torchrun exited before the kill:\n{finish(proc)[1][-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("rank 1 wrote no shard within 120 s")
        time.sleep(0.05)
    os.kill(int((root / "pid_rank1").read_text()), signal.SIGKILL)
    code, log = finish(proc)
    assert code != 0, "torchrun must report the killed rank"
    (top,) = (root / "runs" / "scale").glob("harvest-*")
    assert not (top / "train" / "manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in (top / "train").glob("shard_*.safetensors")}
    assert 1 <= len(kept) < 10

    code, log = finish(launch(root, profile, "harvest"))
    assert code == 0, log[-5000:]
    got = harvest_files(root)
    assert all(got[f] == files[f] for f in files), [f for f in files if got[f] != files[f]]
    assert all((top / "train" / n).stat().st_mtime_ns == t for n, t in kept.items()), "kept shards were rewritten"
    m = manifests(root)
    assert m["train"]["resumed_shards"] == len(kept)
    assert all(same_manifest(m[s], ref_manifests[s], ("resumed_shards",)) for s in SPLITS)
    assert not list(top.rglob(".*.tmp"))
    print(f"killed rank 1 after {len(kept)} train shards existed; relaunch kept them and matched all bytes")
