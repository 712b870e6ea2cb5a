"""Stage ``steer`` (C3, PREREG §5): per SAE, add alpha x median ||x|| along sampled live decoder directions and
measure KL and the promoted tokens' log-prob gain. Writes ``steer_test-<key>.json`` with the per-latent numbers
and their means under ``metrics``."""

from __future__ import annotations

import sys
from typing import Any

import torch

from .. import io, steering
from .. import lm as lm_passes
from ..config import Profile
from ..paths import run_dir
from ..runtime import module_device
from ..specs import SAESpec, load_trained, sae_dir, source_version, stage_file
from .evaluate import eval_tokens, firing_counts


def code_version() -> str:
    """Keys the cached steering files to the code that computes them (``lm`` runs the steered forwards)."""
    return source_version(steering, lm_passes, sys.modules[__name__])


def steer_file(p: Profile) -> str:
    return stage_file(p, "steer", code=code_version())


def summarise(alphas_rel: list[float], kl: list[list[float]], gain: list[list[float]]) -> dict[str, float]:
    """The claim-level numbers: mean KL and mean log-prob gain over the sampled latents, per alpha."""
    out = {}
    for j, a in enumerate(alphas_rel):
        out[f"steer_kl@{float(a)}"] = float(torch.tensor(kl)[:, j].mean())
        out[f"steer_logprob@{float(a)}"] = float(torch.tensor(gain)[:, j].mean())
    return out


def _steering_inputs(p: Profile, lm) -> tuple[torch.Tensor, float, list[float]]:
    """The steered contexts (seeded sample of the test split), the median test-activation norm and the alphas."""
    tokens, rd = eval_tokens(p, lm, "test")
    x_norm = rd.statistics().median_norm  # streamed when the split is large
    ctx_idx = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0))[:p.steering.n_contexts]
    return tokens[ctx_idx], x_norm, list(p.steering.alphas)


def random_directions(n: int, d: int, seed: int = 12345) -> torch.Tensor:
    """``n`` random unit directions in R^d (Gaussian, normalised), the same for every SAE of a profile."""
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (w / w.norm(dim=1, keepdim=True)).float()


def control(p: Profile, lm) -> dict[str, Any]:
    """C3's control: the same protocol along ``steering.n_latents`` random unit directions (same contexts, alphas
    and norm), computed once per profile (it does not depend on any SAE) and cached under runs/<profile>."""
    path = run_dir(p) / stage_file(p, "steer", "control", code=code_version())
    if not path.exists():
        ctx, x_norm, alphas_rel = _steering_inputs(p, lm)
        dirs = random_directions(p.steering.n_latents, lm.model.cfg.d_model)
        r = steering.steer(lm.model, dirs.to(module_device(lm.model)), ctx, p.model.hook_name,
                           [a * x_norm for a in alphas_rel], first=int(p.harvest.exclude_pos0), progress=False)
        kl = r.kl.tolist()
        io.write_json(path, {"alphas_rel": alphas_rel, "median_norm": x_norm, "kl": kl,
                             "mean_kl": {str(float(a)): float(torch.tensor(kl)[:, j].mean())
                                         for j, a in enumerate(alphas_rel)}})
    return io.read_json(path)


def run_steering(p: Profile, lm, specs: list[SAESpec], progress: bool = True) -> dict[str, Any]:
    """Steering of each SAE, cached per SAE; latents are sampled among those live under the SAE's own encoder.
    Each SAE's metrics also hold ``steer_kl_ratio@a``: its mean KL over the random-direction control's."""
    cfg = p.steering
    specs = [s for s in specs if not cfg.k_values or s.k in cfg.k_values]
    mh = lm.info["model_hash"]
    name = steer_file(p)
    todo = [s for s in specs if not (sae_dir(p, s, mh) / name).exists()]
    if todo:
        ctx, x_norm, alphas_rel = _steering_inputs(p, lm)
        ctrl = control(p, lm)["mean_kl"]
        for s in todo:
            sae = load_trained(p, s, mh, module_device(lm.model))
            ids = steering.sample_live_latents(firing_counts(p, lm, s)[s.primary_encode], cfg.n_latents, seed=0)
            dirs = sae.W_dec.detach()[ids]
            top = steering.promoted_tokens(lm.model, dirs, cfg.top_tokens)
            r = steering.steer(lm.model, dirs, ctx, p.model.hook_name, [a * x_norm for a in alphas_rel],
                               first=int(p.harvest.exclude_pos0), top_tokens=top, progress=False)
            kl, gain = r.kl.tolist(), r.logprob_gain.tolist()
            summary = summarise(alphas_rel, kl, gain)
            summary.update({f"steer_kl_ratio@{float(a)}": summary[f"steer_kl@{float(a)}"] / ctrl[str(float(a))]
                            for a in alphas_rel})
            io.write_json(sae_dir(p, s, mh) / name, {
                "alphas_rel": alphas_rel, "median_norm": x_norm, "latents": ids.tolist(), "kl": kl,
                "logprob_gain": gain, "metrics": {"all": summary}})
    return {s.name: io.read_json(sae_dir(p, s, mh) / name) for s in specs}


def steering_frame(p: Profile, lm, specs: list[SAESpec], group: str = "primary"):
    """Long table of per-latent steering effects: arm, k, seed, latent, alpha, metric (kl|logprob), value."""
    import pandas as pd

    chosen = [s for s in specs if s.group == group and (not p.steering.k_values or s.k in p.steering.k_values)]
    res = run_steering(p, lm, chosen, progress=False)
    rows = []
    for s in chosen:
        r = res[s.name]
        for metric, key in (("kl", "kl"), ("logprob", "logprob_gain")):
            for li, per_alpha in zip(r["latents"], r[key], strict=True):
                for a, v in zip(r["alphas_rel"], per_alpha, strict=True):
                    rows.append({"arm": s.arm_impl.label, "k": s.k, "seed": s.seed, "latent": li, "alpha": a,
                                 "metric": metric, "value": v})
    ctrl = control(p, lm)
    for k in sorted({s.k for s in chosen}):  # the control does not depend on k; drawn beside every k
        for i, per_alpha in enumerate(ctrl["kl"]):
            for a, v in zip(ctrl["alphas_rel"], per_alpha, strict=True):
                rows.append({"arm": steering.CONTROL_LABEL, "k": k, "seed": -1, "latent": i, "alpha": a, "metric": "kl",
                             "value": v})
    return pd.DataFrame(rows)


def run(p: Profile, lm, specs: list[SAESpec], progress: bool = True) -> dict[str, Any]:
    return run_steering(p, lm, specs, progress)
