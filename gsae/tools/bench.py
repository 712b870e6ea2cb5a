"""Speed of the SAE training step and of the harvest, as ratios against baselines run in the same process.

    python -m gsae.tools.bench [--quick] [--json out.json] [--smoke-e2e] [--model tiny-random|smollm2-135m]
                               [--threads N]
    python -m gsae.tools.bench --readme results/bench/*.json    (docs/performance.md's table)

(``python -m gsae.tools.gpu_check`` checks that a GPU is ready for the paper profile.)

The machine is assumed noisy (shared cores), so every figure is a RATIO against a baseline measured in the
same process, with the repetitions of all candidates interleaved (round-robin) and the median of the
per-repetition ratios reported. What is timed:

- ``ours_topk`` / ``ours_gsae``: ``gsae.train.train_sae`` itself (forward with AuxK, backward, finite check,
  decoder-gradient projection, Adam, decoder renormalisation, dead-latent bookkeeping) over ``steps``
  pre-generated batches; tokens/s = tokens / ``TrainResult.seconds`` (construction excluded).
- ``saelens_topk``: SAELens' ``TopKTrainingSAE`` (same d_in, d_sae, k; apply_b_dec_to_input=True,
  rescale_acts_by_decoder_norm=False, aux coefficient as ours, started from our initial weights) doing, per
  batch: ``training_forward_pass`` (encode, dense TopK, decode, MSE + its TopK AuxK loss with the same
  dead mask rule), ``loss.backward()``, ``Adam.step()``. ``saelens_sparse`` is the same with
  ``use_sparse_activations=True``.
- ``ours_auxk_fwd_bwd`` / ``saelens_auxk_fwd_bwd``: forward + backward only, TopK, AuxK on with a fixed random
  ``dead_fraction`` of latents dead (the timed training runs above rarely have dead latents on synthetic data).
- ``gemm``: one dense fp32 [N, d_in] x [d_in, d_sae] product per step: the roofline of the encoder GEMM.
  Achieved GFLOP/s of our step counts only the d_sae-wide dense GEMMs it performs (one for TopK, two for
  the g-SAE: encoder + attribution), so "fraction of roofline" = that GEMM time / the whole step time.
- harvest: ``gsae.harvest.measure_throughput`` (harvest step vs a bare LM forward+backward of the same batch).
- peak RSS per phase (the kernel's high-water mark, reset before each phase where Linux allows it).
- ``--smoke-e2e``: wall time of ``./run_all.sh --profile smoke`` (not a ratio; recorded with its exit code).

Threads: on 2 cores shared with other processes, OpenMP's default spin-waiting makes every parallel op wait
for a descheduled sibling thread; ``OMP_WAIT_POLICY=PASSIVE`` (set before Python starts) or ``--threads 1``
avoid it. The JSON records the thread count, the OpenMP environment and the load average.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..config import SAEConfig, TrainConfig
from ..paths import ROOT
from ..train import train_sae


@dataclass(frozen=True)
class BenchConfig:
    d_in: int = 576
    """Activation width (SmolLM2-135M's d_model)."""
    d_sae: int = 4608
    """Latents (expansion 8)."""
    k: int = 32
    """Latents kept per token."""
    batch: int = 1024
    """Tokens per training step."""
    steps: int = 6
    """Training steps per timed run (the first one, with its allocations, included)."""
    reps: int = 5
    """Interleaved repetitions of every candidate; medians are reported."""
    beta: float = 1.0
    """beta of the g-SAE arm."""
    dead_tokens: int = 2048
    """Dead-latent window of the timed training runs (on the synthetic data few or no latents die within
    ``steps``, so these runs time the step without AuxK; the ``*_auxk_fwd_bwd`` runs time it with AuxK)."""
    dead_fraction: float = 0.1
    """Fraction of latents marked dead in the AuxK forward+backward comparison."""
    harvest_batch: tuple[int, int] = (8, 64)
    """[contexts, ctx_len] of the harvest throughput batch."""
    harvest_batches: int = 3
    """LM batches per harvest timing."""
    harvest_reps: int = 3
    """Calls of measure_throughput (medians reported)."""
    warmup: bool = True
    """Run every candidate once, untimed, before the timed repetitions."""


QUICK = BenchConfig(d_in=32, d_sae=128, k=4, batch=64, steps=2, reps=1, dead_tokens=64, harvest_batch=(2, 16),
                    harvest_batches=1, harvest_reps=1, warmup=False)


# ------------------------------------------------------------------------------------------------ memory
def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux: write 5 to /proc/self/clear_refs); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim), so a phase's peak is not hidden by the last's."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_peak_rss(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn`` and report the process' peak RSS during it (MB), and that peak minus the RSS before it."""
    _release_free_memory()  # (no gc.collect: 0.7 s with torch + SAELens loaded, and tensors free by refcount)
    before = _proc_status_kb("VmRSS")
    exact = _reset_peak_rss()
    fn()
    peak = _proc_status_kb("VmHWM") if exact else None
    if peak is None:  # lifetime peak: an upper bound on the phase's
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": round(peak / 1024, 1), "above_start_mb": round((peak - (before or 0)) / 1024, 1),
            "phase_exact": exact}


