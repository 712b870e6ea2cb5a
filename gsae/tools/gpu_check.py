"""Is this GPU ready for the paper profile? A few minutes, no hub access.

    python -m gsae.tools.gpu_check [--cpu-dry] [--json out.json]

Checks, each printed as PASS / FAIL with its numbers (exit status 1 if any fails):

1. placement: ``runtime.resolve_device("auto")`` is the GPU, and the LM, an SAE trained there and the reader's
   batches all live on it;
2. storage: a float16 and a bfloat16 harvest (``gsae.harvest``, underflow check included) are finite and close to
   the float32 capture of the same contexts on the same device;
3. speed: TopK and g-SAE training steps at the paper's shape (d_in 768, d_sae 24,576, k 32, batch 4,096): ms per
   step and peak memory, with the LM's harvest and forward costs (``gsae.projection.measure_costs``);
   held: the same harvest held in the device's memory gives the disk reader's batches bit for bit;
4. agreement: an SAE trained 5 steps on the CPU and on the GPU from the same seed and batches ends with close
   weights (float32 on both: TF32 off for this check);
5. splice: the spliced evaluation (``gsae.evals.evaluate_saes``) on the GPU agrees with the CPU's;
6. projection: hours per stage of the paper profile from the measured costs (``gsae.projection``).

The LM is the GPT-2-small-shaped stand-in with random weights (``gsae.standins``): the same shapes and costs as
GPT-2 small, no download. Without CUDA it says so and exits 0; ``--cpu-dry`` runs the same code on the CPU at a
tiny shape (what the test suite exercises).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class CheckShape:
    profile: str = "paper"
    """Profile whose shapes are measured and projected."""
    lm: dict[str, int] = field(default_factory=dict)
    """Overrides of the stand-in LM's shape (none: GPT-2 small)."""
    layer: int = 7
    d_sae_agree: int = 4096
    """Dictionary size of the CPU-vs-GPU agreement check (the CPU side must stay quick)."""
    batch_agree: int = 1024
    contexts: int = 4
    """Contexts of the storage and splice checks."""
    ctx_len: int = 128


TINY = CheckShape(profile="smoke", lm={"n_layers": 2, "d_model": 64, "d_head": 16, "n_heads": 4, "d_mlp": 128,
                                        "d_vocab": 300, "n_ctx": 32}, layer=1, d_sae_agree=256, batch_agree=128,
                  contexts=2, ctx_len=16)
"""The ``--cpu-dry`` shape: the same code, small enough for the test suite."""


def _result(name: str, ok: bool, detail: str) -> dict[str, Any]:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    return {"check": name, "ok": bool(ok), "detail": detail}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_placement(model, device: torch.device) -> dict[str, Any]:
    from ..runtime import resolve_device

    auto = resolve_device("auto")
    on = {p.device for p in model.parameters()}
    return _result("placement", auto.type == device.type and on == {device},
                   f"auto -> {auto}; LM parameters on {sorted(map(str, on))}")


def check_storage(model, device: torch.device, shape: CheckShape, hook: str) -> dict[str, Any]:
    from ..config import HarvestConfig
    from ..harvest import ActivationReader, harvest
    from ..lm import capture

    tokens = torch.randint(0, model.cfg.d_vocab, (shape.contexts, shape.ctx_len),
                           generator=torch.Generator().manual_seed(1))
    ref = capture(model, tokens, hook)
    d = ref.x.shape[-1]
    ref_x, ref_g = ref.x[:, 1:-1].reshape(-1, d), ref.g[:, 1:-1].reshape(-1, d)
    errors, ok = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, tol in (("float16", 2e-3), ("bfloat16", 1e-2)):
            cfg = HarvestConfig(batch_contexts=shape.contexts, shard_tokens=10**9, dtype=dtype)
            harvest(model, tokens, hook, Path(tmp) / dtype, n_tokens=ref_x.shape[0], cfg=cfg, progress=False)
            rows = ActivationReader(Path(tmp) / dtype).load_all()
            finite = bool(torch.isfinite(rows.x).all() and torch.isfinite(rows.g).all())
            errors[dtype] = (_rel(rows.x, ref_x), _rel(rows.g, ref_g))
            ok &= finite and max(errors[dtype]) < tol
    return _result("storage", ok, "; ".join(f"{k}: rel. error x {ex:.1e}, g {eg:.1e}"
                                            for k, (ex, eg) in errors.items()) + " (limits 2e-3 fp16, 1e-2 bf16)")


