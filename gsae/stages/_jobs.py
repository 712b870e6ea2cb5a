"""Training jobs shared by the selection and the grid: SAEs that read the same batch stream train together in
one pass over it (``train_group``), spread over the ranks of a torchrun launch (``train_specs``), each resumable
from checkpoints and saved in SAELens format. An SAE's bytes do not depend on which rank trained it; a relaunch
after a killed rank resumes from checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any

from .. import distributed, io
from ..arms.saelens import save_sae
from ..config import ConfigError, Profile, TrainConfig
from ..io import registry_append
from ..progress import bar
from ..specs import SAESpec, sae_dir
from .evaluate import evaluate_specs
from .harvest import training_data


def train_group(p: Profile, specs: list[SAESpec], train_reader, model_hash: str, progress: bool = True,
                device=None, lm=None) -> list:
    """Train (or resume, or skip) SAEs that share one batch stream (same seed and token budget) in ONE pass over
    it (``gsae.train.train_saes``) on ``device`` (default CPU); each is saved in SAELens format under
    ``sae_dir(...)/sae``. Returns their directories. ``lm`` (the profile's LM) is needed when an arm KL
    fine-tunes (``gsae.arms.kl_finetune``)."""
    from ..train import Job, TrainingDiverged, torch_threads, train_saes

    outs = [sae_dir(p, s, model_hash) for s in specs]
    for s, out in zip(specs, outs, strict=True):
        check_trained_config(s, out)
    todo = [(s, out) for s, out in zip(specs, outs, strict=True) if io.read_manifest(out) is None]
    if not todo:
        return outs
    data = training_data(p, train_reader, device)
    for s, _ in todo:
        registry_append(p, {"event": "train_start", "sae": s.name, "sae_cfg": dataclasses.asdict(s.sae),
                            "train_cfg": recorded_train_cfg(s.train),
                            "train_data": "memory" if data.held_device is not None else "disk"})
    if len({stream_key(s) for s, _ in todo}) > 1:
        raise ValueError(f"train_group needs SAEs that share one batch stream, got {[s.name for s, _ in todo]}")
    first = todo[0][0]
    t = first.train
    n = (t.tokens // t.batch_size) * t.batch_size
    cap = train_norm_cap(train_reader, t.max_norm_factor) if t.max_norm_factor else None

    def stream():
        for x, g in data.batches(t.batch_size, seed=t.seed, n_tokens=n, device=device,
                                 gradient=first.arm_impl.gradient):
            if cap is not None:  # massive-activation rows stay out of training (PREREG §2)
                keep = x.norm(dim=-1) <= cap
                x, g = x[keep], g[keep]
            yield x, g

    desc = first.name + (f" +{len(todo) - 1} sharing its batches" if len(todo) > 1 else "")
    kl = kl_data(p, lm, train_reader, cap) if any(getattr(s.arm_impl, "kl_finetune", False) for s, _ in todo) else None
    try:
        with torch_threads(t.threads):
            results = train_saes([Job(s.arm_impl, s.sae, s.train, out / "ckpt") for s, out in todo], stream,
                                 progress=progress, desc=desc, device=device, kl=kl)
    except BaseException as e:
        event = "train_diverged" if isinstance(e, TrainingDiverged) else "train_failed"
        for s, _ in todo:
            registry_append(p, {"event": event, "sae": s.name, "error": str(e) if event == "train_diverged"
                                else repr(e)[:500]})
        raise
    for (s, out), res in zip(todo, results, strict=True):
        _save_trained(p, s, out, res, train_reader, model_hash)
    return outs


def kl_data(p: Profile, lm, train_reader, cap: float | None):
    """The KL phase's LM and contexts (``gsae.arms.kl_finetune.KLData``): the train split's harvested contexts,
    position 0 clean when the harvest drops it, rows above the training cap ``cap`` out of the MSE term and clean in
    the splice, and the massive-activation tokens clean in the splice as the evaluation keeps them
    (``eval.massive``)."""
    from ..arms.kl_finetune import KLData
    from .contexts import contexts
    from .evaluate import MASSIVE_NORM_FACTOR

    if lm is None:
        raise ValueError("an arm that KL fine-tunes needs the LM: pass lm= to train_group")
    tokens = contexts(p, lm.tokenizer, lm.info["model_hash"])["train"].tokens[:train_reader.manifest["n_contexts"]]
    massive = MASSIVE_NORM_FACTOR * _median_norm(str(train_reader.dir)) if p.eval.massive == "clean" else None
    return KLData(lm.model, p.model.hook_name, tokens, p.harvest.exclude_pos0, cap, massive)


def recorded_train_cfg(train: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """``train`` (a ``TrainConfig`` or a manifest's record of one) as manifests and the registry record it: settings
    added later (``config.ADDED_LATER``, e.g. ``kl_frac``) are left out at their defaults, so the SAEs trained
    before they existed keep matching."""
    rec = dataclasses.asdict(train) if isinstance(train, TrainConfig) else dict(train)
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("hash_default", True) and rec.get(f.name, f.default) == f.default:
            rec.pop(f.name, None)
    return rec


def check_trained_config(spec: SAESpec, out: Path) -> None:
    """An SAE directory is keyed by the SAE's name and its data, not by every training setting: one trained under
    other settings (e.g. before the profile's ``train.tokens`` changed) is refused, never reused as this spec."""
    made = io.read_manifest(out)
    if made is None:
        return
    want = {"sae_cfg": dataclasses.asdict(spec.sae), "train_cfg": recorded_train_cfg(spec.train)}
    made = {**made, "train_cfg": recorded_train_cfg(made.get("train_cfg") or {})}
    stale = [key for key, value in want.items() if json.loads(json.dumps(value)) != made.get(key)]
    if stale:
        raise ConfigError(f"{out} holds {spec.name} trained with other {' and '.join(stale)} than the profile now "
                          f"asks for; move that directory aside (or run ./run_all.sh --force) to retrain it")


def stream_key(spec: SAESpec) -> tuple:
    """SAEs with equal keys read the identical batch stream (same rows, order and gradient), so they can train
    together on one pass over it."""
    t = spec.train
    return t.seed, t.tokens, t.batch_size, spec.arm_impl.gradient, t.max_norm_factor, t.threads


def train_one(p: Profile, spec: SAESpec, train_reader, model_hash: str, progress: bool = True, device=None):
    """Train (or resume, or skip) one SAE (``train_group`` of one)."""
    return train_group(p, [spec], train_reader, model_hash, progress, device)[0]


def _save_trained(p: Profile, spec: SAESpec, out, res, train_reader, model_hash: str) -> None:
    meta = {"model_hash": model_hash, "hook_name": p.model.hook_name, "profile": p.name, "sae": spec.name,
            "group": spec.group, "arm": spec.arm, "k": spec.k, "seed": spec.seed,
            "harvest_manifest": str(train_reader.manifest.get("plan_hash"))}
    save_sae(spec.arm_impl, res.sae, out / "sae",
             metadata={"model_name": p.model.name, "hook_name": p.model.hook_name, "context_size": p.data.ctx_len,
                       "prepend_bos": False, **meta})
    dead_train = float((res.tokens_since_fired >= spec.train.dead_tokens).double().mean())
    io.write_json(out / "train.json", {"history": res.history, "seconds": res.seconds, "n_tokens": res.n_tokens,
                                       "metrics": {"all": {"dead_fraction_train": dead_train}}})
    io.write_manifest(out, {"stage": "train", **meta, "sae_cfg": dataclasses.asdict(spec.sae),
                            "train_cfg": recorded_train_cfg(spec.train)},
                      files=["sae/cfg.json", "sae/sae_weights.safetensors", "train.json"])
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    registry_append(p, {"event": "train_done", "sae": spec.name, "seconds": round(res.seconds, 2),
                        "final_loss_terms": {k: v for k, v in res.history[-1].items() if k not in ("step", "lr")},
                        "dead_fraction_train": dead_train})


def train_specs(p: Profile, lm, specs: list[SAESpec], train_reader, progress: bool = True, *,
                by_seed: bool = False) -> None:
    """Train ``specs``, each rank of a torchrun launch its share (all of them at world size 1), then wait for
    every rank. ``by_seed`` keeps the SAEs of one seed on one rank (``distributed.assign_groups``); otherwise the
    jobs go round robin. A rank's SAEs that share a batch stream (seed, tokens, batch size) train together on one
    pass over it (``train_group``)."""
    from ..runtime import module_device

    d = distributed.current()
    mine = (distributed.assign_groups(specs, lambda s: s.train.seed, d.rank, d.world_size) if by_seed
            else distributed.assign(specs, d.rank, d.world_size))
    streams: dict[tuple, list[SAESpec]] = {}
    for s in mine:
        streams.setdefault(stream_key(s), []).append(s)
    device, mh = module_device(lm.model), lm.info["model_hash"]
    for group in bar(list(streams.values()), desc="SAE groups", unit="group", disable=not progress or len(streams) < 2):
        train_group(p, group, train_reader, mh, progress, device, lm=lm)
    distributed.barrier()


def evaluate_on_main(p: Profile, lm, specs: list[SAESpec], progress: bool) -> dict[str, dict[str, Any]]:
    """Validation metrics of ``specs``: rank 0 computes them; the other ranks wait, then read its files."""
    with distributed.main_first():
        return evaluate_specs(p, lm, specs, "val", progress and distributed.is_main())


@functools.lru_cache(maxsize=4)
def _median_norm(harvest_dir: str) -> float:
    from ..harvest import ActivationReader

    return ActivationReader(harvest_dir).statistics().median_norm  # streamed when the split is large


def train_norm_cap(train_reader, factor: float) -> float:
    """``factor`` x the median row norm of the train split (cached per harvest)."""
    return factor * _median_norm(str(train_reader.dir))
