"""What gets trained: the length check's group (PREREG v3 §2) and the refusal to reuse an SAE trained under other
settings (directories are keyed by name and data, not by every training setting)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from gsae import io, specs
from gsae.config import ConfigError, profile_from_dict
from gsae.paths import ROOT
from gsae.stages._jobs import check_trained_config

CHOSEN = {"gsae": {"beta": 0.1}}


def profile(**variants):
    """profiles/robustness.yaml (the default study's primary group with the robustness reruns), ``variants`` set."""
    raw = yaml.safe_load((ROOT / "profiles" / "robustness.yaml").read_text())
    raw["variants"] = {**raw["variants"], **variants}
    return profile_from_dict("default", raw)


@pytest.mark.parametrize("length_seeds, expected", [([], range(8)), ([0, 1, 2, 3], range(4)), ([3, 6], (3, 6))])
def test_length_group_retrains_the_primary_k_saes_of_its_seeds_for_m_times_the_tokens(length_seeds, expected):
    """Without ``length_seeds`` every primary seed; with them only those."""
    p = profile(length_multiplier=2.0, length_seeds=length_seeds)
    grid = specs.experiment_specs(p, 576, 1.0, {"gsae": {"beta": 0.1}}, {"topk": 4e-3, "gsae": 2e-3})
    primary = {(s.arm, s.k, s.seed): s for s in grid if s.group == "primary"}
    longer = [s for s in grid if s.group == "length_2"]
    assert specs.length_group(p) == "length_2"
    assert len(p.experiment.seeds) == 8
    assert sorted((s.arm, s.k, s.seed) for s in longer) == sorted((a, 32, s) for a in ("topk", "gsae")
                                                                  for s in expected)
    for s in longer:
        ref = primary[s.arm, s.k, s.seed]
        assert s.train.tokens == 727 * 1024 and s.sae == ref.sae  # 2 x 372,000 / 1,024 = 726.6 batches, rounded
        assert dataclasses.replace(s.train, tokens=ref.train.tokens) == ref.train  # same lr, seed and schedule
    assert not [s for s in specs.experiment_specs(profile(length_multiplier=0.0), 576, 1.0, CHOSEN, 1e-3)
                if s.group.startswith("length")]


def test_length_seeds_outside_the_primary_seeds_are_refused_with_what_to_do():
    with pytest.raises(ConfigError, match=r"variants.length_seeds \[16\] are not experiment seeds.*experiment.seeds"):
        profile(length_seeds=[0, 16])


def test_the_robustness_profile_reruns_the_registered_seeds_and_the_default_profile_none():
    """PREREG v6 §7: one thread on seeds 0-3, twice the length on seeds 0-7; the default run has no variant."""
    p = profile()
    assert (p.variants.threads, list(p.variants.seeds), p.variants.length_multiplier) == (1, [0, 1, 2, 3], 2.0)
    assert list(p.variants.length_seeds) == list(range(8)) and not p.experiment.dose_seeds
    default = profile_from_dict("default", yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text()))
    assert not specs.length_group(default) and not default.variants.threads


def test_length_group_rounds_to_whole_batches():
    p = profile(length_multiplier=0.5)
    s = next(s for s in specs.experiment_specs(p, 576, 1.0, CHOSEN, 1e-3) if s.group == "length_0.5")
    assert s.train.tokens % p.train.batch_size == 0 and abs(s.train.tokens - 186_000) < p.train.batch_size


def test_an_sae_trained_under_other_settings_is_refused_with_what_to_do(tmp_path):
    p = profile()
    spec = next(s for s in specs.experiment_specs(p, 576, 1.0, CHOSEN, 1e-3) if s.k == 32)
    check_trained_config(spec, tmp_path)  # nothing trained there yet: fine
    made = {"sae_cfg": dataclasses.asdict(spec.sae), "train_cfg": dataclasses.asdict(spec.train)}
    (tmp_path / io.MANIFEST).write_text(json.dumps(made))
    check_trained_config(spec, tmp_path)  # the same settings: reused
    made["train_cfg"]["tokens"] *= 2
    (tmp_path / io.MANIFEST).write_text(json.dumps(made))
    with pytest.raises(ConfigError, match="train_cfg.*move that directory aside"):
        check_trained_config(spec, tmp_path)