# ------------------------------------------------------------------------------------------------ data
def synthetic_batches(cfg: BenchConfig, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, g) batches with sparse structure: x sums k_true random unit directions (plus noise), g is a fixed
    random linear map of x plus noise, so both the TopK and the gradient-guided selection have something to find."""
    gen = torch.Generator().manual_seed(seed)
    n_dirs = cfg.d_sae
    dirs = torch.randn(n_dirs, cfg.d_in, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    mix = torch.randn(cfg.d_in, cfg.d_in, generator=gen) / cfg.d_in**0.5
    out = []
    for _ in range(cfg.steps):
        idx = torch.rand(cfg.batch, n_dirs, generator=gen).topk(cfg.k, dim=-1).indices
        coef = torch.rand(cfg.batch, cfg.k, generator=gen) * 2 + 0.5
        x = (coef[..., None] * dirs[idx]).sum(1) + 0.1 * torch.randn(cfg.batch, cfg.d_in, generator=gen)
        g = x @ mix + 0.1 * torch.randn(cfg.batch, cfg.d_in, generator=gen)
        out.append((x, g))
    return out


# ------------------------------------------------------------------------------------------------ training
def _configs(cfg: BenchConfig, batches, beta: float) -> tuple[SAEConfig, TrainConfig]:
    g2 = torch.cat([g for _, g in batches]).pow(2).sum(-1).mean().item()
    sae_cfg = SAEConfig(d_in=cfg.d_in, d_sae=cfg.d_sae, k=cfg.k, beta=beta, grad_scale=math.sqrt(cfg.d_in / g2))
    train_cfg = TrainConfig(tokens=cfg.steps * cfg.batch, batch_size=cfg.batch, dead_tokens=cfg.dead_tokens,
                            checkpoint_every=10**9)
    return sae_cfg, train_cfg


def run_ours(cfg: BenchConfig, batches, arm: str, beta: float = 0.0) -> dict[str, float]:
    sae_cfg, train_cfg = _configs(cfg, batches, beta)
    res = train_sae(arm, sae_cfg, train_cfg, batches, progress=False)
    return {"tok_per_s": res.n_tokens / res.seconds,
            "dead_fraction": statistics.mean(r["dead_fraction"] for r in res.history)}


def saelens_twin(cfg: BenchConfig, batches, sparse: bool = False):
    """SAELens' TopKTrainingSAE with our shapes, aux coefficient and initial weights (b_dec from the first batch)."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    from ..sae import GSAE

    warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)
    sae_cfg, train_cfg = _configs(cfg, batches, 0.0)
    sl = TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=cfg.d_in, d_sae=cfg.d_sae, k=cfg.k, apply_b_dec_to_input=True, rescale_acts_by_decoder_norm=False,
        aux_loss_coefficient=train_cfg.aux_coef, use_sparse_activations=sparse, dtype="float32", device="cpu"))
    init = GSAE(sae_cfg, seed=train_cfg.seed)
    init.init_b_dec(batches[0][0])
    sl.load_state_dict(init.state_dict(), strict=False)
    return sl


