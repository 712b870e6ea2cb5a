"""gsae.distributed: work partitions, a real 2-process gloo run under torchrun, the locked JSONL append."""

from __future__ import annotations

import fcntl
import json
import math
import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gsae import distributed

REPO = Path(__file__).resolve().parent.parent
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID")


@pytest.fixture
def no_launcher(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)


# --------------------------------------------------------------------------------------------------
# Work assignment
# --------------------------------------------------------------------------------------------------


def test_assign_round_robin_partitions_exactly():
    # Hand-computed: 7 items over 3 ranks.
    items = ["a", "b", "c", "d", "e", "f", "g"]
    assert [distributed.assign(items, r, 3) for r in range(3)] == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    for n in (0, 1, 5, 16):
        for world in (1, 2, 3, 4, 7):
            shares = [distributed.assign(range(n), r, world) for r in range(world)]
            assert sorted(i for s in shares for i in s) == list(range(n))  # union = all, no duplicates
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            assert shares == [distributed.assign(range(n), r, world) for r in range(world)]  # deterministic
    with pytest.raises(ValueError, match="rank"):
        distributed.assign(items, 2, 2)
    with pytest.raises(ValueError, match="rank"):
        distributed.assign(items, 0, 0)


def test_assign_groups_keeps_groups_whole_and_balances():
    # SAE jobs (seed, k): seeds 0-2 have 4 jobs, seed 3 has 2. Largest first onto the least loaded rank:
    # seed0 -> r0 (4), seed1 -> r1 (4), seed2 -> r0 (8; tie at 4 goes to the lower rank), seed3 -> r1 (6).
    # Listed k-major, so each rank's jobs are interleaved in the input; ties go by first appearance (0, 1, 2).
    jobs = [(s, k) for k in (8, 16, 32, 64) for s in range(3)] + [(3, 8), (3, 16)]
    seed = lambda job: job[0]
    r0, r1 = (distributed.assign_groups(jobs, seed, r, 2) for r in range(2))
    assert sorted({s for s, _ in r0}) == [0, 2] and sorted({s for s, _ in r1}) == [1, 3]
    assert r0 == [j for j in jobs if j[0] in (0, 2)]  # a rank's items keep the input order
    assert r1 == [j for j in jobs if j[0] in (1, 3)]

    rng = random.Random(1)
    for _ in range(50):
        n_groups, world = rng.randint(1, 12), rng.randint(1, 5)
        items = [(g, j) for g in range(n_groups) for j in range(rng.randint(1, 6))]
        rng.shuffle(items)
        shares = [distributed.assign_groups(items, seed, r, world) for r in range(world)]
        assert sorted(i for s in shares for i in s) == sorted(items)  # exact partition
        owners = {}
        for r, share in enumerate(shares):
            for g, _ in share:
                assert owners.setdefault(g, r) == r  # a group never spans two ranks
        assert shares == distributed.partition_groups(items, seed, world)  # deterministic
        # Greedy largest-first bound: no rank exceeds the mean load by more than the biggest group.
        biggest = max(sum(1 for i in items if i[0] == g) for g in range(n_groups))
        assert max(map(len, shares)) <= math.ceil(len(items) / world) + biggest


# --------------------------------------------------------------------------------------------------
# World size 1: no launcher, no process group
# --------------------------------------------------------------------------------------------------


def test_world_one_needs_no_launcher(no_launcher, tmp_path):
    d = distributed.init()
    assert (d.rank, d.world_size, d.local_rank) == (0, 1, 0)
    assert d.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not torch.distributed.is_initialized()
    assert distributed.init() == d and distributed.is_main()
    distributed.barrier()
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object("x") == "x"
    ran = []
    with distributed.main_first():
        ran.append(True)
    assert ran == [True]
    with pytest.raises(KeyError, match="boom"), distributed.main_first():  # errors pass through unchanged
        raise KeyError("boom")
    distributed.shutdown()


def test_bad_launch_environment_is_a_clear_error(no_launcher, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="init"):
        distributed.is_main()  # several processes but no group: refuse to guess who is rank 0
    with pytest.raises(ValueError, match="RANK is not set.*torchrun"):
        distributed.init()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT not set"):
        distributed.init()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="outside 0..1"):
        distributed.init()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="not an integer"):
        distributed.init()
    assert not torch.distributed.is_initialized()


# --------------------------------------------------------------------------------------------------
# Two real processes under torchrun (gloo)
# --------------------------------------------------------------------------------------------------

