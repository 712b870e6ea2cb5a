"""Bad input is refused early with a message that says what to change, and leaves nothing behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gsae import pipeline
from gsae.config import SECTIONS, ConfigError, load_profile, profile_from_dict
from gsae.stages.contexts import rows_per_context

ROOT = Path(__file__).resolve().parent.parent


def smoke_raw() -> dict:
    return yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())


def with_change(section: str, **kw) -> dict:
    raw = smoke_raw()
    raw[section] = {**raw[section], **kw}
    return raw


BAD = [
    (with_change("model", name="gpt5"), "unknown model"),
    (with_change("model", hook="resid_side"), "unknown hook"),
    (with_change("model", layer=-1), "layer must be >= 0"),
    (with_change("model", layer=9, n_layers=2), "out of range"),
    (with_change("data", corpus="wikipedia"), "unknown corpus"),
    (with_change("data", ctx_len=2), "ctx_len"),
    (with_change("data", split_fracs=[0.5, 0.5, 0.5]), "split_fracs"),
    (with_change("harvest", dtype="int8"), "harvest.dtype"),
    (with_change("harvest", tokens={"train": 0}), "budgets must be > 0"),
    (with_change("harvest", tokens={"val": 10}), "train/val/test"),
    (with_change("train", lr=0.0), "train.lr"),
    (with_change("train", tokens=100, batch_size=512), "smaller than one batch"),
    (with_change("train", warmup_frac=0.7, decay_frac=0.7), "warmup_frac"),
    (with_change("train", aux_coef=-1.0), "aux_coef"),
    (with_change("experiment", seeds=[0, 0]), "unique"),
    (with_change("experiment", k_grid=[0, 8]), "k_grid"),
    (with_change("experiment", beta_grid=[-1.0]), "beta_grid"),
    (with_change("variants", length_multiplier=1.0), "length_multiplier"),
    ({**smoke_raw(), "model": {"name": "tiny", "layers": 3}}, "unknown key"),
    (with_change("experiment", arms=["topk", "jumprelu"]), "registered arms"),
    (with_change("experiment", arms=["topk"]), "two or more"),
    (with_change("steering", alphas=[]), "steering.alphas"),
    (with_change("eval", batch_contexts=0), "eval.batch_contexts"),
    (with_change("eval", gradient_splices="some"), "eval.gradient_splices"),
    (with_change("steering", k_values=[0]), "steering.k_values"),
    (with_change("probing", max_tags=0), "probing.min_tag_count and max_tags"),
    (with_change("selection", lr_multipliers=[0.0]), "selection.lr_multipliers"),
    (with_change("variants", seeds=[1, 1]), "variants.seeds"),
    (with_change("variants", length_seeds=[1, 1]), "variants.length_seeds must be unique"),
    ({**smoke_raw(), "steerig": {"n_latents": 3}}, r"unknown section\(s\) \['steerig'\]"),
]


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_a_misspelled_key_in_any_section_names_the_key_and_the_allowed_ones(section):
    raw = smoke_raw()
    raw[section] = {**(raw.get(section) or {}), "n_latentz": 1}
    with pytest.raises(ConfigError, match=rf"unknown key\(s\) \['n_latentz'\] in section '{section}'; allowed: \["):
        profile_from_dict("bad", raw)


def test_section_defaults_live_in_one_place_and_the_profiles_set_every_stage_section():
    """A section missing from a profile takes its dataclass defaults; the shipped profiles spell out theirs,
    so no stage silently runs on a default the profile did not state."""
    p = profile_from_dict("minimal", {})
    assert p.steering == SECTIONS["steering"]()
    for name in ("smoke", "default", "paper"):
        raw = yaml.safe_load((ROOT / "profiles" / f"{name}.yaml").read_text())
        assert {"eval", "steering", "probing", "selection", "variants"} <= set(raw), name


@pytest.mark.parametrize("raw,msg", BAD, ids=[m for _, m in BAD])
def test_bad_profile_values_are_refused_with_a_clear_message(raw, msg):
    with pytest.raises(ConfigError, match=msg):
        profile_from_dict("bad", raw)


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"known profiles: \['default', 'paper', 'smoke'\]"):
        load_profile("nonexistent")


def test_the_shipped_profiles_are_valid():
    for name in ("smoke", "default", "paper"):
        p = load_profile(name)
        assert p.model.hook_name.startswith("blocks.")
        assert p.harvest.tokens["train"] % rows_per_context(p) == 0, name  # whole contexts


def test_paper_profile_fails_fast_offline_but_dry_run_validates(monkeypatch):
    from test_projection import COSTS

    from gsae import projection

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(projection, "measure_costs", lambda p, device: COSTS)  # measured for real in test_projection
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda _: type("U", (), {"free": 10**12})())
    p = load_profile("paper")
    with pytest.raises(ConfigError, match="hub"):
        pipeline.check(p)
    notes = pipeline.check(p, dry_run=True)
    assert any("configuration valid" in n for n in notes)


def test_missing_npm_client_is_explained(monkeypatch):
    monkeypatch.setattr(pipeline.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="npm"):
        pipeline.check(load_profile("smoke"))


def test_not_enough_disk_is_refused_before_writing(monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda _: type("U", (), {"free": 10})())
    with pytest.raises(ConfigError, match="not enough disk"):
        pipeline.check(load_profile("smoke"))


def test_cli_check_exits_2_with_the_message_and_writes_nothing(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    before = set((ROOT / "runs").glob("paper*")) if (ROOT / "runs").exists() else set()
    out = subprocess.run([sys.executable, "-m", "gsae.pipeline", "check", "--profile", "paper"], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "hub" in out.stderr
    assert not (ROOT / "runs" / "paper").exists() or set((ROOT / "runs").glob("paper*")) == before
    out = subprocess.run([sys.executable, "-m", "gsae.pipeline", "check", "--profile", "nonexistent"], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "unknown profile" in out.stderr