def run_saelens(cfg: BenchConfig, batches, sparse: bool = False) -> dict[str, float]:
    """SAELens' TopKTrainingSAE doing the same steps: training_forward_pass + backward + Adam (see module doc)."""
    from sae_lens.saes.sae import TrainStepInput

    _, train_cfg = _configs(cfg, batches, 0.0)
    sl = saelens_twin(cfg, batches, sparse)
    opt = torch.optim.Adam(sl.parameters(), lr=train_cfg.lr, eps=train_cfg.adam_eps)
    tsf = torch.zeros(cfg.d_sae, dtype=torch.long)
    t0 = time.perf_counter()
    for step, (x, _) in enumerate(batches):
        dead = tsf >= train_cfg.dead_tokens
        out = sl.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                      n_training_steps=step, is_logging_step=False))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        with torch.no_grad():
            acts = out.feature_acts.to_dense() if out.feature_acts.is_sparse else out.feature_acts
            tsf += x.shape[0]
            tsf[(acts > 0).any(0)] = 0
    return {"tok_per_s": cfg.steps * cfg.batch / (time.perf_counter() - t0)}


def fixed_dead_mask(cfg: BenchConfig) -> torch.Tensor:
    dead = torch.zeros(cfg.d_sae, dtype=torch.bool)
    n_dead = max(1, round(cfg.dead_fraction * cfg.d_sae))
    dead[torch.randperm(cfg.d_sae, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    return dead


def run_auxk_fwd_bwd(cfg: BenchConfig, batches, which: str) -> dict[str, float]:
    """Forward + backward only (no optimiser) with AuxK on a fixed set of dead latents, ours or SAELens'."""
    sae_cfg, train_cfg = _configs(cfg, batches, 0.0)
    dead = fixed_dead_mask(cfg)
    if which == "ours":
        from ..sae import GSAE

        sae = GSAE(sae_cfg, seed=train_cfg.seed)
        sae.init_b_dec(batches[0][0])
        k_aux = train_cfg.k_aux or cfg.d_in // 2

        def loss_of(x):
            out = sae(x, dead_mask=dead, k_aux=k_aux)
            return out.fvu + train_cfg.aux_coef * out.auxk_loss
    else:
        from sae_lens.saes.sae import TrainStepInput

        sae = saelens_twin(cfg, batches)

        def loss_of(x):
            return sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                            n_training_steps=0, is_logging_step=False)).loss
    t0 = time.perf_counter()
    for x, _ in batches:
        sae.zero_grad(set_to_none=True)
        loss_of(x).backward()
    return {"tok_per_s": cfg.steps * cfg.batch / (time.perf_counter() - t0)}


