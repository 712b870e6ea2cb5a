"""Stage ``train``: selection on the validation split (PREREG §3), its grid-edge check, then every SAE of the
grid (``gsae.specs``), each resumable from checkpoints and saved in SAELens format.

Under ``torchrun --nproc_per_node=N -m gsae.pipeline train --profile P`` the SAEs are independent jobs spread over
the ranks (``train_specs``): the selection trials of each round round-robin, the grid by seed
(``distributed.assign_groups``); rank 0 evaluates each selection round while the others wait, and every rank
then reads the same evaluation files, so all ranks derive the same chosen hyperparameters and the same grid. An
SAE's bytes do not depend on which rank trained it; a relaunch after a killed rank resumes from checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any

from .. import arms, distributed, io
from ..config import ConfigError, Profile
from ..paths import registry_append, results_dir
from ..progress import bar
from ..specs import SAESpec, baseline_arm, experiment_specs, sae_config, sae_dir, selection_specs
from .harvest import reader


def train_group(p: Profile, specs: list[SAESpec], train_reader, model_hash: str, progress: bool = True,
                device=None) -> list:
    """Train (or resume, or skip) SAEs that share one batch stream (same seed and token budget) in ONE pass over
    it (``gsae.train.train_saes``) on ``device`` (default CPU); each is saved in SAELens format under
    ``sae_dir(...)/sae``. Returns their directories."""
    from ..train import Job, TrainingDiverged, torch_threads, train_saes

    outs = [sae_dir(p, s, model_hash) for s in specs]
    for s, out in zip(specs, outs, strict=True):
        check_trained_config(s, out)
    todo = [(s, out) for s, out in zip(specs, outs, strict=True) if io.read_manifest(out) is None]
    if not todo:
        return outs
    for s, _ in todo:
        registry_append(p, {"event": "train_start", "sae": s.name, "sae_cfg": dataclasses.asdict(s.sae),
                            "train_cfg": dataclasses.asdict(s.train)})
    if len({stream_key(s) for s, _ in todo}) > 1:
        raise ValueError(f"train_group needs SAEs that share one batch stream, got {[s.name for s, _ in todo]}")
    first = todo[0][0]
    t = first.train
    n = (t.tokens // t.batch_size) * t.batch_size
    cap = train_norm_cap(train_reader, t.max_norm_factor) if t.max_norm_factor else None

    def stream():
        for x, g in train_reader.batches(t.batch_size, seed=t.seed, n_tokens=n, device=device,
                                         gradient=first.arm_impl.gradient):
            if cap is not None:  # massive-activation rows stay out of training (PREREG v2)
                keep = x.norm(dim=-1) <= cap
                x, g = x[keep], g[keep]
            yield x, g

    desc = first.name + (f" +{len(todo) - 1} sharing its batches" if len(todo) > 1 else "")
    try:
        with torch_threads(t.threads):
            results = train_saes([Job(s.arm_impl, s.sae, s.train, out / "ckpt") for s, out in todo], stream,
                                 progress=progress, desc=desc, device=device)
    except BaseException as e:
        event = "train_diverged" if isinstance(e, TrainingDiverged) else "train_failed"
        for s, _ in todo:
            registry_append(p, {"event": event, "sae": s.name, "error": str(e) if event == "train_diverged"
                                else repr(e)[:500]})
        raise
    for (s, out), res in zip(todo, results, strict=True):
        _save_trained(p, s, out, res, train_reader, model_hash)
    return outs


def check_trained_config(spec: SAESpec, out: Path) -> None:
    """An SAE directory is keyed by the SAE's name and its data, not by every training setting: one trained under
    other settings (e.g. before the profile's ``train.tokens`` changed) is refused, never reused as this spec."""
    made = io.read_manifest(out)
    if made is None:
        return
    want = {"sae_cfg": dataclasses.asdict(spec.sae), "train_cfg": dataclasses.asdict(spec.train)}
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
    from ..saelens import save_sae

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
                            "train_cfg": dataclasses.asdict(spec.train)},
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
        train_group(p, group, train_reader, mh, progress, device)
    distributed.barrier()


def _evaluate_on_main(p: Profile, lm, specs: list[SAESpec], progress: bool) -> dict[str, dict[str, Any]]:
    """Validation metrics of ``specs``: rank 0 computes them; the other ranks wait, then read its files."""
    from .evaluate import evaluate_specs

    with distributed.main_first():
        return evaluate_specs(p, lm, specs, "val", progress and distributed.is_main())


@functools.lru_cache(maxsize=4)
def _median_norm(harvest_dir: str) -> float:
    from ..harvest import ActivationReader

    return ActivationReader(harvest_dir).statistics().median_norm  # streamed when the split is large


