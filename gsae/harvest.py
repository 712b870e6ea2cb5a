"""Harvest (x, g) pairs at one hook of a frozen LM, store them in resumable shards, and read them back.

The g-SAE selection score needs, for every token, the residual activation ``x`` at the SAE site and the
gradient ``g`` of the LM loss with respect to it. ``capture`` gets both from ONE forward and ONE backward:
a forward hook swaps the activation for a detached leaf tensor, so nothing below the hook builds a graph
and the backward stops at the hook.

Gradient scale. ``g = d(sum over predicted tokens of next-token CE) / dx`` -- the SUM of the per-token
losses, not their mean. A mean would divide every token's gradient by B*(T-1), so the same token would
get a smaller g in a bigger batch or a longer context, and beta (which multiplies |W_dec g|) would
change meaning with the harvest settings. With the sum, g at position t is the effect of x_t on the
losses at positions t..T-2 of its own context, whatever the batch size.

Rows kept. The last position has no next token, so it has no loss of its own and its g is exactly 0
(under causal attention it reaches only its own, unscored, logits); it is always dropped. Position 0
(attention-sink / BOS-like outliers) is dropped when ``exclude_pos0``.

On disk: ``shard_00000.safetensors`` ... with ``x`` and ``g`` [n, d] in the storage dtype and int64
``tokens``, ``ctx_index``, ``pos`` [n] that map each row back to its context and position; a sidecar
``shard_00000.json`` (sha256, row count, statistics) written after each shard is the resume point; and
``manifest.json`` (gsae.io) marks the harvest complete. Shard i always covers the same contexts, so a
re-run after a crash recomputes exactly the missing shards and produces the same bytes (same device,
thread count and ``batch_contexts``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens import HookedTransformer

from . import distributed
from .config import HarvestConfig
from .io import (
    IntegrityError,
    read_json,
    read_manifest,
    save_tensors,
    sha256_file,
    verify_manifest,
    write_json,
    write_manifest,
)
from .lm import Capture, at_least_f32, capture, check_hook, check_tokens, frozen_params  # noqa: F401  (re-exported)
from .progress import bar as tqdm  # tqdm-compatible; draws on the terminal, never in a notebook
from .reader import ROW_INDEX_KEYS, ActivationReader, HarvestRows, rebuild_hint  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

GRADIENT_DEFINITION = "g = d(sum over predicted tokens of next-token cross-entropy) / dx  (sum, not mean)"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_UNDERFLOW = 1e-3
"""Largest fraction of g's nonzero entries that may round to zero in the storage dtype (float16 flushes
|g| < 6e-8); above it the harvest stops and says to store bfloat16 or float32."""


COSINE_BINS = 2000
"""Bins of the histogram of cos(g_free, g) over [-1, 1] each shard's sidecar keeps: the manifest's median cosine
(``label_free_cosine``) is read off it, to within 1/1000."""


# --------------------------------------------------------------------------------------------------
# The sampled label-free gradient
# --------------------------------------------------------------------------------------------------


def batch_generator(seed: int, first_context: int) -> torch.Generator:
    """The CPU generator of the draws for the batch starting at context ``first_context``: a pure function of
    the harvest seed and the batch, so a resumed or distributed harvest draws the same labels."""
    digest = hashlib.sha256(f"gsae-label-free:{int(seed)}:{int(first_context)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def sampled_next_tokens(logits: Tensor, samples: int, generator: torch.Generator) -> Tensor:
    """[B, T-1, S] next tokens drawn from the model's own predictive distribution softmax(logits[:, t]) at
    every predicting position t = 0..T-2, ``samples`` independent draws each. Inverse-CDF sampling with uniforms
    from the CPU ``generator`` (float32, in [0, 1)): the same draws on any device, given the logits."""
    probs = F.softmax(at_least_f32(logits[:, :-1].detach()), dim=-1)
    cdf = probs.cumsum(-1)
    u = torch.rand((*cdf.shape[:-1], samples), generator=generator, dtype=torch.float32)
    target = u.to(cdf.device, cdf.dtype) * cdf[..., -1:]
    return torch.searchsorted(cdf, target, right=True).clamp_max_(cdf.shape[-1] - 1)


def sampled_label_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """[B, T-1] mean over the S sampled labels ``labels`` [B, T-1, S] of the CE of each prediction: summed over
    positions, its gradient is the mean of the S gradients of the summed CE against one draw each (linearity),
    for one backward. A label-free gradient that IS one: E_y~p[CE(y)] has gradient 0, but each draw's gradient
    is the model's own 'surprise' direction, which the true-label gradient is one draw of (up to the data)."""
    logp = F.log_softmax(at_least_f32(logits[:, :-1]), dim=-1)
    return -logp.gather(-1, labels).mean(-1)