def run_gemm(cfg: BenchConfig, batches) -> dict[str, float]:
    """The dense fp32 [N, d_in] x [d_in, d_sae] GEMM, once per batch."""
    W = torch.randn(cfg.d_in, cfg.d_sae, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    for x, _ in batches:
        x @ W
    dt = (time.perf_counter() - t0) / len(batches)
    return {"gflop_per_s": 2 * cfg.batch * cfg.d_in * cfg.d_sae / dt / 1e9, "seconds": dt}


def interleaved(candidates: dict[str, Callable[[], dict]], reps: int, warmup: bool = True) -> dict[str, list[dict]]:
    """Run every candidate ``reps`` times, round-robin, rotating the order each repetition."""
    names = list(candidates)
    for fn in candidates.values() if warmup else ():  # allocator, lazy imports, thread pools
        fn()
    out: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[: r % len(names)]:
            out[n].append(candidates[n]())
    return out


def _median_ratio(a: list[float], b: list[float]) -> float:
    """Median over repetitions of a[r] / b[r] (paired, so slow drifts of the machine cancel)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def bench_training(cfg: BenchConfig, with_sparse_saelens: bool = True) -> dict[str, Any]:
    batches = synthetic_batches(cfg)
    cands: dict[str, Callable[[], dict]] = {
        "ours_topk": lambda: run_ours(cfg, batches, "topk"),
        "ours_gsae": lambda: run_ours(cfg, batches, "gsae", cfg.beta),
        "saelens_topk": lambda: run_saelens(cfg, batches),
        "gemm": lambda: run_gemm(cfg, batches),
    }
    if with_sparse_saelens:
        cands["saelens_sparse"] = lambda: run_saelens(cfg, batches, sparse=True)
    cands["ours_auxk_fwd_bwd"] = lambda: run_auxk_fwd_bwd(cfg, batches, "ours")
    cands["saelens_auxk_fwd_bwd"] = lambda: run_auxk_fwd_bwd(cfg, batches, "saelens")
    runs = interleaved(cands, cfg.reps, cfg.warmup)
    tok = {n: [r["tok_per_s"] for r in rs] for n, rs in runs.items() if n != "gemm"}
    gemm_rate = [r["gflop_per_s"] for r in runs["gemm"]]
    gemm_flop = 2 * cfg.batch * cfg.d_in * cfg.d_sae
    # Achieved GFLOP/s of our step, counting its d_sae-wide dense GEMMs: 1 (TopK) or 2 (g-SAE, + attribution).
    achieved = {n: [m * gemm_flop * t / cfg.batch / 1e9 for t in tok[n]] for n, m in (("ours_topk", 1),
                                                                                   ("ours_gsae", 2))}
    out = {
        "tok_per_s_median": {n: statistics.median(v) for n, v in tok.items()},
        "dense_gemm_gflop_per_s_median": statistics.median(gemm_rate),
        "ratio_ours_topk_vs_saelens": _median_ratio(tok["ours_topk"], tok["saelens_topk"]),
        "ratio_ours_gsae_vs_saelens": _median_ratio(tok["ours_gsae"], tok["saelens_topk"]),
        "cost_gsae_over_topk": _median_ratio(tok["ours_topk"], tok["ours_gsae"]),
        "ratio_ours_vs_saelens_auxk_fwd_bwd": _median_ratio(tok["ours_auxk_fwd_bwd"], tok["saelens_auxk_fwd_bwd"]),
        "roofline_fraction_topk": _median_ratio(achieved["ours_topk"], gemm_rate),
        "roofline_fraction_gsae": _median_ratio(achieved["ours_gsae"], gemm_rate),
        "achieved_gflop_per_s_median": {n: statistics.median(v) for n, v in achieved.items()},
        "dead_fraction_mean": {n: statistics.mean(r["dead_fraction"] for r in runs[n])
                               for n in ("ours_topk", "ours_gsae")},
    }
    if with_sparse_saelens:
        out["ratio_ours_topk_vs_saelens_sparse"] = _median_ratio(tok["ours_topk"], tok["saelens_sparse"])
    return out


# ------------------------------------------------------------------------------------------------ harvest
def tiny_random_lm():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
    return HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64,
                                                     d_vocab=100, n_ctx=64, act_fn="gelu", normalization_type="LN",
                                                     device="cpu"))


def load_bench_model(name: str) -> tuple[Any, str]:
    """(HookedTransformer, hook_name): a tiny random model, or a real one through gsae.models."""
    if name == "tiny-random":
        return tiny_random_lm(), "blocks.1.hook_resid_pre"
    from .. import models
    from ..config import ModelConfig

    lm = models.load_model(name, cache_dir=ROOT / "runs" / "_cache" / "models")
    layer = ModelConfig(name=name).layer if name == "tiny" else models.layer_for_relative_depth(lm.model.cfg.n_layers)
    return lm.model, f"blocks.{layer}.hook_resid_pre"


def bench_harvest(cfg: BenchConfig, model_name: str) -> dict[str, Any]:
    try:
        from ..harvest import measure_throughput
    except ImportError as e:  # gsae.harvest not there yet: say so instead of failing the whole bench
        return {"skipped": f"gsae.harvest.measure_throughput unavailable: {e}"}
    model, hook = load_bench_model(model_name)
    B, T = cfg.harvest_batch
    T = min(T, model.cfg.n_ctx)
    tokens = torch.randint(0, model.cfg.d_vocab, (B, T), generator=torch.Generator().manual_seed(0))
    runs = [measure_throughput(model, tokens, hook, n_batches=cfg.harvest_batches) for _ in range(cfg.harvest_reps)]
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
    out.update(model=model_name, hook=hook, tokens_shape=[B, T])
    out["_model"], out["_tokens"], out["_hook"] = model, tokens, hook  # for the RSS phase; dropped before JSON
    return out


# ------------------------------------------------------------------------------------------------ e2e
def smoke_e2e(timeout: int = 3600) -> dict[str, Any]:
    script = ROOT / "run_all.sh"
    if not script.exists():
        return {"ok": False, "error": f"{script.name} not found"}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([str(script), "--profile", "smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"ok": False, "error": repr(e), "seconds": time.perf_counter() - t0}
    out = {"ok": p.returncode == 0, "returncode": p.returncode, "seconds": time.perf_counter() - t0}
    if p.returncode:
        out["stderr_tail"] = p.stderr[-2000:]
    return out


# ------------------------------------------------------------------------------------------------ main
def run(cfg: BenchConfig, *, model: str = "tiny-random", e2e: bool = False, with_sparse_saelens: bool = True
        ) -> dict[str, Any]:
    meta = {"loadavg_start": os.getloadavg(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
            "config": asdict(cfg), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            # OpenMP's wait policy decides how much a busy machine slows multi-thread runs (module doc).
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}}
    t0 = time.perf_counter()
    result: dict[str, Any] = {"meta": meta}
    result["train"] = bench_training(cfg, with_sparse_saelens)
    harvest = bench_harvest(cfg, model)
    batches = synthetic_batches(replace(cfg, steps=2))
    rss = {"train_topk": measure_peak_rss(lambda: run_ours(replace(cfg, steps=2), batches, "topk")),
           "train_gsae": measure_peak_rss(lambda: run_ours(replace(cfg, steps=2), batches, "gsae", cfg.beta)),
           "train_saelens": measure_peak_rss(lambda: run_saelens(replace(cfg, steps=2), batches))}
    if "_model" in harvest:
        from ..harvest import capture

        m, toks, hook = harvest.pop("_model"), harvest.pop("_tokens"), harvest.pop("_hook")
        rss["harvest"] = measure_peak_rss(lambda: capture(m, toks, hook))
    result["harvest"], result["peak_rss"] = harvest, rss
    if e2e:
        result["smoke_e2e"] = smoke_e2e()
    meta["loadavg_end"] = os.getloadavg()
    meta["seconds"] = time.perf_counter() - t0
    return result


def format_table(res: dict[str, Any]) -> str:
    t, h = res["train"], res["harvest"]
    rows = [
        ("ours TopK tokens/s vs SAELens TopKTrainingSAE", t["ratio_ours_topk_vs_saelens"], ">= 1.5"),
        ("ours g-SAE tokens/s vs SAELens TopKTrainingSAE", t["ratio_ours_gsae_vs_saelens"], ">= 1.5"),
        ("ours TopK vs SAELens (use_sparse_activations)", t.get("ratio_ours_topk_vs_saelens_sparse"), ""),
        ("g-SAE step cost / TopK step cost", t["cost_gsae_over_topk"], "<= 1.25"),
        ("ours vs SAELens fwd+bwd, AuxK on (fixed dead mask)", t["ratio_ours_vs_saelens_auxk_fwd_bwd"], ""),
        ("TopK step: d_sae-GEMM flops / step time vs dense GEMM", t["roofline_fraction_topk"], "(roofline 1)"),
        ("g-SAE step: d_sae-GEMM flops / step time vs dense GEMM", t["roofline_fraction_gsae"], "(roofline 1)"),
        ("harvest tokens/s vs LM forward+backward", h.get("ratio_vs_fwd_bwd"), ""),
        ("harvest tokens/s vs LM forward only", h.get("ratio_vs_forward"), ""),
    ]
    lines = [f"{'ratio':58s} {'value':>8s}  goal", "-" * 80]
    lines += [f"{name:58s} {f'{v:.3f}' if v is not None else 'n/a':>8s}  {goal}" for name, v, goal in rows]
    tok = t["tok_per_s_median"]
    lines += ["", "medians: " + ", ".join(f"{n} {v:,.0f} tok/s" for n, v in tok.items())
              + f"; dense GEMM {t['dense_gemm_gflop_per_s_median']:.1f} GFLOP/s"]
    lines.append("peak RSS (MB): " + ", ".join(f"{n} {r['peak_mb']}" for n, r in res["peak_rss"].items()))
    if "smoke_e2e" in res:
        e = res["smoke_e2e"]
        lines.append(f"smoke e2e: ok={e['ok']} seconds={e.get('seconds', float('nan')):.0f}")
    m = res["meta"]
    lines.append(f"threads {m['threads']}, loadavg {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}, "
                 f"{m['cpu_capability']}, {m['seconds']:.0f} s")
    return "\n".join(lines)


README_ROWS = (  # (row label with its goal, key in the JSON's "train")
    ("our TopK step / SAELens `TopKTrainingSAE` step (≥ 1.5)", "ratio_ours_topk_vs_saelens"),
    ("our g-SAE step / SAELens TopK step (≥ 1.5)", "ratio_ours_gsae_vs_saelens"),
    ("g-SAE cost over our TopK (≤ 1.25, not met)", "cost_gsae_over_topk"),
)


def run_label(res: dict[str, Any]) -> str:
    """A column heading that says how a bench JSON was run: threads and OpenMP's wait policy."""
    m = res["meta"]
    policy = (m.get("env") or {}).get("OMP_WAIT_POLICY")
    return f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}" + (f", `OMP_WAIT_POLICY={policy}`"
                                                                            if policy else "")


