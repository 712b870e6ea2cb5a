"""Run pipeline stages on several processes with ``torchrun``, or on one with no launcher at all.

The stages split work, they do not split tensors: each rank takes whole work items (harvest shards, SAE
training jobs) and writes its own files, so an item's bytes never depend on which rank ran it or on the
world size. The only collective steps are a barrier before a stage is declared complete (rank 0 then
writes the manifest), ``main_first`` for downloads and caches, and small object gathers.

    dist = distributed.init()                  # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*
    with distributed.main_first():             # rank 0 downloads, the others wait and then read the cache
        model = load_model()
    for shard in distributed.assign(range(plan.n_shards), dist.rank, dist.world_size):
        ...                                    # resumable: a killed rank redoes only its missing shards
    distributed.barrier()
    if distributed.is_main():
        write_manifest(...)

World size 1 (plain ``python -m gsae.pipeline ...``) needs no environment variables and creates no process
group; every function here then degrades to the single-process behaviour (``barrier`` does nothing,
``all_gather_object(x)`` is ``[x]``).

Append-only JSONL files written by several ranks (the runs registry) go through ``locked_append``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")

DEFAULT_TIMEOUT = datetime.timedelta(hours=2)
"""How long a collective (barrier, gather) waits for the slowest rank. Longer than torch's default
(30 min for gloo, 10 min for nccl) because ranks legitimately wait a long time: at ``main_first`` while
rank 0 downloads a model, and at the end-of-stage barrier while the slowest rank finishes its shards.
A rank that dies does not leave the others waiting this long: torchrun stops the whole group."""

_LAUNCH_HINT = "launch with `torchrun --nproc_per_node=N -m gsae.pipeline ...`, or unset WORLD_SIZE to run one process"


class Dist(NamedTuple):
    rank: int
    """Global rank of this process, 0..world_size-1."""
    world_size: int
    """Number of processes; 1 without a launcher."""
    local_rank: int
    """Rank on this machine (which GPU to use)."""
    device: torch.device
    """Where this rank should compute: ``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""


def _env_int(name: str, default: int | None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment variable {name} is not set but WORLD_SIZE > 1; {_LAUNCH_HINT}")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; {_LAUNCH_HINT}") from None


def _device_hint(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _from_env() -> Dist:
    """The rank layout torchrun announced in the environment (world 1 when nothing is set)."""
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}; {_LAUNCH_HINT}")
    if world == 1:
        rank, local = 0, _env_int("LOCAL_RANK", 0)
    else:
        rank, local = _env_int("RANK", None), _env_int("LOCAL_RANK", None)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}); {_LAUNCH_HINT}")
    return Dist(rank=rank, world_size=world, local_rank=local, device=_device_hint(local))


def current() -> Dist:
    """This process's rank layout. Raises if torchrun started several processes but ``init`` was not called
    (every rank would otherwise believe it is the only one and, e.g., all write the manifest)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        rank, local = torch_dist.get_rank(), _env_int("LOCAL_RANK", 0)
        return Dist(rank=rank, world_size=torch_dist.get_world_size(), local_rank=local, device=_device_hint(local))
    world = _env_int("WORLD_SIZE", 1)
    if world > 1:
        raise RuntimeError(f"WORLD_SIZE={world} but the process group is not initialised; "
                           f"call gsae.distributed.init() at the start of the program")
    return _from_env()


def init(backend: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Dist:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    ``backend``: None picks nccl when CUDA is available and gloo otherwise; pass "gloo" to force CPU
    collectives on a GPU machine. World size 1 creates no process group. Calling it again is a no-op.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        return current()
    d = _from_env()
    if d.world_size == 1:
        return d
    if not torch_dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run with WORLD_SIZE unset (one process)")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ValueError(f"WORLD_SIZE={d.world_size} but {', '.join(missing)} not set; {_LAUNCH_HINT}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device_id = None
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA but none is available; use backend='gloo' on CPU")
        if d.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={d.local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                             f"lower --nproc_per_node")
        torch.cuda.set_device(d.local_rank)
        device_id = d.device  # binds this rank's communicator to its own GPU (no guessing in barrier())
    torch_dist.init_process_group(backend=backend, init_method="env://", timeout=timeout, device_id=device_id)
    return current()


def shutdown() -> None:
    """Destroy the process group (if any); call once at the end so no rank exits with a live communicator."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0 (the rank that downloads, writes manifests and prints summaries)."""
    return current().rank == 0


