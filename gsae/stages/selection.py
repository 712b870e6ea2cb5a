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
from typing import Any, NamedTuple

from .. import arms, distributed, io
from ..config import ConfigError, Profile
from ..io import registry_append
from ..paths import results_dir
from ..specs import SAESpec, dose_specs, experiment_specs, sae_config, scaled_tokens
from ._jobs import evaluate_on_main, train_specs
from .harvest import reader


def _own(p: Profile, arm: str) -> dict[str, float]:
    return {hp: grid[0] for hp, grid in arms.get(arm).hyperparameter_grid(p.experiment).items()}


def trial_spec(p: Profile, arm: str, d_in: int, gs: float, lr: float, seed: int, tokens: int | None = None,
               label: str = "", **own: float) -> SAESpec:
    """A selection trial of ``arm`` at ``lr``; ``own`` overrides the arm's hyperparameters (default: the first value
    of each grid), and a trial with an override is labelled with it (e.g. "lr0.004-beta3")."""
    k = p.experiment.beta_select_k
    train = dataclasses.replace(p.train, seed=seed, lr=lr, **({"tokens": tokens} if tokens else {}))
    tail = "".join(f"-{hp}{v:g}" for hp, v in own.items())
    return SAESpec("selection", arm, k, seed, sae_config(p, arm, d_in, k, gs, **{**_own(p, arm), **own}), train,
                   label or f"lr{lr:.4g}{tail}")


def _score(p: Profile, lm, specs: list[SAESpec], progress: bool) -> dict[str, dict[str, Any]]:
    """Train ``specs`` (spread over the ranks of a torchrun launch) and their validation metrics per encoder
    (rank 0 evaluates, the others read its files)."""
    train_specs(p, lm, specs, reader(p, "train", lm.info["model_hash"]), progress)
    ev = evaluate_on_main(p, lm, specs, progress)
    return {s.name: ev[s.name]["metrics"] for s in specs}


class LRChoice(NamedTuple):
    lr: float
    scores: dict[float, float]
    """lr -> plain-encode validation delta_ce, mean over the selection seeds."""
    extensions: int
    at_edge: bool
    trials: list[dict[str, Any]]
    """One record per trial SAE: arm, lr, seed, the arm's hyperparameters and its plain-encode metrics."""
    metrics: dict[float, list[dict[str, Any]]]
    """lr -> every selection seed's metrics per encoder."""


def select_lr(p: Profile, lm, arm: str, d_in: int, gs: float, progress: bool, **own: float) -> LRChoice:
    """``arm``'s lr (module docstring), at its own hyperparameters overridden by ``own``."""
    grid = sorted(p.train.lr * m for m in p.selection.lr_multipliers)
    step_up = grid[-1] / grid[-2] if len(grid) > 1 else 2.0
    step_down = grid[0] / grid[1] if len(grid) > 1 else 0.5
    lrs, scores, metrics, trials, extensions = list(grid), {}, {}, [], 0
    while True:
        specs = {lr: [trial_spec(p, arm, d_in, gs, lr, s, **own) for s in p.selection.seeds]
                 for lr in lrs if lr not in scores}
        res = _score(p, lm, [s for ss in specs.values() for s in ss], progress)
        for lr, ss in specs.items():
            metrics[lr] = [res[s.name] for s in ss]
            scores[lr] = sum(m["plain"]["delta_ce"] for m in metrics[lr]) / len(ss)
            trials += [{"arm": arm, "lr": lr, "seed": s.seed, **_own(p, arm), **own, **res[s.name]["plain"]}
                       for s in ss]
        best = min(scores, key=scores.get)
        edge = best in (min(scores), max(scores))
        if not edge or extensions >= p.selection.max_extensions:
            return LRChoice(best, scores, extensions, edge, trials, metrics)
        lrs.append(best * (step_up if best == max(scores) else step_down))
        extensions += 1


def select_per_arm(p: Profile, lm, progress: bool = True) -> dict[str, Any]:
    """Each arm's lr (module docstring); returns what selection.json records."""
    train_rd = reader(p, "train", lm.info["model_hash"])
    d_in, gs = train_rd.d, train_rd.manifest["grad_stats"]["grad_scale"]
    out: dict[str, Any] = {"protocol": "per_arm", "k": p.experiment.beta_select_k, "seeds": list(p.selection.seeds),
                           "split": "val", "objective": "plain-encode delta_ce, mean over the selection seeds",
                           "grad_scale": gs, "lr": {}, "lr_trials": {}, "extensions": {}, "at_edge": {},
                           "trials": []}
    for arm in p.experiment.arms:
        c = select_lr(p, lm, arm, d_in, gs, progress)
        out["lr"][arm], out["lr_trials"][arm] = c.lr, c.scores
        out["extensions"][arm], out["at_edge"][arm] = c.extensions, c.at_edge
        out["trials"] += c.trials
        out.update(_own(p, arm))
    return out


def lr_trial_specs(p: Profile, arm: str, lrs: list[float], d_in: int, gs: float) -> dict[float, list[SAESpec]]:
    """The per_arm selection trials of ``arm``: each lr at every selection seed, at the primary length."""
    return {lr: [trial_spec(p, arm, d_in, gs, lr, s) for s in p.selection.seeds] for lr in lrs}


def beta_arms(p: Profile) -> list[str]:
    """The arms with a beta (the g-SAE): those the dose-response trains at every beta."""
    return [a for a in p.experiment.arms if "beta" in arms.get(a).hyperparameters]