def check_held(model, device: torch.device, shape: CheckShape, hook: str) -> dict[str, Any]:
    """A float16 split held in the device's memory (``ActivationReader.held_in``, ``runtime.train_data``) gives
    the disk reader's batches on the device, bit for bit, over more than one epoch."""
    from ..config import HarvestConfig
    from ..harvest import ActivationReader, harvest

    tokens = torch.randint(0, model.cfg.d_vocab, (shape.contexts, shape.ctx_len),
                           generator=torch.Generator().manual_seed(2))
    n = shape.contexts * (shape.ctx_len - 2)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = HarvestConfig(batch_contexts=shape.contexts, shard_tokens=max(n // 4, 1), dtype="float16")
        harvest(model, tokens, hook, tmp, n_tokens=n, cfg=cfg, progress=False)
        disk = ActivationReader(tmp)
        held = disk.held_in(device)
        kw = {"batch_size": max(n // 5, 1), "seed": 3, "n_tokens": 2 * n + 7, "device": device}
        pairs = list(zip(disk.batches(**kw), held.batches(**kw), strict=True))
    same = all(torch.equal(a, b) for (xa, ga), (xb, gb) in pairs for a, b in ((xa, xb), (ga, gb)))
    where = {t.device for (xa, ga), (xb, gb) in pairs for t in (xa, xb, gb)}
    ok = same and {w.type for w in where} == {device.type}
    return _result("held", ok, f"{len(pairs)} batches from the disk and from {device}'s memory: "
                   f"{'identical' if same else 'DIFFERENT'}; on {sorted(map(str, where))}")


def check_agreement(device: torch.device, shape: CheckShape, d_in: int) -> dict[str, Any]:
    from ..config import SAEConfig, TrainConfig
    from ..train import train_sae
    from .bench import BenchConfig, synthetic_batches

    data = synthetic_batches(BenchConfig(d_in=d_in, d_sae=shape.d_sae_agree, k=32, batch=shape.batch_agree, steps=5))
    cfg = SAEConfig(d_in=d_in, d_sae=shape.d_sae_agree, k=32, beta=1.0, grad_scale=1.0)
    tcfg = TrainConfig(tokens=5 * shape.batch_agree, batch_size=shape.batch_agree, lr=1e-3, warmup_frac=0.0,
                       checkpoint_every=10**9)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cpu = train_sae("gsae", cfg, tcfg, data, progress=False, device="cpu").sae
        dev = train_sae("gsae", cfg, tcfg, data, progress=False, device=device).sae
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    errs = {name: _rel(getattr(dev, name).detach(), getattr(cpu, name).detach()) for name in ("W_enc", "W_dec")}
    on_device = {p.device for p in dev.parameters()} == {torch.device(device)}
    return _result("agreement", on_device and max(errs.values()) < 1e-3,
                   f"g-SAE after 5 steps, {device} vs cpu: " + ", ".join(f"{k} rel. diff {v:.1e}"
                                                                         for k, v in errs.items()) + " (limit 1e-3)")


def check_splice(model, device: torch.device, shape: CheckShape, hook: str) -> dict[str, Any]:
    import copy

    from .. import evals
    from ..config import SAEConfig
    from ..sae import GSAE

    tokens = torch.randint(0, model.cfg.d_vocab, (shape.contexts, shape.ctx_len),
                           generator=torch.Generator().manual_seed(2))
    d = model.cfg.d_model
    sae = GSAE(SAEConfig(d_in=d, d_sae=4 * d, k=32, beta=1.0), seed=0)
    out = {}
    for where, m in (("device", model), ("cpu", copy.deepcopy(model).to("cpu", print_details=False))):
        s = copy.deepcopy(sae).to(next(m.parameters()).device)
        base = evals.ablation_baselines(m, tokens, hook, batch_contexts=shape.contexts, progress=False)
        out[where] = evals.evaluate_saes(m, {"s": s}, tokens, hook, baselines=base, batch_contexts=shape.contexts,
                                         progress=False)["s"]
    diffs = {mode: abs(out["device"][mode].ce_spliced - out["cpu"][mode].ce_spliced) for mode in ("g", "plain")}
    ce = out["cpu"]["plain"].ce_spliced
    return _result("splice", max(diffs.values()) < 1e-3 * max(1.0, abs(ce)),
                   f"spliced CE on {device} vs cpu: " + ", ".join(f"{k} |diff| {v:.1e}" for k, v in diffs.items())
                   + f" (CE {ce:.3f})")


def run(device: torch.device, shape: CheckShape = CheckShape()) -> dict[str, Any]:
    from ..runtime import configure
    from ..specs import load_checked_profile as load_profile
    from . import projection
    from .standins import random_gpt2

    t0 = time.perf_counter()
    p = load_profile(shape.profile)
    p = replace(p, runtime=replace(p.runtime, device=str(device)))
    configure(p.runtime, device)
    model = random_gpt2(seed=0, device=device, **shape.lm)
    hook = f"blocks.{shape.layer}.hook_resid_pre"
    results = [check_placement(model, device), check_storage(model, device, shape, hook),
               check_held(model, device, shape, hook)]
    costs = projection.measure_costs(p, device)
    steps = ", ".join(f"{a} {s * 1e3:,.1f} ms/step" for a, s in costs.sae_step_s.items())
    peaks = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in costs.gpu_peak_bytes.items()) or "n/a on cpu"
    d_sae = p.experiment.expansion * projection.MODEL_SHAPES[p.model.name]["d_model"]
    results.append(_result("speed", all(math.isfinite(s) and s > 0 for s in costs.sae_step_s.values()),
                           f"{steps} at d_sae {d_sae:,}, k {p.experiment.beta_select_k}, batch "
                           f"{p.train.batch_size:,}; harvest {costs.harvest_s_per_token * 1e6:.2f} us/token; "
                           f"peak memory {peaks}"))
    results.append(check_agreement(device, shape, model.cfg.d_model))
    results.append(check_splice(model, device, shape, hook))
    table = projection.format_projection(p, costs, projection.project(p, costs))
    print("\n".join(table), flush=True)
    seconds = time.perf_counter() - t0
    print(f"gpu check: {sum(r['ok'] for r in results)}/{len(results)} passed in {seconds:.0f} s on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    return {"device": str(device), "results": results, "projection": table, "seconds": seconds,
            "costs": asdict(costs)}


def main(cpu_dry: bool = False, json_path: Path | None = None) -> int:
    from .. import io

    if cpu_dry:
        res = run(torch.device("cpu"), TINY)
    elif not torch.cuda.is_available():
        print(f"gpu check: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); nothing to "
              f"check here. Run it on the GPU machine, or add --cpu-dry to run the same code on the CPU at a tiny "
              f"shape.")
        return 0
    else:
        res = run(torch.device("cuda", 0))
    if json_path is not None:
        io.write_json(json_path, res)
    return 0 if all(r["ok"] for r in res["results"]) else 1


def cli(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m gsae.tools.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry", action="store_true", help="run the same code on the CPU at a tiny shape")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    return main(cpu_dry=args.cpu_dry, json_path=args.json)


if __name__ == "__main__":
    import sys

    sys.exit(cli())