def readme_table(results: list[dict[str, Any]]) -> str:
    """The README's Performance table: one column per bench JSON, its ratios and our absolute tokens/s."""
    head = "| ratio (goal) | " + " | ".join(run_label(r) for r in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{r['train'][key]:.2f}" for r in results) + " |"
              for name, key in README_ROWS]
    for arm in ("topk", "gsae"):
        lines.append(f"| our {'TopK' if arm == 'topk' else 'g-SAE'} training, tokens/s (absolute) | "
                     + " | ".join(f"{r['train']['tok_per_s_median'][f'ours_{arm}']:,.0f}" for r in results) + " |")
    h = results[0]["harvest"]
    lines.append(f"| harvest / bare LM forward+backward ({h['model']}, `{h['hook']}`) | "
                 + " | ".join(f"{r['harvest']['ratio_vs_fwd_bwd']:.2f}" for r in results) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m gsae.tools.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1 repetition (seconds; for tests)")
    ap.add_argument("--json", type=Path, help="write the results here (default: results/bench.json)")
    ap.add_argument("--smoke-e2e", action="store_true", help="also time ./run_all.sh --profile smoke")
    ap.add_argument("--model", default="tiny-random", help="harvest LM: tiny-random (default), tiny or smollm2-135m")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--reps", type=int, help="override the number of interleaved repetitions")
    ap.add_argument("--steps", type=int, help="override the training steps per timed run")
    ap.add_argument("--no-sparse-saelens", action="store_true", help="skip SAELens' use_sparse_activations baseline")
    ap.add_argument("--readme", type=Path, nargs="+", metavar="JSON",
                    help="print the README's Performance table from these bench JSONs (runs nothing)")
    args = ap.parse_args(argv)
    if args.readme:
        table = readme_table([io.read_json(p) for p in args.readme])
        print(table)
        return {"readme_table": table}
    cfg = QUICK if args.quick else BenchConfig()
    cfg = replace(cfg, **{k: v for k, v in (("reps", args.reps), ("steps", args.steps)) if v})
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = run(cfg, model=args.model, e2e=args.smoke_e2e, with_sparse_saelens=not args.no_sparse_saelens)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a test process
    print(format_table(res))
    dest = args.json or ROOT / "results" / "bench.json"
    io.write_json(dest, res)
    print(f"wrote {dest}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