def select_beta(p: Profile, lm, sel: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """The dose-response's selection (PREREG §3), on the validation split: each beta of ``experiment.beta_grid``
    gets its own lr from the same trials as every arm's (``select_lr``; the first beta's is selection.json's), and
    the chosen beta is the one whose trials at that lr have the lowest mean ``experiment.beta_select_encode``
    validation delta_ce. A chosen beta on an edge of the grid adds one beta beyond it (the edge's own ratio), at most
    ``selection.max_extensions`` times. Returns what beta_selection.json records."""
    train_rd = reader(p, "train", lm.info["model_hash"])
    d_in, gs, e = train_rd.d, train_rd.manifest["grad_stats"]["grad_scale"], p.experiment  # as select_per_arm
    out: dict[str, Any] = {"k": e.beta_select_k, "seeds": list(p.selection.seeds), "split": "val",
                           "objective": f"{e.beta_select_encode}-encode delta_ce at each beta's own lr, mean over "
                                        f"the selection seeds", "arms": {}}
    for arm in beta_arms(p):
        if e.beta_select_encode == "none":  # fixed: the first beta, every beta at the arm's selected lr
            out["arms"][arm] = {"beta": e.beta_grid[0], "lr": sel["lr"][arm], "extensions": 0, "at_edge": False,
                                "betas": [{"beta": b, "lr": sel["lr"][arm]} for b in sorted(e.beta_grid)]}
            continue
        betas, rec, extensions = sorted(e.beta_grid), {}, 0
        while True:
            for b in [b for b in betas if b not in rec]:
                if b == e.beta_grid[0]:  # selection.json chose its lr: only its trials at that lr are scored
                    lr = sel["lr"][arm]
                    res = _score(p, lm, [trial_spec(p, arm, d_in, gs, lr, s) for s in p.selection.seeds], progress)
                    c = LRChoice(lr, sel["lr_trials"][arm], sel["extensions"][arm], sel["at_edge"][arm], [],
                                 {lr: list(res.values())})
                else:
                    c = select_lr(p, lm, arm, d_in, gs, progress, beta=b)
                ms = c.metrics[c.lr]
                score = sum(m[e.beta_select_encode]["delta_ce"] for m in ms) / len(ms)
                rec[b] = {"beta": b, "lr": c.lr, "score": score, "lr_trials": c.scores, "at_edge": c.at_edge,
                          "trials": c.trials,
                          "selection_changed_share": [m["g"].get("selection_changed_share") for m in ms]}
            best = min(rec, key=lambda b: rec[b]["score"])
            edge = best in (min(rec), max(rec)) and len(rec) > 1
            if not edge or extensions >= p.selection.max_extensions:
                break
            lo, hi = sorted(rec)[:2] if best == min(rec) else sorted(rec)[-2:]
            betas.append(best * (lo / hi if best == min(rec) else hi / lo))
            extensions += 1
        out["arms"][arm] = {"beta": best, "lr": rec[best]["lr"], "extensions": extensions, "at_edge": edge,
                            "betas": [rec[b] for b in sorted(rec)]}
    return out


def run_beta_selection(p: Profile, lm, sel: dict[str, Any], progress: bool = True) -> dict[str, Any] | None:
    """beta_selection.json (``select_beta``), computed once and then reused; None without a dose-response."""
    if not p.experiment.dose_seeds:
        return None
    path = results_dir(p) / "beta_selection.json"
    want = json.loads(json.dumps({"beta_grid": p.experiment.beta_grid, "encode": p.experiment.beta_select_encode}))
    if path.exists():
        made = io.read_json(path)
        if made.get("settings") != want:
            raise ConfigError(f"{path} was made with other beta settings ({made.get('settings')}) than profile "
                              f"{p.name!r} has ({want}); move it aside or run ./run_all.sh --reselect")
        return made
    out = {**select_beta(p, lm, sel, progress), "settings": want, "provenance": io.provenance(profile=p.to_dict())}
    if distributed.is_main():
        io.write_json(path, out)
        registry_append(p, {"event": "beta_selection_done",
                            "beta": {a: r["beta"] for a, r in out["arms"].items()}})
    distributed.barrier()
    return out


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
    return {str(scaled_tokens(p.train, m)): res[s.name]["plain"] for m, s in specs.items()}


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
    """Every SAE of the grid; runs the selection (and the beta selection of a dose-response) first if it has not
    run. With a dose-response the g-SAE's primary group trains at the chosen beta and its lr, and every other beta
    of the selection becomes group "beta_<b>" at ``experiment.dose_seeds``."""
    sel = run_selection(p, lm, progress=False)
    rd = reader(p, "train", lm.info["model_hash"])
    chosen, lr = chosen_hyperparameters(p, sel), dict(sel["lr"])
    dose = run_beta_selection(p, lm, sel, progress=False)
    for arm, rec in (dose or {}).get("arms", {}).items():
        chosen[arm], lr[arm] = {**chosen.get(arm, {}), "beta": rec["beta"]}, rec["lr"]
    specs = experiment_specs(p, rd.d, sel["grad_scale"], chosen, lr)
    for arm, rec in (dose or {}).get("arms", {}).items():
        specs += dose_specs(p, arm, rd.d, sel["grad_scale"], {b["beta"]: b["lr"] for b in rec["betas"]
                                                              if b["beta"] != rec["beta"]})
    return specs


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