def train_norm_cap(train_reader, factor: float) -> float:
    """``factor`` x the median row norm of the train split (cached per harvest)."""
    return factor * _median_norm(str(train_reader.dir))


def _trial_metrics(ev: dict, spec: SAESpec) -> dict[str, Any]:
    return ev[spec.name]["metrics"][spec.primary_encode]


def check_selection(p: Profile, sel: dict[str, Any], path: Path) -> dict[str, Any]:
    """A stored selection is reused only if it was made under this profile's selection protocol and settings: a
    selection left by another study design (e.g. v1's, in a checkout's committed results) is refused, never
    silently trained on."""
    made = (sel.get("provenance") or {}).get("profile") or {}
    want = json.loads(json.dumps(p.to_dict(), default=str))
    protocol = sel.get("protocol", "v1")
    stale = [name for name in ("selection",) if name in made and made[name] != want[name]]
    if protocol != p.selection.protocol or stale:
        raise ConfigError(f"{path} was made by selection protocol {protocol!r}"
                          + (f" with other {' and '.join(stale)} settings" if stale else "")
                          + f", but profile {p.name!r} uses {p.selection.protocol!r}; move the old results/"
                          f"{p.name}/ aside (it may be a committed earlier study) or run ./run_all.sh --reselect")
    return sel


def run_selection(p: Profile, lm, progress: bool = True) -> dict[str, Any]:
    """PREREG §3: lr trials on the baseline arm, then each other arm's own hyperparameter trials at the chosen lr,
    judged by validation delta_ce (each arm with the encoder it is meant for)."""
    out_path = results_dir(p) / "selection.json"
    if out_path.exists():
        return check_selection(p, io.read_json(out_path), out_path)
    if p.selection.protocol == "per_arm":
        from .selection import select_per_arm

        sel = {**select_per_arm(p, lm, progress), "provenance": io.provenance(profile=p.to_dict())}
        if distributed.is_main():
            io.write_json(out_path, sel)
            registry_append(p, {"event": "selection_done", "lr": sel["lr"], "at_edge": sel["at_edge"]})
        distributed.barrier()
        return sel
    mh = lm.info["model_hash"]
    train_rd = reader(p, "train", mh)
    d_in, gs = train_rd.d, train_rd.manifest["grad_stats"]["grad_scale"]
    lr_specs = selection_specs(p, d_in, gs)
    train_specs(p, lm, lr_specs, train_rd, progress)
    lr_eval = _evaluate_on_main(p, lm, lr_specs, progress)
    lr_scores = {s.train.lr: _trial_metrics(lr_eval, s)["delta_ce"] for s in lr_specs}
    lr = min(lr_scores, key=lr_scores.get)
    hp_specs = selection_specs(p, d_in, gs, lr=lr)
    train_specs(p, lm, hp_specs, train_rd, progress)
    hp_eval = _evaluate_on_main(p, lm, hp_specs, progress)
    trials = [{"arm": s.arm, "lr": s.train.lr, "beta": s.sae.beta, **_trial_metrics(lr_eval, s)} for s in lr_specs]
    trials += [{"arm": s.arm, "lr": lr, "beta": s.sae.beta, "encode_mode": m, **hp_eval[s.name]["metrics"][m]}
               for s in hp_specs for m in ("g", "plain")]
    sel: dict[str, Any] = {"lr": lr}
    for s in hp_specs:
        hp = next(h for h in s.arm_impl.hyperparameters if s.label.startswith(h))
        sel.setdefault(f"{hp}_trials", {})[getattr(s.sae, hp)] = _trial_metrics(hp_eval, s)["delta_ce"]
    for key in [key for key in sel if key.endswith("_trials")]:
        sel[key[:-len("_trials")]] = min(sel[key], key=sel[key].get)
    sel.update({"k": p.experiment.beta_select_k, "seed": p.experiment.beta_select_seed, "split": "val",
                "objective": "delta_ce (g-encode for the g-SAE)", "grad_scale": gs, "lr_trials": lr_scores,
                "trials": trials, "provenance": io.provenance(profile=p.to_dict())})
    if distributed.is_main():
        io.write_json(out_path, sel)
        registry_append(p, {"event": "selection_done", "lr": lr, **chosen_hyperparameters(p, sel)})
    distributed.barrier()
    return sel


