"""gsae.reader against load_all (the v1 reader, kept as the reference): chunks cut across shards give the same rows,
streamed split statistics match the in-memory ones, and a shard is hashed once per reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import gsae.reader as R
from gsae import harvest as H
from gsae import io
from gsae.config import HarvestConfig

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32,
                                                      d_vocab=50, n_ctx=16, act_fn="gelu", normalization_type="LN",
                                                      seed=0, device="cpu"))
    tokens = torch.randint(0, 50, (30, 12), generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("h")
    # 10 rows per context, 3 contexts (30 rows) per shard, 250 rows: 9 shards, the last one of 10 rows.
    H.harvest(model, tokens, HOOK, out, n_tokens=250, cfg=HarvestConfig(batch_contexts=2, shard_tokens=30,
                                                                          dtype="bfloat16"), progress=False)
    return out


@pytest.mark.parametrize("chunk, limit", [(7, None), (30, None), (64, 200), (1000, None), (1, 5)])
def test_chunks_are_slices_of_load_all(harvested, chunk, limit):
    rd = R.ActivationReader(harvested)
    ref = rd.load_all(limit)
    parts = list(rd.chunks(chunk, limit))
    n = ref.x.shape[0]
    assert [p.x.shape[0] for p in parts] == [min(chunk, n - i) for i in range(0, n, chunk)]
    for j, p in enumerate(parts):
        sl = slice(j * chunk, j * chunk + p.x.shape[0])
        assert torch.equal(p.x, ref.x[sl]) and torch.equal(p.g, ref.g[sl]) and p.x.dtype == torch.float32
        assert all(torch.equal(p.meta[k], ref.meta[k][sl]) for k in R.ROW_INDEX_KEYS)
    if limit is None:
        assert all(torch.equal(v, ref.meta[k]) for k, v in rd.meta().items())


def test_streamed_statistics_match_the_in_memory_ones(harvested, monkeypatch):
    rd = R.ActivationReader(harvested)
    exact = rd.statistics()
    x = rd.load_all().x
    assert torch.equal(exact.mean, x.mean(0))  # the v1 arithmetic, bit for bit
    assert exact.median_norm == float(np.median(x.double().norm(dim=-1).numpy()))
    monkeypatch.setattr(R, "IN_MEMORY_BYTES", 0)
    streamed = rd.statistics(chunk=17)
    torch.testing.assert_close(streamed.mean, x.double().mean(0).float(), rtol=0, atol=1e-6)
    assert streamed.median_norm == exact.median_norm and streamed.n == 250


def test_each_shard_is_hashed_once_per_reader(harvested, monkeypatch):
    calls = []
    real = io.check_sha256
    monkeypatch.setattr(io, "check_sha256", lambda path, *a, **k: calls.append(path.name) or real(path, *a, **k))
    rd = R.ActivationReader(harvested)
    for _ in range(3):
        list(rd.batches(40, seed=1, epochs=1))
    assert sorted(calls) == sorted(s["file"] for s in rd.shards)  # 9 hashes for 27 loads


def test_prefetching_gives_the_same_stream(harvested):
    """The GPU path loads the next window in a thread; the windows (and so the batches) are the CPU path's."""
    windows = R.ActivationReader(harvested)._windows(3, 2, prefetch=True)
    inline = R.ActivationReader(harvested)._windows(3, 2, prefetch=False)
    for _ in range(12):  # more than one epoch of 5 windows
        (xa, ga), (xb, gb) = next(windows), next(inline)
        assert torch.equal(xa, xb) and torch.equal(ga, gb)


