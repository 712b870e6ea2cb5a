"""Reading a completed harvest (``gsae.harvest``) with bounded memory: shuffled training batches, rows in harvest
order in fixed-size chunks, and the split statistics the evaluation needs (mean activation, median norm).

Integrity: every shard's sha256 is checked against the manifest the first time a reader loads it (an
``IntegrityError`` names the file), not on every load: at paper scale one SAE reads the train split four times
and the grid holds dozens of SAEs, so re-hashing each load would read the disk twice as often as the data.

GPU runs: ``batches(device=cuda)`` loads the next window of shards in a background thread while the current
one is consumed, and sends each batch through pinned memory, converting to float32 after the copy. A reader
``held_in(device)`` keeps every shard on the device instead (loaded and verified once), so the same shuffles and
slices run there: the same batches, bit for bit, with no disk read or copy per batch (``runtime.train_data``).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .io import IntegrityError, load_tensors, read_manifest
from .runtime import to_device

ROW_INDEX_KEYS = ("tokens", "ctx_index", "pos")
IN_MEMORY_BYTES = 2 << 30
"""A split whose float32 activations fit in this many bytes is read whole for its statistics (the v1 arithmetic,
bit for bit); a bigger one (the paper profile's 154 GB train split) is streamed, with float64 sums."""


def rebuild_hint(harvest_dir: str | Path) -> str:
    return f"delete the harvest directory {harvest_dir} and re-run the harvest stage to rebuild it"


def gradient_scale(manifest: dict[str, Any], gradient: str = "g") -> float:
    """The dataset constant that scales ``gradient`` ("g" or "g_free") in a g-SAE's score, from a harvest manifest
    (the train split's, where the constants are set): g_free's own ``grad_scale_free`` where the harvest recorded one
    (the "sampled" estimator, ``HarvestConfig.label_free``), else the true-label ``grad_scale`` (the argmax g_free of
    v2 is scaled like g)."""
    stats = manifest["grad_stats"]
    if gradient == "g_free" and "grad_scale_free" in stats:
        return float(stats["grad_scale_free"])
    return float(stats["grad_scale"])


class HarvestRows(NamedTuple):
    x: Tensor
    """[n, d] float32 activations."""
    g: Tensor
    """[n, d] float32 gradients."""
    meta: dict[str, Tensor]
    """int64 [n] tensors ``tokens``, ``ctx_index``, ``pos`` mapping each row to its context and position."""
    g_free: Tensor | None = None
    """[n, d] float32 label-free gradients, when the harvest stored them."""

    def gradient(self, mode: str) -> Tensor | None:
        """The gradient encoder ``mode`` uses: "g" -> g, "g_free" -> g_free, "plain" -> None."""
        if mode == "g_free" and self.g_free is None:
            raise KeyError("this harvest stored no g_free; add the split to harvest.label_free_splits")
        return {"g": self.g, "g_free": self.g_free, "plain": None}[mode]


def _rows(part: dict[str, Tensor]) -> HarvestRows:
    return HarvestRows(part["x"].float(), part["g"].float(), {k: part[k] for k in ROW_INDEX_KEYS},
                       part["g_free"].float() if "g_free" in part else None)


class SplitStats(NamedTuple):
    mean: Tensor
    """[d] float32 mean activation (the mean-ablation baseline)."""
    median_norm: float
    """Median row norm (the unit of steering strengths and of the massive-activation cap)."""
    n: int


class ActivationReader:
    """Reads a completed harvest: seeded shuffled (x, g) batches, or rows in harvest order, with bounded memory.

    With ``verify`` each shard's sha256 is checked against the manifest on its first load by this reader, so a
    corrupted file raises ``IntegrityError`` naming it instead of feeding wrong numbers to training.
    """

    def __init__(self, harvest_dir: str | Path, *, verify: bool = True):
        self.dir = Path(harvest_dir)
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise FileNotFoundError(f"{self.dir} has no manifest.json: the harvest did not complete; "
                                    f"run (or re-run) the harvest stage")
        self.manifest = manifest
        self.verify = verify
        self.shards: list[dict[str, Any]] = manifest["shards"]
        self.n_tokens: int = int(manifest["n_tokens"])
        self.d: int = int(manifest["d_model"])
        self._verified: set[str] = set()
        self._held: list[dict[str, Tensor]] | None = None
        if verify:
            missing = [s["file"] for s in self.shards if not (self.dir / s["file"]).exists()]
            if missing:
                raise IntegrityError(f"{self.dir / missing[0]} listed in the manifest is missing; "
                                     f"{rebuild_hint(self.dir)}")

    def grad_scale(self, gradient: str = "g") -> float:
        """``gradient_scale`` of this harvest's manifest."""
        return gradient_scale(self.manifest, gradient)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the split's shard files (x, g, g_free and the row index as stored): what ``held_in`` keeps."""
        return sum((self.dir / s["file"]).stat().st_size for s in self.shards)

    def held_in(self, device: torch.device | str) -> ActivationReader:
        """A reader of the same harvest whose shards are all loaded now (each verified against the manifest) and
        kept on ``device`` in their stored dtype: every later read (batches, chunks, statistics) is served from
        there, with the same shuffles, so the same values as reading the disk."""
        held = ActivationReader(self.dir, verify=self.verify)
        held._held = [{k: v.to(device) for k, v in self._load(i).items()} for i in range(len(self.shards))]
        return held

    @property
    def held_device(self) -> torch.device | None:
        """The device ``held_in`` put the shards on (None: read from the disk)."""
        return None if not self._held else self._held[0]["x"].device

    def _load(self, i: int) -> dict[str, Tensor]:
        if self._held is not None:
            return self._held[i]
        name = self.shards[i]["file"]
        sha = self.manifest["files"][name] if self.verify and name not in self._verified else None
        out = load_tensors(self.dir / name, sha256=sha, rebuild_hint=rebuild_hint(self.dir))
        self._verified.add(name)
        return out

    def _windows(self, seed: int, window: int, prefetch: bool, gradient: str = "g") -> Iterator[tuple[Tensor, Tensor]]:
        """Endless stream of shuffled windows: per epoch a new shard order, rows shuffled within W shards. With
        ``prefetch`` the next window of the epoch is loaded AND shuffled in a thread while this one is consumed;
        the generator is drawn in the main thread in the same order either way (epoch order, then each window's
        permutation), so both give the same stream."""
        gen = torch.Generator().manual_seed(seed)

        def shuffled(group: list[int], perm: Tensor) -> tuple[Tensor, Tensor]:
            parts = [self._load(i) for i in group]
            if gradient not in parts[0]:
                raise KeyError(f"this harvest stored no {gradient!r}; add the split to harvest.label_free_splits "
                               f"and re-harvest")
            x, g = torch.cat([p["x"] for p in parts]), torch.cat([p[gradient] for p in parts])
            if x.shape[0] != perm.numel():
                raise IntegrityError(f"shards {group} of {self.dir} hold {x.shape[0]} rows, the manifest says "
                                     f"{perm.numel()}; {rebuild_hint(self.dir)}")
            perm = perm.to(x.device)  # drawn on the CPU generator either way: the same order on any device
            return x[perm], g[perm]

        with ThreadPoolExecutor(1) if prefetch else _Inline() as pool:
            while True:
                order = torch.randperm(len(self.shards), generator=gen).tolist()
                groups = [order[w:w + window] for w in range(0, len(order), window)]

                def submit(group: list[int]) -> Any:
                    n = sum(int(self.shards[i]["n_rows"]) for i in group)
                    return pool.submit(shuffled, group, torch.randperm(n, generator=gen))

                pending = submit(groups[0])
                for j in range(len(groups)):
                    x, g = pending.result()
                    if j + 1 < len(groups):
                        pending = submit(groups[j + 1])
                    yield x, g

    def batches(self, batch_size: int, seed: int, *, epochs: int | None = None, n_tokens: int | None = None,
                window: int = 2, device: torch.device | None = None,
                gradient: str = "g") -> Iterator[tuple[Tensor, Tensor]]:
        """Yield float32 (x, g) batches of ``batch_size`` rows: ``epochs`` passes over the data or exactly
        ``n_tokens`` rows (cycling epochs); the last batch holds the remainder. Batches run across window and
        epoch boundaries. The same seed gives the identical stream, on any device. On a CUDA ``device`` the
        batches arrive there (pinned, non-blocking) and the next window is prefetched. ``gradient="g_free"``
        yields the label-free gradient instead of g."""
        if (epochs is None) == (n_tokens is None):
            raise ValueError("give exactly one of epochs= or n_tokens=")
        if batch_size <= 0 or window <= 0:
            raise ValueError(f"batch_size and window must be > 0, got {batch_size}, {window}")
        remaining = n_tokens if n_tokens is not None else epochs * self.n_tokens
        if remaining <= 0:
            raise ValueError(f"nothing to read: epochs={epochs}, n_tokens={n_tokens}")
        gpu = device is not None and device.type != "cpu"
        rest_x = rest_g = None
        for x, g in self._windows(seed, window, prefetch=gpu and self._held is None, gradient=gradient):
            if rest_x is not None:
                x, g = torch.cat([rest_x, x]), torch.cat([rest_g, g])
            start = 0
            while remaining > 0 and x.shape[0] - start >= min(batch_size, remaining):
                n = min(batch_size, remaining)
                if gpu:
                    yield (to_device(x[start:start + n], device, torch.float32),
                           to_device(g[start:start + n], device, torch.float32))
                else:
                    yield (x[start:start + n].to(torch.float32, copy=True),
                           g[start:start + n].to(torch.float32, copy=True))
                start, remaining = start + n, remaining - n
            if remaining == 0:
                return
            rest_x, rest_g = x[start:], g[start:]

    def chunks(self, chunk: int, max_tokens: int | None = None) -> Iterator[HarvestRows]:
        """The first ``max_tokens`` rows (all by default) in harvest order, as float32 chunks of exactly ``chunk``
        rows (the last may be shorter), cut across shard boundaries: at most a shard and a chunk in memory, and
        the same chunks as slicing ``load_all()`` would give."""
        if chunk <= 0:
            raise ValueError(f"chunk must be > 0, got {chunk}")
        limit = self.n_tokens if max_tokens is None else min(max_tokens, self.n_tokens)
        rest: dict[str, Tensor] | None = None
        done = pending = 0  # rows yielded / rows carried over to the next shard
        for i in range(len(self.shards)):
            if done + pending >= limit:
                break
            t = self._load(i)
            take = min(t["x"].shape[0], limit - done - pending)
            cur = {k: v[:take] for k, v in t.items()}
            if rest is not None:
                cur = {k: torch.cat([rest[k], v]) for k, v in cur.items()}
            n = cur["x"].shape[0]
            final = done + n >= limit
            start = 0
            while n - start >= chunk or (final and start < n):
                m = min(chunk, n - start)
                part = {k: v[start:start + m] for k, v in cur.items()}
                yield _rows(part)
                start += m
            done, pending = done + start, n - start
            rest = {k: v[start:] for k, v in cur.items()} if pending else None

    def load_all(self, max_tokens: int | None = None) -> HarvestRows:
        """The first ``max_tokens`` rows (all by default) in harvest order, as float32 (for eval-sized splits)."""
        limit = self.n_tokens if max_tokens is None else min(max_tokens, self.n_tokens)
        parts, have = [], 0
        for i in range(len(self.shards)):
            if have >= limit:
                break
            t = self._load(i)
            take = min(t["x"].shape[0], limit - have)
            parts.append({k: v[:take] for k, v in t.items()})
            have += take
        cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return _rows(cat)

    def meta(self) -> dict[str, Tensor]:
        """The int64 row index (``tokens``, ``ctx_index``, ``pos``) of every row, without x and g."""
        parts = [{k: self._load(i)[k] for k in ROW_INDEX_KEYS} for i in range(len(self.shards))]  # x, g dropped
        return {k: torch.cat([p[k] for p in parts]) for k in ROW_INDEX_KEYS}

    def statistics(self, chunk: int = 1 << 16) -> SplitStats:
        """Mean activation and median row norm of the split. A split within ``IN_MEMORY_BYTES`` is read whole
        and reduced exactly as v1 did (same bits); a larger one is streamed: float64 sums for the mean, row
        norms (each computed alone, so the same values) gathered for the median."""
        from .steering import median_activation_norm

        if self.n_tokens * self.d * 4 <= IN_MEMORY_BYTES:
            x = self.load_all().x
            return SplitStats(x.mean(0), median_activation_norm(x), self.n_tokens)
        total = torch.zeros(self.d, dtype=torch.float64)
        norms = []
        for rows in self.chunks(chunk):
            x64 = rows.x.double()
            total += x64.sum(0)
            norms.append(x64.norm(dim=-1).numpy())
        return SplitStats((total / self.n_tokens).float(), float(np.median(np.concatenate(norms))), self.n_tokens)


class _Inline:
    """A stand-in for a one-thread executor that runs a job only when its result is asked for (CPU runs: no
    extra thread, and no window loaded before it is needed)."""

    class _Lazy:
        def __init__(self, fn: Any, args: tuple):
            self.fn, self.args = fn, args

        def result(self) -> Any:
            return self.fn(*self.args)

    def submit(self, fn: Any, *args: Any) -> _Lazy:
        return self._Lazy(fn, args)

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None
