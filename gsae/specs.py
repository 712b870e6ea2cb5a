"""What gets trained: one ``SAESpec`` per SAE, a pure function of the profile and the selection results.

Specs are work items: the same profile always yields the same list in the same order, and an SAE's directory
(``sae_dir``) is keyed by its name and the data it is trained on, so which process trains a spec never changes
its bytes. Arms come from ``gsae.arms``; this module never branches on an arm's name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import arms, io
from .config import ConfigError, Profile, SAEConfig, TrainConfig, config_hash, load_profile, profile_file, shown_path
from .paths import run_dir


def check_profile(p: Profile) -> Profile:
    """``p`` once its arms are checked against the registry (``gsae.config`` never imports the arms): every name in
    ``experiment.arms`` is a registered arm, and an arm fed the label-free gradient has it harvested on every
    split. Raises ``ConfigError``; returns ``p``."""
    unknown = [a for a in p.experiment.arms if a not in arms.names()]
    if unknown:
        raise ConfigError(f"experiment.arms names {unknown}, which are not registered arms; registered arms: "
                          f"{sorted(arms.names())}")
    label_free = [a for a in p.experiment.arms if arms.get(a).gradient == "g_free"]
    if label_free and set(p.harvest.label_free_splits) != {"train", "val", "test"}:
        raise ConfigError(f"arm(s) {label_free} train and encode with the label-free gradient; set "
                          f"harvest.label_free_splits to [train, val, test]")
    if p.harvest.label_free != "argmax":
        raise ConfigError("harvest.label_free: sampled is not a pipeline setting: the splice evaluation computes the "
                          "argmax g_free, and no arm trains on the sampled one (its mean tends to 0: "
                          "docs/checks/label_free_gradient.py measures it); use argmax")
    return p


def load_checked_profile(name_or_path: str | Path) -> Profile:
    """``gsae.config.load_profile`` plus ``check_profile``: the profile as the pipeline and the notebooks run it
    (errors name the file)."""
    p = load_profile(name_or_path)
    try:
        return check_profile(p)
    except ConfigError as e:
        raise ConfigError(f"{shown_path(profile_file(name_or_path))}: {e}") from None


@dataclass(frozen=True)
class SAESpec:
    group: str
    """"selection", "primary" or a sensitivity variant name."""
    arm: str
    """Registered arm name (``gsae.arms``)."""
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

    @property
    def arm_impl(self) -> arms.Arm:
        return arms.get(self.arm)

    @property
    def primary_encode(self) -> str:
        """The encoder this SAE is meant to be used with: its arm's gradient ("g" or "g_free") when its code uses
        one, else "plain"."""
        return self.arm_impl.gradient if self.arm_impl.has_gradient_encoder else "plain"


def sae_config(p: Profile, arm: str, d_in: int, k: int, grad_scale: float, **own: Any) -> SAEConfig:
    """The ``SAEConfig`` of ``arm`` at sparsity ``k`` with the profile's dictionary size and the arm's own fields."""
    return arms.get(arm).make_config(d_in=d_in, d_sae=p.experiment.expansion * d_in, k=k, grad_scale=grad_scale,
                                     **own)


def baseline_arm(p: Profile) -> str:
    return p.experiment.arms[0]


def experiment_specs(p: Profile, d_in: int, grad_scale: float, chosen: dict[str, dict[str, float]],
                     lr: float | dict[str, float]) -> list[SAESpec]:
    """The primary grid (every arm, k and seed; arms interleaved per (k, seed)) and the sensitivity variants:
    each arm's own variants and ``auxk_off`` (AuxK off) for every arm at ``variants.k_grid``, and with
    ``variants.threads`` the primary-k SAEs (``variants.seeds``, else the primary seeds) retrained with that many
    threads, and with ``variants.length_multiplier`` m the primary-k SAEs (``variants.length_seeds``, else the
    primary seeds) trained for m x
    ``train.tokens`` (group ``length_group``). ``chosen`` maps an arm to its selected
    hyperparameters; ``lr`` is one learning rate for every arm or one per arm."""
    def cfg(name: str, k: int, **over: Any) -> SAEConfig:
        return sae_config(p, name, d_in, k, grad_scale, **{**chosen.get(name, {}), **over})

    def train(name: str, seed: int, **over: Any) -> TrainConfig:
        return replace(p.train, seed=seed, lr=lr[name] if isinstance(lr, dict) else lr, **over)

    e = p.experiment
    primary_k = e.primary_k or e.k_grid
    specs = [SAESpec("primary", name, k, s, cfg(name, k), train(name, s))
             for k in e.k_grid for s in (e.seeds if k in primary_k else e.curve_seeds or e.seeds) for name in e.arms]
    for k in p.variants.k_grid:
        for s in p.variants.seeds:
            for name in e.arms:
                for variant, over in arms.get(name).sensitivity_variants.items():
                    specs.append(SAESpec(variant, name, k, s, cfg(name, k, **over), train(name, s)))
            specs += [SAESpec("auxk_off", name, k, s, cfg(name, k), train(name, s, aux_coef=0.0)) for name in e.arms]
    if p.variants.threads:
        specs += [SAESpec(threads_group(p), name, k, s, cfg(name, k), train(name, s, threads=p.variants.threads))
                  for k in primary_k for s in (p.variants.seeds or e.seeds) for name in e.arms]
    if p.variants.length_multiplier:
        tokens = scaled_tokens(p.train, p.variants.length_multiplier)
        specs += [SAESpec(length_group(p), name, k, s, cfg(name, k), train(name, s, tokens=tokens))
                  for k in primary_k for s in (p.variants.length_seeds or e.seeds) for name in e.arms]
    return specs


def dose_specs(p: Profile, arm: str, d_in: int, grad_scale: float, lr_by_beta: dict[float, float]) -> list[SAESpec]:
    """The dose-response of ``arm``: each beta of ``lr_by_beta`` (at its lr) at every primary k and
    ``experiment.dose_seeds``, as group "beta_<b>"; paired with the baseline's primary SAEs of the same seeds."""
    e = p.experiment
    return [SAESpec(f"beta_{b:g}", arm, k, s, sae_config(p, arm, d_in, k, grad_scale, beta=b),
                    replace(p.train, seed=s, lr=lr))
            for b, lr in sorted(lr_by_beta.items()) for k in (e.primary_k or e.k_grid) for s in e.dose_seeds]


