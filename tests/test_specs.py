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
    raw = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    raw["variants"] = {**raw["variants"], **variants}
    return profile_from_dict("default", raw)


@pytest.mark.parametrize("length_seeds, expected", [([], range(16)), ([0, 1, 2, 3, 4, 5, 6, 7], range(8)),
                                                    ([3, 11], (3, 11))])
def test_length_group_retrains_the_primary_k_saes_of_its_seeds_for_m_times_the_tokens(length_seeds, expected):
    """Without ``length_seeds`` every primary seed (PREREG v3/v4); with them only those (PREREG v5: seeds 0-7)."""
    p = profile(length_multiplier=2.0, length_seeds=length_seeds)
    grid = specs.experiment_specs(p, 576, 1.0, {"gsae": {"beta": 0.1}}, {"topk": 4e-3, "gsae": 2e-3})
    primary = {(s.arm, s.k, s.seed): s for s in grid if s.group == "primary"}
    longer = [s for s in grid if s.group == "length_2"]
    assert specs.length_group(p) == "length_2"
    assert len(p.experiment.seeds) == 16
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


def test_the_registered_profile_runs_the_length_check_on_the_registered_seeds():
    """profiles/default.yaml and prereg.yaml name the same length-check seeds (PREREG §5)."""
    pre = yaml.safe_load((ROOT / "prereg.yaml").read_text())
    assert list(profile().variants.length_seeds) == pre["length_check"]["seeds"] == list(range(8))


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