def reference_stream(rd: R.ActivationReader, seed: int, window: int, n_windows: int):
    """The documented stream written out plainly: per epoch a seeded shard order, then for each window of
    ``window`` shards, its rows in a seeded random order (one generator, drawn in that order)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n_windows:
        order = torch.randperm(len(rd.shards), generator=gen).tolist()
        for w in range(0, len(order), window):
            loaded = [io.load_tensors(rd.dir / rd.shards[i]["file"]) for i in order[w:w + window]]
            x, g = torch.cat([t["x"] for t in loaded]), torch.cat([t["g"] for t in loaded])
            perm = torch.randperm(x.shape[0], generator=gen)
            out.append((x[perm], g[perm]))
    return out[:n_windows]


@pytest.mark.parametrize("prefetch", [False, True])
def test_windows_follow_the_documented_stream(harvested, prefetch):
    rd = R.ActivationReader(harvested)
    ref = reference_stream(rd, seed=5, window=2, n_windows=13)  # 2.6 epochs of 5 windows
    got = rd._windows(5, 2, prefetch=prefetch)
    for x, g in ref:
        xa, ga = next(got)
        assert torch.equal(xa, x) and torch.equal(ga, g)


def test_a_held_split_gives_the_disk_batches_without_reading_the_disk(harvested, monkeypatch):
    """``held_in`` loads every shard once; then batches across epochs and windows, chunks and statistics are the
    disk reader's, bit for bit, and no file is opened again."""
    disk = R.ActivationReader(harvested)
    n = 3 * disk.n_tokens + 17  # three epochs and a bit, batches that straddle windows and epochs
    ref_batches = list(disk.batches(64, seed=7, n_tokens=n))
    held = disk.held_in("cpu")
    assert held.held_device == torch.device("cpu") and disk.held_device is None
    monkeypatch.setattr(R, "load_tensors", lambda *a, **k: pytest.fail("a held split read a shard from disk"))
    for (xa, ga), (xb, gb) in zip(held.batches(64, seed=7, n_tokens=n), ref_batches, strict=True):
        assert xa.dtype == torch.float32 and torch.equal(xa, xb) and torch.equal(ga, gb)
    monkeypatch.undo()
    ref = disk.load_all()
    assert torch.equal(torch.cat([c.x for c in held.chunks(64)]), ref.x)
    assert torch.equal(held.statistics().mean, disk.statistics().mean)


def test_holding_a_split_verifies_every_shard_first(harvested, tmp_path):
    import shutil

    copy = tmp_path / "h"
    shutil.copytree(harvested, copy)
    shard = copy / R.ActivationReader(copy).shards[4]["file"]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(io.IntegrityError, match=shard.name):
        R.ActivationReader(copy).held_in("cpu")


def test_where_training_holds_the_split(harvested, monkeypatch):
    """runtime.train_data: disk never holds it, memory always (refused when it cannot fit on the GPU), auto only
    on a GPU with twice the split free (the GPU's free memory is stood in for)."""
    import dataclasses

    from gsae.config import ConfigError, RuntimeConfig, load_profile
    from gsae.stages.harvest import holds_in_memory, training_data

    rd = R.ActivationReader(harvested)
    need = rd.stored_bytes
    assert need == sum((harvested / s["file"]).stat().st_size for s in rd.shards) > 0
    base = load_profile("smoke")
    mode = lambda m: dataclasses.replace(base, runtime=RuntimeConfig(device="cpu", train_data=m))  # noqa: E731
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert training_data(mode("disk"), rd, cpu) is rd and training_data(mode("auto"), rd, cpu) is rd
    held = training_data(mode("memory"), rd, cpu)
    assert held.held_device == cpu and training_data(mode("memory"), rd, cpu) is held  # loaded once per process
    for free, auto in [(2 * need, True), (2 * need - 1, False)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 80 << 30))
        assert holds_in_memory(mode("auto"), rd, gpu) is auto
        assert holds_in_memory(mode("memory"), rd, gpu) and not holds_in_memory(mode("disk"), rd, gpu)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (need - 1, 80 << 30))
    with pytest.raises(ConfigError, match="does not fit in cuda:0's free memory.*runtime.train_data: disk"):
        holds_in_memory(mode("memory"), rd, gpu)
    with pytest.raises(ValueError, match="runtime.train_data must be auto, memory or disk"):
        RuntimeConfig(train_data="gpu")
