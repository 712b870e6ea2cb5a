"""Bad input is refused early with a message that says what to change, and leaves nothing behind."""

import os
import re
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gsae import config, pipeline, specs
from gsae.config import SECTIONS, ConfigError, config_hash, load_profile, profile_from_dict
from gsae.stages.contexts import rows_per_context

ROOT = Path(__file__).resolve().parent.parent


def smoke_raw() -> dict:
    return yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())


def with_change(section: str, **kw) -> dict:
    raw = smoke_raw()
    raw[section] = {**raw.get(section, {}), **kw}
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
    known = sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml"))
    assert {"default", "smoke", "paper", "robustness"} <= set(known)
    with pytest.raises(ConfigError, match=re.escape(f"known profiles: {known}")):
        load_profile("nonexistent")


def test_the_shipped_profiles_are_valid():
    for name in ("smoke", "default", "paper"):
        p = load_profile(name)
        assert p.model.hook_name.startswith("blocks.")
        assert p.harvest.tokens["train"] % rows_per_context(p) == 0, name  # whole contexts


def test_paper_profile_fails_fast_offline_but_dry_run_validates(monkeypatch):
    from test_projection import COSTS

    from gsae.tools import projection

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


# ------------------------------------------------------------------------------------------ value types, YAML syntax
def write_profile(tmp_path, section: str, **kw) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(with_change(section, **kw)))
    return path


TYPE_ERRORS = [  # (section, key, YAML value, message after "<file>: ")
    ("train", "lr", "0.00l", "section 'train', key 'lr': expected a float, got the string '0.00l'"),
    ("train", "lr", "1e-3", "section 'train', key 'lr': expected a float, got the string '1e-3' (YAML reads a "
                            "number without a decimal point in its mantissa, such as 1e-3, as a string: write 1.0e-3)"),
    ("train", "tokens", 1.5, "section 'train', key 'tokens': expected an integer, got the float 1.5"),
    ("train", "seed", True, "section 'train', key 'seed': expected an integer, got the boolean true"),
    ("model", "name", 3, "section 'model', key 'name': expected a string, got the integer 3"),
    ("runtime", "tf32", "yes", "section 'runtime', key 'tf32': expected true or false, got the string 'yes'"),
    ("experiment", "k_grid", 8, "section 'experiment', key 'k_grid': expected a list of integers, got the integer 8"),
    ("experiment", "k_grid", [8, "16"], "section 'experiment', key 'k_grid': expected a list of integers, got the "
                                        "list [8, '16'] (item 2 is the string '16')"),
    ("data", "split_fracs", [0.5, 0.5], "section 'data', key 'split_fracs': expected a list of 3 floats, got the "
                                        "list [0.5, 0.5] (2 items, not 3)"),
    ("harvest", "tokens", {"train": "many"}, "section 'harvest', key 'tokens': expected a mapping of strings to "
                                             "integers, got the mapping {'train': 'many'} (key 'train' maps to the "
                                             "string 'many')"),
    ("eval", "massive", None, "section 'eval', key 'massive': expected a string, got null"),
]


@pytest.mark.parametrize("section,key,value,msg", TYPE_ERRORS, ids=[f"{s}.{k}={v!r}" for s, k, v, _ in TYPE_ERRORS])
def test_a_value_of_the_wrong_type_names_file_section_key_expected_type_and_value(tmp_path, section, key, value, msg):
    path = write_profile(tmp_path, section, **{key: value})
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    assert str(err.value) == f"{path}: {msg}"


def test_inside_the_repository_the_file_is_named_from_the_root():
    assert config.shown_path(config.PROFILES_DIR / "x.yaml") == "profiles/x.yaml"