def chosen_hyperparameters(p: Profile, sel: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each arm's selected own hyperparameters, e.g. {"gsae": {"beta": 0.1}}, from selection.json."""
    return {a: {hp: sel[hp] for hp in arms.get(a).hyperparameters} for a in p.experiment.arms
            if arms.get(a).hyperparameters}


def selection_edge_check(p: Profile, lm, progress: bool = True) -> dict[str, Any]:
    """One extra validation trial one grid step beyond each selected value that sits on its grid's edge.

    Not part of the registered protocol (DEVIATIONS.md, 2026-11-25 18:30): the primary grid keeps the
    registered choice whatever this finds. It answers whether the choice is an optimum or a limit of the grid:
    ``would_move`` is True when the trial beyond the edge scores better on the selection objective. The step
    is the grid's own ratio at that edge (lr: last / second-to-last multiplier; beta: first / second value)."""
    out_path = results_dir(p) / "selection_edges.json"
    if out_path.exists():
        return io.read_json(out_path)
    if p.selection.protocol != "v1":
        return {}  # the per_arm protocol extends its grids itself
    sel = run_selection(p, lm, progress)
    mh = lm.info["model_hash"]
    train_rd = reader(p, "train", mh)
    d_in, gs, k, seed = train_rd.d, sel["grad_scale"], sel["k"], sel["seed"]
    knobs = [("lr", baseline_arm(p), {})] + [(hp, arm, hps) for arm, hps in chosen_hyperparameters(p, sel).items()
                                            for hp in hps]
    trials: list[tuple[str, float, float, SAESpec]] = []
    for name, arm, hps in knobs:
        grid = sorted(float(v) for v in sel[f"{name}_trials"])
        chosen = sel[name]
        if len(grid) < 2 or chosen not in (grid[0], grid[-1]):
            continue
        beyond = chosen * (grid[-1] / grid[-2] if chosen == grid[-1] else grid[0] / grid[1])
        if name == "lr":
            spec = SAESpec("selection", arm, k, seed, sae_config(p, arm, d_in, k, gs),
                           dataclasses.replace(p.train, seed=seed, lr=beyond), f"edge-lr{beyond:.3g}")
        else:
            spec = SAESpec("selection", arm, k, seed, sae_config(p, arm, d_in, k, gs, **{**hps, name: beyond}),
                           dataclasses.replace(p.train, seed=seed, lr=sel["lr"]), f"edge-{name}{beyond:.3g}")
        trials.append((name, chosen, beyond, spec))
    train_specs(p, lm, [t[3] for t in trials], train_rd, progress)
    ev = _evaluate_on_main(p, lm, [t[3] for t in trials], progress) if trials else {}
    out: dict[str, Any] = {"split": "val", "k": k, "seed": seed, "objective": sel["objective"], "checks": {}}
    for name, chosen, beyond, spec in trials:
        scores = {float(v): d for v, d in sel[f"{name}_trials"].items()}
        chosen_score = scores[float(chosen)]
        score = _trial_metrics(ev, spec)["delta_ce"]
        out["checks"][name] = {"chosen": chosen, "chosen_delta_ce": chosen_score, "beyond": beyond,
                               "beyond_delta_ce": score, "would_move": bool(score < chosen_score),
                               "metrics": _trial_metrics(ev, spec)}
    if distributed.is_main():
        io.write_json(out_path, out)
        registry_append(p, {"event": "selection_edge_check_done",
                            **{n: c["would_move"] for n, c in out["checks"].items()}})
    distributed.barrier()
    return out


def all_specs(p: Profile, lm) -> list[SAESpec]:
    """Every SAE of the grid; runs the selection first if it has not run."""
    sel = run_selection(p, lm, progress=False)
    rd = reader(p, "train", lm.info["model_hash"])
    return experiment_specs(p, rd.d, sel["grad_scale"], chosen_hyperparameters(p, sel), sel["lr"])


def run(p: Profile, lm=None, progress: bool = True) -> list[SAESpec]:
    """Selection, edge check and the whole grid (spread over the ranks of a torchrun launch, by seed); returns the
    grid's specs."""
    from . import load_lm

    with distributed.main_first():  # rank 0 downloads the LM first
        lm = lm or load_lm(p, progress)
    from .selection import convergence

    run_selection(p, lm, progress)
    selection_edge_check(p, lm, progress)
    convergence(p, lm, progress)
    specs = all_specs(p, lm)
    train_specs(p, lm, specs, reader(p, "train", lm.info["model_hash"]), progress, by_seed=True)
    return specs


def training_history_frame(p: Profile, lm, specs: list[SAESpec], group: str = "primary"):
    """Long table of the training curves (one row per logged step): arm, k, seed and the logged fields
    (tokens, the arm's loss terms, l0, dead_fraction) from each SAE's train.json."""
    import pandas as pd

    mh = lm.info["model_hash"]
    rows = [{"arm": s.arm, "k": s.k, "seed": s.seed, **r}
            for s in specs if s.group == group for r in io.read_json(sae_dir(p, s, mh) / "train.json")["history"]]
    return pd.DataFrame(rows)
