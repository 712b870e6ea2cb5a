"""The selection (PREREG §3) and the convergence check; ``all_specs`` is the grid every later stage receives.

Every arm gets the same learning-rate trials (its own hyperparameters at the first value of their grid, e.g. the
g-SAE's registered beta), trained at each selection seed (never a primary seed) for the primary training length
at the selection k, and scored by its **plain-encode** validation delta_ce (label-free, the primary encoder), mean
over the seeds. A best lr on the grid's edge gets a trial one grid step beyond it, at most ``max_extensions`` times,
so the chosen lr is inside its grid or the record says it is not. The convergence check then trains each arm at the
chosen lr for ``length_multipliers`` x the primary length (first selection seed) and records the validation
delta_ce against the number of training tokens.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .. import arms, distributed, io
from ..config import ConfigError, Profile
from ..io import registry_append
from ..paths import results_dir
from ..specs import SAESpec, experiment_specs, sae_config, scaled_tokens
from ._jobs import evaluate_on_main, train_specs
from .harvest import reader


def _own(p: Profile, arm: str) -> dict[str, float]:
    return {hp: grid[0] for hp, grid in arms.get(arm).hyperparameter_grid(p.experiment).items()}


def trial_spec(p: Profile, arm: str, d_in: int, gs: float, lr: float, seed: int, tokens: int | None = None,
               label: str = "") -> SAESpec:
    k = p.experiment.beta_select_k
    train = dataclasses.replace(p.train, seed=seed, lr=lr, **({"tokens": tokens} if tokens else {}))
    return SAESpec("selection", arm, k, seed, sae_config(p, arm, d_in, k, gs, **_own(p, arm)), train,
                   label or f"lr{lr:.4g}")


def _score(p: Profile, lm, specs: list[SAESpec], progress: bool) -> dict[str, dict[str, Any]]:
    """Train ``specs`` (spread over the ranks of a torchrun launch) and their plain-encode validation metrics
    (rank 0 evaluates, the others read its files)."""
    train_specs(p, lm, specs, reader(p, "train", lm.info["model_hash"]), progress)
    ev = evaluate_on_main(p, lm, specs, progress)
    return {s.name: ev[s.name]["metrics"]["plain"] for s in specs}


def select_per_arm(p: Profile, lm, progress: bool = True) -> dict[str, Any]:
    """Each arm's lr (module docstring); returns what selection.json records."""
    train_rd = reader(p, "train", lm.info["model_hash"])
    d_in, gs = train_rd.d, train_rd.manifest["grad_stats"]["grad_scale"]
    grid = sorted(p.train.lr * m for m in p.selection.lr_multipliers)
    step_up = grid[-1] / grid[-2] if len(grid) > 1 else 2.0
    step_down = grid[0] / grid[1] if len(grid) > 1 else 0.5
    out: dict[str, Any] = {"protocol": "per_arm", "k": p.experiment.beta_select_k, "seeds": list(p.selection.seeds),
                           "split": "val", "objective": "plain-encode delta_ce, mean over the selection seeds",
                           "grad_scale": gs, "lr": {}, "lr_trials": {}, "extensions": {}, "at_edge": {},
                           "trials": []}
    for arm in p.experiment.arms:
        lrs, scores, extensions = list(grid), {}, 0
        while True:
            todo = [lr for lr in lrs if lr not in scores]
            specs = lr_trial_specs(p, arm, todo, d_in, gs)
            res = _score(p, lm, [s for ss in specs.values() for s in ss], progress)
            for lr, ss in specs.items():
                scores[lr] = sum(res[s.name]["delta_ce"] for s in ss) / len(ss)
                out["trials"] += [{"arm": arm, "lr": lr, "seed": s.seed, **_own(p, arm), **res[s.name]} for s in ss]
            best = min(scores, key=scores.get)
            edge = best in (min(scores), max(scores))
            if not edge or extensions >= p.selection.max_extensions:
                break
            lrs.append(best * (step_up if best == max(scores) else step_down))
            extensions += 1
        out["lr"][arm], out["lr_trials"][arm] = best, scores
        out["extensions"][arm], out["at_edge"][arm] = extensions, edge
        out.update(_own(p, arm))
    return out


def lr_trial_specs(p: Profile, arm: str, lrs: list[float], d_in: int, gs: float) -> dict[float, list[SAESpec]]:
    """The per_arm selection trials of ``arm``: each lr at every selection seed, at the primary length."""
    return {lr: [trial_spec(p, arm, d_in, gs, lr, s) for s in p.selection.seeds] for lr in lrs}


def length_curve_specs(p: Profile, arm: str, lr: float, seed: int, d_in: int, gs: float,
                       multipliers: tuple[float, ...] | list[float]) -> dict[float, SAESpec]:
    """``arm`` at ``lr`` for each multiple of the primary length (whole batches; 1.0 is the selection's own trial)."""
    return {m: trial_spec(p, arm, d_in, gs, lr, seed, None if m == 1.0 else scaled_tokens(p.train, m),
                          "" if m == 1.0 else f"lr{lr:.4g}-len{m:g}") for m in multipliers}


def _length_curve(p: Profile, lm, arm: str, lr: float, seed: int, d_in: int, gs: float,
                  multipliers: tuple[float, ...] | list[float], progress: bool) -> dict[str, Any]:
    """Train ``length_curve_specs`` (1.0 is the selection's own trial, so it is reused) and return their
    validation metrics keyed by the tokens trained."""
    specs = length_curve_specs(p, arm, lr, seed, d_in, gs, multipliers)
    res = _score(p, lm, list(specs.values()), progress)
    return {str(scaled_tokens(p.train, m)): res[s.name] for m, s in specs.items()}