def capture_label_free(model: HookedTransformer, tokens: Tensor, hook_name: str, cfg: HarvestConfig,
                       first_context: int = 0) -> Capture:
    """``capture`` with g_free, the label-free gradient ``cfg.label_free`` names: "argmax" is
    ``gsae.lm.capture(..., label_free=True)`` itself; "sampled" the mean over ``cfg.label_free_samples`` draws
    (``sampled_next_tokens`` with ``batch_generator(cfg.label_free_seed, first_context)``) of the summed-CE
    gradient. g is computed exactly as ``capture`` does (same forward, same backward), so it has the same bits."""
    if cfg.label_free == "argmax":
        return capture(model, tokens, hook_name, True)
    check_tokens(tokens, 2)
    check_hook(model, hook_name)
    leaves: list[Tensor] = []

    def store_leaf(act: Tensor, hook: Any) -> Tensor:
        leaves.append(act.detach().requires_grad_(True))
        return leaves[-1]

    with frozen_params(model), torch.enable_grad(), model.hooks(fwd_hooks=[(hook_name, store_leaf)]):
        logits, per_token = model(tokens, return_type="both", loss_per_token=True, padding_side="right")
        if len(leaves) != 1:
            raise RuntimeError(f"hook {hook_name!r} fired {len(leaves)} times in one forward; expected once")
        loss_sum = per_token.sum()
        (g,) = torch.autograd.grad(loss_sum, leaves[0], retain_graph=True)
        labels = sampled_next_tokens(logits, cfg.label_free_samples, batch_generator(cfg.label_free_seed,
                                                                                      first_context))
        (g_free,) = torch.autograd.grad(sampled_label_ce(logits, labels).sum(), leaves[0])
    return Capture(x=leaves[0].detach(), g=g, loss_sum=loss_sum.detach(), n_pred=per_token.numel(), g_free=g_free)


def cosine_stats(g: Tensor, g_free: Tensor) -> dict[str, Any]:
    """Sum, count and ``COSINE_BINS``-bin histogram over [-1, 1] of the per-row cos(g_free, g) (float64; rows
    where either is zero are left out): what a shard's sidecar keeps for the manifest's ``label_free_cosine``."""
    g64, f64 = g.double(), g_free.double()
    norms = g64.norm(dim=-1) * f64.norm(dim=-1)
    ok = norms > 0
    cos = ((g64 * f64).sum(-1)[ok] / norms[ok]).clamp(-1.0, 1.0)
    hist = torch.histc(cos, bins=COSINE_BINS, min=-1.0, max=1.0) if cos.numel() else torch.zeros(COSINE_BINS)
    return {"cos_free_sum": float(cos.sum()), "cos_free_n": int(cos.numel()),
            "cos_free_hist": [int(c) for c in hist.tolist()]}


def cosine_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean and (histogram) median of cos(g_free, g) over every row of the shards ``records`` (None when a shard
    lacks the statistics, e.g. one written before they existed)."""
    if not records or any("cos_free_hist" not in r for r in records):
        return None
    n = sum(r["cos_free_n"] for r in records)
    if n == 0:
        return None
    counts = torch.tensor([r["cos_free_hist"] for r in records], dtype=torch.float64).sum(0)
    cum = counts.cumsum(0)
    i = int(torch.searchsorted(cum, torch.tensor([n / 2], dtype=torch.float64))[0])
    below = float(cum[i - 1]) if i > 0 else 0.0
    width = 2.0 / COSINE_BINS
    median = -1.0 + width * (i + (n / 2 - below) / max(float(counts[i]), 1.0))
    return {"mean": sum(r["cos_free_sum"] for r in records) / n, "median": median, "n_rows": n,
            "median_resolution": width / 2}


# --------------------------------------------------------------------------------------------------
# Harvest
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Which contexts and rows every shard holds; a pure function of the harvest settings."""

    n_tokens: int
    """Rows in the whole harvest (the split's token budget)."""
    ctx_len: int
    """Tokens per context (T)."""
    first_pos: int
    """First kept position (1 with exclude_pos0, else 0); positions first_pos..T-2 are kept."""
    ctx_per_shard: int
    """Whole contexts per shard (the last shard may hold fewer, and its last context may be truncated)."""
    n_contexts: int
    """Contexts used: ceil(n_tokens / rows_per_ctx)."""

    @property
    def rows_per_ctx(self) -> int:
        return self.ctx_len - 1 - self.first_pos

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_contexts / self.ctx_per_shard)

    def contexts(self, shard: int) -> tuple[int, int]:
        start = shard * self.ctx_per_shard
        return start, min(start + self.ctx_per_shard, self.n_contexts)

    def n_rows(self, shard: int) -> int:
        start, stop = self.contexts(shard)
        return min((stop - start) * self.rows_per_ctx, self.n_tokens - start * self.rows_per_ctx)