def scaled_tokens(train: TrainConfig, multiplier: float) -> int:
    """``multiplier`` x the training length, rounded to whole batches (at least one)."""
    return max(1, round(multiplier * train.tokens / train.batch_size)) * train.batch_size


def threads_group(p: Profile) -> str:
    """The group name of the rerun on ``variants.threads`` CPU threads, e.g. "threads_1" ("" without one)."""
    return f"threads_{p.variants.threads}" if p.variants.threads else ""


def length_group(p: Profile) -> str:
    """The group name of the length check's SAEs, e.g. "length_2" ("" without one)."""
    m = p.variants.length_multiplier
    return f"length_{m:g}" if m else ""


def sae_dir(p: Profile, spec: SAESpec, model_hash: str) -> Path:
    return run_dir(p) / "saes" / config_hash(p.model, p.data, p.harvest, model_hash, n=8) / spec.name


def source_version(*modules: Any) -> str:
    """Hash of the source files of ``modules``: keys a cached per-SAE result to the code that computed it, so an
    edited metric is recomputed without a hand-bumped version number."""
    h = hashlib.sha256()
    for m in modules:
        h.update(Path(m.__file__).read_bytes())
    return h.hexdigest()[:8]


def stage_file(p: Profile, stage: str, split: str = "test", code: str = "") -> str:
    """Per-SAE result file name keyed by the settings (and ``code``, a ``source_version``) that produced it, so a
    changed config or code is recomputed rather than read stale."""
    section = {"eval": p.eval, "firing": p.eval, "fulltest": p.eval, "steer": p.steering, "probe": p.probing}[stage]
    ext = "safetensors" if stage == "firing" else "json"
    return f"{stage}_{split}-{config_hash(section, code, n=8)}.{ext}"


def load_trained(p: Profile, spec: SAESpec, model_hash: str, device: Any = None):
    """The trained SAE of ``spec`` (integrity-checked against its manifest), as its arm's module, on ``device``
    (default CPU)."""
    from .arms.saelens import load_sae

    d = sae_dir(p, spec, model_hash)
    io.verify_manifest(d, rebuild_hint=f"delete {d} and re-run the train stage")
    sae = load_sae(d / "sae")
    return sae if device is None else sae.to(device)