WORKER = textwrap.dedent('''
    import datetime, json, os, sys, time
    from pathlib import Path

    import torch

    from gsae import distributed

    out = Path(sys.argv[1])
    d = distributed.init(timeout=datetime.timedelta(seconds=60))  # a broken collective fails, not hangs
    res = {"rank": d.rank, "world": d.world_size, "local": d.local_rank, "device": str(d.device),
           "idempotent": distributed.init() == d, "backend": torch.distributed.get_backend(),
           "is_main": distributed.is_main(), "threads": torch.get_num_threads()}

    marker = out / "downloaded.txt"
    with distributed.main_first():
        if distributed.is_main():
            time.sleep(1.0)  # a rank that did not wait would look before the file exists
            marker.write_text("payload")
        res["saw_marker"] = marker.read_text() if marker.exists() else None

    res["gathered"] = distributed.all_gather_object({"rank": d.rank, "pid": os.getpid()})
    res["mine"] = distributed.assign(range(10), d.rank, d.world_size)

    try:  # rank 0 fails inside main_first: rank 1 must raise too, not wait forever
        with distributed.main_first():
            if d.rank == 0:
                raise ValueError("download failed")
            res["ran_body_after_failure"] = True
    except (ValueError, RuntimeError) as e:
        res["main_first_error"] = f"{type(e).__name__}: {e}"

    for i in range(200):
        distributed.locked_append(out / "runs.jsonl", json.dumps({"rank": d.rank, "i": i}))
    distributed.barrier()
    distributed.shutdown()
    res["initialized_after_shutdown"] = torch.distributed.is_initialized()
    (out / f"rank{d.rank}.json").write_text(json.dumps(res))
''')


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_under_torchrun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), str(tmp_path)]
    # Own session, so a hang kills torchrun AND its workers (killing torchrun alone would orphan them).
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in 120 s:\n{log[-3000:]}")
    assert proc.returncode == 0, log[-6000:]

    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for r, res in enumerate((r0, r1)):
        assert (res["rank"], res["world"], res["local"]) == (r, 2, r)
        assert res["backend"] == "gloo" and res["device"] == "cpu" and res["threads"] == 1
        assert res["idempotent"] and res["is_main"] == (r == 0)
        assert res["saw_marker"] == "payload"
        assert [g["rank"] for g in res["gathered"]] == [0, 1]
        assert not res["initialized_after_shutdown"]
    assert r0["gathered"] == r1["gathered"] and r0["gathered"][0]["pid"] != r0["gathered"][1]["pid"]
    assert r0["mine"] == [0, 2, 4, 6, 8] and r1["mine"] == [1, 3, 5, 7, 9]
    assert r0["main_first_error"] == "ValueError: download failed"
    assert r1["main_first_error"].startswith("RuntimeError: rank 0 failed inside main_first (ValueError: download")
    assert "ran_body_after_failure" not in r1
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted((row["rank"], row["i"]) for row in rows) == [(r, i) for r in range(2) for i in range(200)]


# --------------------------------------------------------------------------------------------------
# locked_append
# --------------------------------------------------------------------------------------------------

N_WRITERS, N_LINES = 4, 500


def _write_lines(path: Path, writer: int, start: mp.synchronize.Event) -> None:
    start.wait()
    for i in range(N_LINES):
        # Lengths up to ~9 KB, well past PIPE_BUF and a page, so a torn or interleaved write would show.
        pad = chr(ord("a") + writer) * (50 + (i * 977) % 9000)
        distributed.locked_append(path, json.dumps({"w": writer, "i": i, "pad": pad}))


def test_locked_append_concurrent_writers_lose_and_interleave_nothing(tmp_path):
    path = tmp_path / "sub" / "runs.jsonl"
    ctx = mp.get_context("fork")  # the writer only touches files, so forking a torch process is safe here
    start = ctx.Event()
    procs = [ctx.Process(target=_write_lines, args=(path, w, start)) for w in range(N_WRITERS)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    rows = [json.loads(line) for line in raw.decode().split("\n")[:-1]]  # every line parses
    assert len(rows) == N_WRITERS * N_LINES
    assert sorted((r["w"], r["i"]) for r in rows) == [(w, i) for w in range(N_WRITERS) for i in range(N_LINES)]
    for r in rows:
        assert r["pad"] == chr(ord("a") + r["w"]) * (50 + (r["i"] * 977) % 9000)
    for w in range(N_WRITERS):  # each writer's lines appear in the order it wrote them
        assert [r["i"] for r in rows if r["w"] == w] == list(range(N_LINES))


def test_locked_append_waits_for_the_lock(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.touch()
    ctx = mp.get_context("fork")
    with open(path, "rb") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)  # another writer holds the file
        p = ctx.Process(target=distributed.locked_append, args=(path, '{"late": true}'))
        p.start()
        p.join(timeout=1.0)
        assert p.is_alive() and path.read_bytes() == b""  # blocked, nothing written
        fcntl.flock(holder.fileno(), fcntl.LOCK_UN)
    p.join(timeout=30)
    assert p.exitcode == 0 and path.read_bytes() == b'{"late": true}\n'


def test_locked_append_after_a_torn_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": ')  # a writer was killed mid-line
    distributed.locked_append(path, '{"c": 3}\n')  # a trailing newline is not doubled
    distributed.locked_append(path, '{"d": 4}', fsync=True)
    assert path.read_text().split("\n") == ['{"a": 1}', '{"b": ', '{"c": 3}', '{"d": 4}', ""]
    with pytest.raises(ValueError, match="ONE line"):
        distributed.locked_append(path, '{"e": 5}\n{"f": 6}')