def check_selection(p: Profile, sel: dict[str, Any], path: Path) -> dict[str, Any]:
    """A stored selection is reused only if it was made by this protocol under this profile's selection settings:
    one left by another design (another protocol, other trials) is refused, never silently trained on."""
    made = ((sel.get("provenance") or {}).get("profile") or {}).get("selection")
    want = json.loads(json.dumps(p.to_dict(), default=str))["selection"]
    if made is not None:
        made = {key: v for key, v in made.items() if key != "protocol"}  # recorded when it had another value too
    if sel.get("protocol") != "per_arm" or (made is not None and made != want):
        raise ConfigError(f"{path} was made by another selection protocol or with other selection settings than "
                          f"profile {p.name!r} has; move the old results/{p.name}/ aside or run ./run_all.sh "
                          f"--reselect")
    return sel


def run_selection(p: Profile, lm, progress: bool = True) -> dict[str, Any]:
    """selection.json: every arm's lr (``select_per_arm``), computed once and then reused."""
    out_path = results_dir(p) / "selection.json"
    if out_path.exists():
        return check_selection(p, io.read_json(out_path), out_path)
    sel = {**select_per_arm(p, lm, progress), "provenance": io.provenance(profile=p.to_dict())}
    if distributed.is_main():
        io.write_json(out_path, sel)
        registry_append(p, {"event": "selection_done", "lr": sel["lr"], "at_edge": sel["at_edge"]})
    distributed.barrier()
    return sel


def chosen_hyperparameters(p: Profile, sel: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each arm's selected own hyperparameters, e.g. {"gsae": {"beta": 0.1}}, from selection.json."""
    return {a: {hp: sel[hp] for hp in arms.get(a).hyperparameters} for a in p.experiment.arms
            if arms.get(a).hyperparameters}


def all_specs(p: Profile, lm) -> list[SAESpec]:
    """Every SAE of the grid; runs the selection first if it has not run."""
    sel = run_selection(p, lm, progress=False)
    rd = reader(p, "train", lm.info["model_hash"])
    return experiment_specs(p, rd.d, sel["grad_scale"], chosen_hyperparameters(p, sel), sel["lr"])


def convergence(p: Profile, lm, progress: bool = True) -> dict[str, Any]:
    """Validation delta_ce of each arm at its chosen lr against the training length (convergence.json)."""
    path = results_dir(p) / "convergence.json"
    if path.exists() or not p.selection.length_multipliers:
        return io.read_json(path) if path.exists() else {}
    sel = io.read_json(results_dir(p) / "selection.json")
    train_rd = reader(p, "train", lm.info["model_hash"])
    d_in, gs, seed = train_rd.d, sel["grad_scale"], p.selection.seeds[0]
    lengths = sorted({1.0, *p.selection.length_multipliers})
    curves = {arm: _length_curve(p, lm, arm, sel["lr"][arm], seed, d_in, gs, lengths, progress)
              for arm in p.experiment.arms}
    out = {"split": "val", "seed": seed, "primary_tokens": p.train.tokens, "curves": curves,
           "provenance": io.provenance(profile=p.to_dict())}
    if distributed.is_main():
        io.write_json(path, out)
        registry_append(p, {"event": "convergence_done"})
    distributed.barrier()
    return out


def extend_convergence(p: Profile, lm, multipliers: tuple[float, ...], progress: bool = True) -> dict[str, Any]:
    """Exploratory, never a verdict's input: the convergence check's curve continued to ``multipliers`` x the
    primary length (same arm, lr, seed and schedule shape; the harvest is re-read, so a multiplier m is
    m x primary / harvested-train-tokens epochs). Written to convergence_extension.json beside convergence.json,
    whose points it repeats, so one file holds the whole curve."""
    base = io.read_json(results_dir(p) / "convergence.json")
    sel = io.read_json(results_dir(p) / "selection.json")
    train_rd = reader(p, "train", lm.info["model_hash"])
    d_in, gs, seed = train_rd.d, sel["grad_scale"], base["seed"]
    curves = {arm: {**base["curves"][arm],
                    **_length_curve(p, lm, arm, sel["lr"][arm], seed, d_in, gs, multipliers, progress)}
              for arm in p.experiment.arms}
    out = {**{k: base[k] for k in ("split", "seed", "primary_tokens")}, "exploratory": True,
           "harvested_train_tokens": train_rd.n_tokens, "curves": curves,
           "provenance": io.provenance(profile=p.to_dict())}
    if distributed.is_main():
        io.write_json(results_dir(p) / "convergence_extension.json", out)
    distributed.barrier()
    return out


def relative_change(curve: dict[str, dict[str, Any]], base_tokens: int, metric: str = "delta_ce") -> float | None:
    """(metric at twice the primary length - metric at the primary length) / metric at the primary length. The
    curve's lengths are whole batches, so each is matched to the nearest recorded length within 1 %."""
    def near(tokens: float) -> dict[str, Any] | None:
        key = min(curve, key=lambda t: abs(int(t) - tokens), default=None)
        return None if key is None or abs(int(key) - tokens) > 0.01 * tokens else curve[key]

    a, b = near(base_tokens), near(2 * base_tokens)
    return None if a is None or b is None else (b[metric] - a[metric]) / a[metric]


def step_changes(curve: dict[str, dict[str, Any]], metric: str = "delta_ce") -> list[tuple[int, int, float]]:
    """(tokens, next recorded tokens, relative change of ``metric`` between them) along a convergence curve."""
    toks = sorted(curve, key=int)
    return [(int(a), int(b), curve[b][metric] / curve[a][metric] - 1) for a, b in zip(toks, toks[1:], strict=False)]