def test_ints_are_floats_lists_are_tuples_and_the_hash_is_unchanged(tmp_path):
    """An integer is a valid float and is kept as written (so config_hash, which keys every cache, is what it was
    before types were checked); a YAML list becomes the tuple the field holds."""
    p = load_profile(write_profile(tmp_path, "train", lr=1, max_norm_factor=10))
    assert p.train.lr == 1 and type(p.train.lr) is int and type(p.train.max_norm_factor) is int
    assert type(p.experiment.k_grid) is tuple and type(p.data.split_fracs) is tuple
    for name in ("smoke", "default", "paper"):  # against the sections built as before: lists -> tuples, nothing else
        raw = yaml.safe_load((ROOT / "profiles" / f"{name}.yaml").read_text())
        p = load_profile(name)
        for section, cls in SECTIONS.items():
            before = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in (raw.get(section) or {}).items()})
            assert config_hash(getattr(p, section)) == config_hash(before), (name, section)


def test_optional_and_union_annotations_are_checked_too():
    @dataclass(frozen=True)
    class Section:
        a: int | None = None
        b: typing.Optional[float] = None  # noqa: UP045 (the spelling under test)
        c: tuple[int, str] = (0, "")
        d: typing.Any = None

    assert config._build(Section, "s", {"a": None, "b": 2, "c": [1, "x"], "d": object}) == \
        Section(None, 2, (1, "x"), object)
    with pytest.raises(ConfigError, match=r"^section 's', key 'a': expected an integer or null, got the string 'x'$"):
        config._build(Section, "s", {"a": "x"})
    with pytest.raises(ConfigError, match=r"key 'c': expected a list of 2 items: an integer, a string, got the list "
                                          r"\[1, 2\] \(item 2 is the integer 2\)"):
        config._build(Section, "s", {"c": [1, 2]})


YAML_ERRORS = [  # (text, line, column, problem): line and column of the offending character, counted by hand
    ("model:\n  name: tiny\n   layer: 1\n", 3, 9, "mapping values are not allowed here"),
    ("train:\n  lr: 0.001\n  tokens: [1, 2\n", 4, 1, "expected ',' or ']', but got '<stream end>' (while parsing a "
                                                   "flow sequence)"),
    ("a: 'open\n", 2, 1, "found unexpected end of stream (while scanning a quoted scalar)"),
]


@pytest.mark.parametrize("text,line,column,problem", YAML_ERRORS)
def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, text, line, column, problem):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    assert str(err.value) == f"{path}:{line}:{column}: invalid YAML: {problem}"


def test_the_cli_prints_a_config_error_as_one_line(tmp_path):
    bad = write_profile(tmp_path, "train", lr="0.00l")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  name: tiny\n   layer: 1\n")
    for path, msg in ((bad, f"{bad}: section 'train', key 'lr': expected a float, got the string '0.00l'"),
                      (broken, f"{broken}:3:9: invalid YAML: mapping values are not allowed here")):
        out = subprocess.run([sys.executable, "-m", "gsae.pipeline", "check", "--profile", str(path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 2 and out.stderr == f"error: {msg}\n"


# ------------------------------------------------------------------------------------------ arms: gsae.specs
def test_config_never_imports_the_arms_and_the_arm_checks_live_in_specs(tmp_path):
    code = "import sys; from gsae.config import load_profile; load_profile('default'); " \
           "print(sorted(m for m in sys.modules if m.startswith('gsae.arms')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    raw = with_change("experiment", arms=["topk", "jumprelu"])
    p = profile_from_dict("x", raw)  # a well-formed profile; only the registry knows "jumprelu"
    with pytest.raises(ConfigError, match=r"experiment.arms names \['jumprelu'\], which are not registered arms; "
                                          r"registered arms: \[.*'gsae'.*'topk'"):
        specs.check_profile(p)
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"^{path}: experiment.arms names \['jumprelu'\]"):
        specs.load_checked_profile(path)
    free = with_change("experiment", arms=["topk", "gsae_free"])
    free["harvest"]["label_free_splits"] = ["val", "test"]
    with pytest.raises(ConfigError, match="set harvest.label_free_splits to \\[train, val, test\\]"):
        specs.check_profile(profile_from_dict("x", free))
    free["harvest"]["label_free_splits"] = ["train", "val", "test"]
    assert specs.check_profile(profile_from_dict("x", free)).experiment.arms == ("topk", "gsae_free")
    for name in ("smoke", "default", "paper"):
        assert specs.load_checked_profile(name) == load_profile(name)