def barrier() -> None:
    """Wait until every rank reaches this point; nothing at world size 1."""
    if current().world_size > 1:
        torch_dist.barrier()


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), indexed by rank; ``[obj]`` at world size 1."""
    d = current()
    if d.world_size == 1:
        return [obj]
    out: list[Any] = [None] * d.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (the others' argument is ignored); ``obj`` at world size 1."""
    if current().world_size == 1:
        return obj
    box: list[Any] = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (downloads, cache builds); the others wait, then run it themselves.

    The others run the body AFTER rank 0 finished, so it should be idempotent (load from the cache rank 0
    filled). If rank 0's body raises, the other ranks raise too instead of waiting at a barrier forever.
    """
    d = current()
    if d.world_size == 1:
        yield
        return
    if d.rank == 0:
        try:
            yield
        except BaseException as e:
            broadcast_object(f"{type(e).__name__}: {e}")
            raise
        broadcast_object(None)
    else:
        error = broadcast_object(None)  # doubles as the barrier: returns once rank 0 is done
        if error is not None:
            raise RuntimeError(f"rank 0 failed inside main_first ({error}); see rank 0's traceback")
        yield


# --------------------------------------------------------------------------------------------------
# Work assignment
# --------------------------------------------------------------------------------------------------


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def assign(items: Iterable[T], rank: int, world_size: int) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item starting at ``rank`` (round robin).

    A pure function of the item order, so a resumed or relaunched rank gets the same items back, and the
    ranks' shares partition ``items`` exactly.
    """
    _check_rank(rank, world_size)
    return list(items)[rank::world_size]


def partition_groups(items: Sequence[T], key: Callable[[T], Hashable], world_size: int) -> list[list[T]]:
    """Split ``items`` over ``world_size`` ranks keeping items with the same ``key`` on one rank.

    Groups are placed largest first on the least-loaded rank (load = items so far); ties between groups go
    to the one whose first item comes first in ``items``, ties between ranks to the lowest rank. Each
    rank's items keep their order in ``items``. Deterministic for a given item order and key.
    """
    _check_rank(0, world_size)
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    load = [0] * world_size
    owner = [0] * len(items)
    for members in sorted(groups.values(), key=lambda m: (-len(m), m[0])):
        r = min(range(world_size), key=lambda j: (load[j], j))
        load[r] += len(members)
        for i in members:
            owner[i] = r
    return [[item for i, item in enumerate(items) if owner[i] == r] for r in range(world_size)]


def assign_groups(items: Sequence[T], key: Callable[[T], Hashable], rank: int, world_size: int) -> list[T]:
    """This rank's share of ``items`` with whole ``key`` groups kept together (see ``partition_groups``),
    e.g. every SAE of one seed on one rank so they share one pass over that seed's activation stream."""
    _check_rank(rank, world_size)
    return partition_groups(items, key, world_size)[rank]


# --------------------------------------------------------------------------------------------------
# Shared append-only files
# --------------------------------------------------------------------------------------------------


def locked_append(path: str | Path, line: str, *, fsync: bool = False) -> None:
    """Append one line to ``path`` (created if absent), safe with several processes appending at once.

    An exclusive ``flock`` on the file serialises writers, and the line goes out in one ``write`` on an
    O_APPEND descriptor, so lines never interleave or overwrite each other. If a writer was killed half-way
    through a line, the file ends without a newline; the next line then starts on a fresh line, so only
    the torn line is unreadable. ``fsync`` forces it to disk before returning (slower). flock is advisory
    and meant for one machine (all ranks of ``torchrun --nproc_per_node``).
    """
    if "\n" in line.rstrip("\n"):
        raise ValueError(f"locked_append writes ONE line; got text with inner newlines: {line[:80]!r}…")
    data = (line.rstrip("\n") + "\n").encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # readable for the torn-line check
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # the previous writer died mid-line
            view = memoryview(data)
            while view:  # a regular-file write is rarely partial, but the lock keeps a retry contiguous
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