def make_plan(n_tokens: int, ctx_len: int, n_available: int, cfg: HarvestConfig) -> ShardPlan:
    first = 1 if cfg.exclude_pos0 else 0
    rows_per_ctx = ctx_len - 1 - first
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be > 0, got {n_tokens}")
    n_contexts = math.ceil(n_tokens / rows_per_ctx)
    if n_contexts > n_available:
        raise ValueError(f"harvesting {n_tokens} tokens needs {n_contexts} contexts of length {ctx_len} "
                         f"({rows_per_ctx} kept positions each) but only {n_available} were given; "
                         f"lower harvest.tokens for this split or supply more text")
    return ShardPlan(n_tokens=n_tokens, ctx_len=ctx_len, first_pos=first,
                     ctx_per_shard=max(1, cfg.shard_tokens // rows_per_ctx), n_contexts=n_contexts)


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def _sidecar(out_dir: Path, i: int) -> Path:
    return out_dir / f"shard_{i:05d}.json"


def _valid_sidecar(out_dir: Path, i: int, plan_hash: str) -> dict[str, Any] | None:
    """The shard's sidecar record if the shard exists, belongs to this plan and matches its sha256."""
    shard, side = out_dir / shard_name(i), _sidecar(out_dir, i)
    if not (shard.exists() and side.exists()):
        return None
    try:
        rec = read_json(side)
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("plan_hash") != plan_hash or rec.get("sha256") != sha256_file(shard):
        return None
    return rec


def _harvest_shard(model: HookedTransformer, contexts: Tensor, plan: ShardPlan, i: int, cfg: HarvestConfig,
                   hook_name: str, bar: Any, label_free: bool = False) -> tuple[dict[str, Tensor], dict[str, float]]:
    start, stop = plan.contexts(i)
    n_rows, first, last = plan.n_rows(i), plan.first_pos, plan.ctx_len - 1  # keep positions first..last-1
    dtype = DTYPES[cfg.dtype]
    xs, gs, fs = [], [], []
    loss_sum, n_pred, done = 0.0, 0, 0
    g_nonzero = g_flushed = 0
    for b0 in range(start, stop, cfg.batch_contexts):
        batch = contexts[b0:min(b0 + cfg.batch_contexts, stop)]
        cap = capture_label_free(model, batch, hook_name, cfg, b0) if label_free else capture(model, batch, hook_name)
        d = cap.x.shape[-1]
        xs.append(_to_storage(cap.x[:, first:last].reshape(-1, d), dtype, "x")[0])
        g_stored, nonzero, flushed = _to_storage(cap.g[:, first:last].reshape(-1, d), dtype, "g")
        gs.append(g_stored)
        g_nonzero, g_flushed = g_nonzero + nonzero, g_flushed + flushed
        if cap.g_free is not None:
            fs.append(_to_storage(cap.g_free[:, first:last].reshape(-1, d), dtype, "g_free")[0])
        loss_sum += float(cap.loss_sum)
        n_pred += cap.n_pred
        step = min(xs[-1].shape[0], n_rows - done)
        done += step
        bar.update(step)
    if g_flushed > MAX_UNDERFLOW * max(g_nonzero, 1):
        raise FloatingPointError(
            f"shard {i}: {g_flushed:,} of {g_nonzero:,} nonzero gradient entries ({g_flushed / g_nonzero:.2%}) round "
            f"to zero in harvest.dtype={cfg.dtype} (limit {MAX_UNDERFLOW:.1%}); store bfloat16 (float32's range) or "
            f"float32")
    x, g = torch.cat(xs)[:n_rows], torch.cat(gs)[:n_rows]
    ctx_index = torch.arange(start, stop).repeat_interleave(plan.rows_per_ctx)[:n_rows]
    pos = torch.arange(first, last).repeat(stop - start)[:n_rows]
    tensors = {"x": x, "g": g, "tokens": contexts[ctx_index, pos],
               "ctx_index": ctx_index, "pos": pos}
    # Statistics from the STORED values (after the dtype cast), so a resumed run reports the same numbers.
    stats = {"sum_sq_g": float(g.double().pow(2).sum()), "sum_sq_x": float(x.double().pow(2).sum()),
             "loss_sum": loss_sum, "n_pred": n_pred}
    if fs:
        tensors["g_free"] = g_free = torch.cat(fs)[:n_rows]
        stats.update(sum_sq_g_free=float(g_free.double().pow(2).sum()), **cosine_stats(g, g_free))
    return tensors, stats


def _to_storage(t: Tensor, dtype: torch.dtype, name: str) -> tuple[Tensor, int, int]:
    """``t`` cast to the storage dtype on CPU, with (nonzero entries, entries the cast flushed to zero). A value
    the cast turns into inf (float16 overflows above 65,504) is an error, not a silent inf on disk."""
    stored = t.to(dtype)
    if stored.dtype == t.dtype:
        return stored.to("cpu"), 0, 0
    if not bool(torch.isfinite(stored).all()):
        raise FloatingPointError(f"{name} overflows {dtype} (max |{name}| = {float(t.abs().max()):.4g}); store "
                                 f"bfloat16 or float32 (harvest.dtype)")
    nonzero = t != 0
    return stored.to("cpu"), int(nonzero.sum()), int((nonzero & (stored == 0)).sum())


def _check_disk(out_dir: Path, plan: ShardPlan, d: int, cfg: HarvestConfig, label_free: bool = False) -> None:
    row_bytes = (2 + label_free) * d * DTYPES[cfg.dtype].itemsize + len(ROW_INDEX_KEYS) * 8
    predicted = plan.n_tokens * row_bytes + 4096 * plan.n_shards
    already = sum((out_dir / shard_name(i)).stat().st_size for i in range(plan.n_shards)
                  if (out_dir / shard_name(i)).exists())
    needed = max(predicted - already, 0)
    free = shutil.disk_usage(out_dir).free
    if free < 1.2 * needed:
        raise OSError(f"not enough disk for the harvest in {out_dir}: it needs ~{needed / 1e9:.2f} GB "
                      f"(x 1.2 margin = {1.2 * needed / 1e9:.2f} GB) but {free / 1e9:.2f} GB are free; free space, "
                      f"lower harvest.tokens, or set harvest.dtype=float16 to halve it")


def harvest(model: HookedTransformer, contexts_tokens: Tensor, hook_name: str, out_dir: str | Path, *,
            n_tokens: int, cfg: HarvestConfig | None = None, meta: dict[str, Any] | None = None,
            progress: bool = True, label_free: bool = False) -> dict[str, Any]:
    """Harvest ``n_tokens`` (x, g) rows at ``hook_name`` from ``contexts_tokens`` [n_ctx, T] into ``out_dir``.

    Contexts are used in order; each keeps positions 1..T-2 (0..T-2 without ``cfg.exclude_pos0``). Returns
    the manifest. With ``label_free`` every shard also stores ``g_free``, the estimator ``cfg.label_free`` names
    (``capture_label_free``), and the manifest records its mean cosine with g (``label_free_cosine``).
    Resumable: a complete, verifying harvest is returned as is; otherwise shards whose sidecar
    matches are kept and the others recomputed. ``meta`` (e.g. model and data hashes) goes into the manifest
    and the plan hash, so a directory built from other inputs is never silently reused.

    Under torchrun (``gsae.distributed``) every rank computes the shards ``distributed.assign`` gives it, and
    rank 0 writes the manifest once all are done. Shard i is a pure function of the plan, so the shards and the
    manifest are byte-identical to a one-process harvest; a relaunch after a killed rank redoes only the missing
    shards.
    """
    cfg = cfg or HarvestConfig()
    check_tokens(contexts_tokens, 3 if cfg.exclude_pos0 else 2)
    check_hook(model, hook_name)
    meta = dict(meta or {}, **({"label_free_gradient": True} if label_free else {}))
    if label_free and cfg.label_free != "argmax":  # the argmax harvest keeps its plan hash (and directory)
        meta.update(label_free_estimator=cfg.label_free, label_free_samples=cfg.label_free_samples,
                    label_free_seed=cfg.label_free_seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = make_plan(int(n_tokens), contexts_tokens.shape[1], contexts_tokens.shape[0], cfg)
    contexts = contexts_tokens[:plan.n_contexts].to("cpu", torch.int64).contiguous()
    contexts_sha = hashlib.sha256(contexts.numpy().tobytes()).hexdigest()
    plan_record = {"plan": dataclasses.asdict(plan), "hook_name": hook_name, "dtype": cfg.dtype,
                   "batch_contexts": cfg.batch_contexts, "contexts_sha256": contexts_sha, "meta": meta}
    plan_hash = _plan_hash(plan_record)

    existing = read_manifest(out_dir)
    if existing is not None:
        if existing.get("plan_hash") not in (plan_hash, _plan_hash(_as_made(plan_record, existing))):
            raise ValueError(f"{out_dir} already holds a complete harvest of different inputs or settings "
                             f"(plan {existing.get('plan_hash')} != {plan_hash}); delete it or use another directory")
        try:
            return verify_manifest(out_dir, rebuild_hint(out_dir))
        except IntegrityError as e:
            log.warning("harvest manifest does not verify (%s); rebuilding the bad shards", e)
            distributed.barrier()  # every rank has read the manifest before rank 0 removes it
            if distributed.is_main():
                (out_dir / "manifest.json").unlink(missing_ok=True)

    dist = distributed.current()
    mine = distributed.assign(range(plan.n_shards), dist.rank, dist.world_size)
    for i in mine:  # temp files of this rank's writes killed mid-way (gsae.io.atomic_path)
        for stale in out_dir.glob(f".shard_{i:05d}.*.tmp"):
            stale.unlink(missing_ok=True)
    d = model.cfg.d_model
    _check_disk(out_dir, plan, d, cfg, label_free)

    reused = 0
    total = sum(plan.n_rows(i) for i in mine)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"harvest {hook_name}", disable=not progress)
    with bar:
        for i in mine:
            rec = _valid_sidecar(out_dir, i, plan_hash)
            if rec is not None:
                reused += 1
                bar.update(rec["n_rows"])
                continue
            tensors, stats = _harvest_shard(model, contexts, plan, i, cfg, hook_name, bar, label_free)
            start, stop = plan.contexts(i)
            # One metadata key only: safetensors stores metadata in a hash map whose order is not
            # fixed, and several keys could make the bytes (and sha256) differ between runs.
            info = json.dumps({"shard": i, "ctx_start": start, "ctx_stop": stop, "plan_hash": plan_hash})
            sha = save_tensors(out_dir / shard_name(i), tensors, metadata={"gsae": info})
            write_json(_sidecar(out_dir, i), {"file": shard_name(i), "sha256": sha, "n_rows": plan.n_rows(i),
                                              "ctx_start": start, "ctx_stop": stop, "plan_hash": plan_hash, **stats})
    reused = sum(distributed.all_gather_object(reused))  # doubles as the barrier: every shard is on disk
    if distributed.is_main():
        _write_harvest_manifest(out_dir, plan, plan_hash, contexts_sha, hook_name, d, cfg, meta, reused)
    distributed.barrier()  # the other ranks return once the manifest exists
    return read_manifest(out_dir)


NAME_ONLY = ("profile",)
"""Entries of a harvest's ``meta`` that name who made it and change none of its bytes: a complete harvest made
under another profile's name (``gsae.adopt``) serves this one when everything else of its plan is the same."""


def _plan_hash(plan_record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(plan_record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _as_made(plan_record: dict[str, Any], existing: dict[str, Any]) -> dict[str, Any]:
    """``plan_record`` with the ``NAME_ONLY`` entries the existing harvest was made under."""
    made = existing.get("meta") or {}
    return {**plan_record, "meta": {**plan_record["meta"], **{k: made[k] for k in NAME_ONLY if k in made}}}


def _write_harvest_manifest(out_dir: Path, plan: ShardPlan, plan_hash: str, contexts_sha: str, hook_name: str,
                            d: int, cfg: HarvestConfig, meta: dict[str, Any], reused: int) -> dict[str, Any]:
    """The manifest of a harvest whose shards are all on disk, from their sidecars (written after each shard)."""
    records = []
    for i in range(plan.n_shards):
        rec = read_json(_sidecar(out_dir, i))
        if rec.get("plan_hash") != plan_hash:
            raise IntegrityError(f"{_sidecar(out_dir, i)} belongs to another plan; {rebuild_hint(out_dir)}")
        records.append(rec)
    n = sum(r["n_rows"] for r in records)
    mean_sq_g = sum(r["sum_sq_g"] for r in records) / n
    mean_sq_x = sum(r["sum_sq_x"] for r in records) / n
    if mean_sq_g <= 0:
        raise RuntimeError("every harvested gradient is zero; check hook_name (it must lie below the logits)")
    manifest_meta = {
        "stage": "harvest", "hook_name": hook_name, "d_model": d, "dtype": cfg.dtype, "n_tokens": n,
        "ctx_len": plan.ctx_len, "first_pos": plan.first_pos, "n_contexts": plan.n_contexts,
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),  # as read back (tuples become lists)
        "plan": dataclasses.asdict(plan), "plan_hash": plan_hash,
        "contexts_sha256": contexts_sha, "meta": meta, "gradient_definition": GRADIENT_DEFINITION,
        "shards": [{k: r[k] for k in ("file", "n_rows", "ctx_start", "ctx_stop")} for r in records],
        "grad_stats": {"mean_sq_norm_g": mean_sq_g, "mean_sq_norm_x": mean_sq_x,
                       "grad_scale": math.sqrt(d / mean_sq_g),
                       "mean_loss": sum(r["loss_sum"] for r in records) / sum(r["n_pred"] for r in records)},
        "resumed_shards": reused,
    }
    if all("sum_sq_g_free" in r for r in records):
        gs = manifest_meta["grad_stats"]
        gs["mean_sq_norm_g_free"] = sum(r["sum_sq_g_free"] for r in records) / n
        if meta.get("label_free_estimator", "argmax") != "argmax" and gs["mean_sq_norm_g_free"] > 0:
            # its own dataset constant; the argmax g_free keeps the true-label grad_scale (v2's definition)
            gs["grad_scale_free"] = math.sqrt(d / gs["mean_sq_norm_g_free"])
        manifest_meta["label_free_cosine"] = cosine_summary(records)
    manifest = write_manifest(out_dir, manifest_meta, files=[r["file"] for r in records])
    bad = [r["file"] for r in records if manifest["files"][r["file"]] != r["sha256"]]
    if bad:
        (out_dir / "manifest.json").unlink()
        raise IntegrityError(f"{out_dir / bad[0]} does not match the sha256 its sidecar recorded; "
                             f"{rebuild_hint(out_dir)}")
    return manifest


# --------------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(model: HookedTransformer, tokens: Tensor, hook_name: str, n_batches: int = 5) -> dict:
    """Tokens/s of the harvest step vs two references on the same batch ``tokens`` [B, T], in this process.

    - ``harvest``: ``capture`` at ``hook_name`` plus the row selection and the copy to CPU.
    - ``fwd_bwd`` (the fair baseline): forward with the summed loss plus ONE autograd.grad with respect to the
      embedding output (``blocks.0.hook_resid_pre``), params frozen: a full-depth forward+backward with no
      weight gradients, i.e. what any gradient-at-a-layer method costs at worst. ratio > 1 means the harvest
      step is cheaper, since its backward stops at the hook.
    - ``forward``: inference-mode forward to the logits (the floor).
    Token counts are input tokens B*T per step.
    """
    device = next(model.parameters()).device

    def harvest_step() -> None:
        cap = capture(model, tokens, hook_name)
        cap.x[:, 1:-1].reshape(-1, cap.x.shape[-1]).to("cpu")
        cap.g[:, 1:-1].reshape(-1, cap.g.shape[-1]).to("cpu")

    def fwd_bwd_step() -> None:
        capture(model, tokens, "blocks.0.hook_resid_pre")

    def forward_step() -> None:
        with torch.inference_mode():
            model(tokens, return_type="logits")

    steps = {"harvest": harvest_step, "fwd_bwd": fwd_bwd_step, "forward": forward_step}
    seconds = dict.fromkeys(steps, 0.0)
    for step in steps.values():
        step()  # warm-up (allocator, kernels)
    # Round-robin, so a change in machine load during the measurement hits all three alike.
    for _ in range(n_batches):
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            seconds[name] += time.perf_counter() - t0
    rates = {name: n_batches * tokens.numel() / s for name, s in seconds.items()}
    return {"harvest_tok_per_s": rates["harvest"], "fwd_bwd_tok_per_s": rates["fwd_bwd"],
            "forward_tok_per_s": rates["forward"], "ratio_vs_fwd_bwd": rates["harvest"] / rates["fwd_bwd"],
            "ratio_vs_forward": rates["harvest"] / rates["forward"], "tokens_per_batch": tokens.numel()}
