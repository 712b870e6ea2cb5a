"""The selection protocol and the grid, with the training replaced by a known score function."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pytest
import yaml

import gsae.stages.selection as sel
from gsae.config import ConfigError, profile_from_dict
from gsae.paths import ROOT
from gsae.specs import check_profile, experiment_specs


def default_profile(**selection):
    raw = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    raw["selection"] = {**raw["selection"], **selection}
    return profile_from_dict("default", raw)


@pytest.fixture()
def fake_training(monkeypatch):
    """Validation delta_ce = (log2(lr / best_lr))^2 + 1 per arm (+ a per-seed offset); records what was trained."""
    best = {"topk": 4e-3, "gsae": 3.2e-2}
    trained = []

    def score(p, lm, specs, progress):
        trained.extend(specs)
        return {s.name: {"delta_ce": math.log2(s.train.lr / best[s.arm]) ** 2 + 1 + 0.01 * s.seed} for s in specs}

    monkeypatch.setattr(sel, "_score", score)
    monkeypatch.setattr(sel, "reader", lambda p, split, mh: SimpleNamespace(
        d=16, manifest={"grad_stats": {"grad_scale": 1.0}}))
    return trained


def test_every_arm_gets_the_same_trials_and_an_edge_optimum_is_extended(fake_training):
    p = default_profile()
    out = sel.select_per_arm(p, SimpleNamespace(info={"model_hash": "x"}), progress=False)
    assert out["lr"]["topk"] == pytest.approx(4e-3) and not out["at_edge"]["topk"] and out["extensions"]["topk"] == 0
    # the g-SAE's optimum (3.2e-2) lies two grid steps above 8e-3: two extensions reach it, and it is then an edge
    assert out["lr"]["gsae"] == pytest.approx(3.2e-2) and out["extensions"]["gsae"] == 2 and out["at_edge"]["gsae"]
    per_arm = Counter((s.arm, s.seed) for s in fake_training)
    assert per_arm[("topk", 100)] == per_arm[("topk", 101)] == 4 and per_arm[("gsae", 100)] == 6
    assert all(s.sae.beta == (0.1 if s.arm == "gsae" else 0.0) for s in fake_training)  # beta fixed, not tuned
    assert {s.seed for s in fake_training} == {100, 101} and all(s.k == 32 for s in fake_training)


def test_no_extension_budget_reports_the_edge(fake_training):
    lm = SimpleNamespace(info={"model_hash": "x"})
    out = sel.select_per_arm(default_profile(max_extensions=0), lm, progress=False)
    assert out["lr"]["gsae"] == pytest.approx(8e-3) and out["at_edge"]["gsae"] and out["extensions"]["gsae"] == 0


def test_the_v5_grid_has_sixteen_primary_seeds_three_curve_seeds_the_thread_rerun_and_the_length_check():
    """The default profile under PREREG v5: 16 primary seeds per arm at k = 32, 3 at the other k, 4 one-thread
    reruns per arm (v2's cut, DEVIATIONS.md 2026-12-02 14:20) and the length check on seeds 0-7 per arm (v5; v3 and
    v4 ran it on all 16)."""
    p = default_profile()
    specs = experiment_specs(p, 576, 1.0, {"gsae": {"beta": 0.1}}, {"topk": 4e-3, "gsae": 8e-3})
    count = Counter((s.group, s.k) for s in specs)
    assert count == {("primary", 32): 32, ("primary", 8): 6, ("primary", 16): 6, ("primary", 64): 6,
                     ("threads_1", 32): 8, ("length_2", 32): 16}
    assert all(s.train.threads == 1 for s in specs if s.group == "threads_1")
    assert {s.train.lr for s in specs if s.arm == "gsae"} == {8e-3}
    assert all(s.train.max_norm_factor == 10 for s in specs)


def test_selection_seeds_must_not_be_experiment_seeds():
    raw = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    raw["selection"]["seeds"] = [1, 100]
    with pytest.raises(ConfigError, match=r"selection.seeds \[1\]"):
        profile_from_dict("bad", raw)


def test_relative_change_reads_the_doubled_length():
    curve = {"1000": {"delta_ce": 0.5}, "2000": {"delta_ce": 0.49}}
    assert sel.relative_change(curve, 1000) == pytest.approx(-0.02)
    assert sel.relative_change(curve, 2000) is None
    # lengths are whole batches: 363 x 1,024 = 371,712 is "the primary length" of 372,000 tokens
    real = {"186368": {"delta_ce": 0.3}, "371712": {"delta_ce": 0.25}, "744448": {"delta_ce": 0.2}}
    assert sel.relative_change(real, 372_000) == pytest.approx(-0.2)


def test_the_label_free_arm_trains_and_encodes_with_g_free_and_needs_it_harvested_everywhere():
    raw = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    raw["experiment"]["arms"] = ["topk", "gsae_free"]
    with pytest.raises(ConfigError, match=r"label_free_splits"):
        check_profile(profile_from_dict("bad", raw))
    raw["harvest"]["label_free_splits"] = ["train", "val", "test"]
    p = profile_from_dict("free", raw)
    specs = experiment_specs(p, 576, 1.0, {"gsae_free": {"beta": 0.1}}, 4e-3)
    free = [s for s in specs if s.arm == "gsae_free"]
    assert free and all(s.primary_encode == "g_free" and s.arm_impl.gradient == "g_free" for s in free)
    assert all(s.primary_encode == "plain" for s in specs if s.arm == "topk")


def test_a_stored_selection_from_another_protocol_or_setting_is_refused(tmp_path):
    """A checkout's committed results/<profile>/selection.json from an earlier study design must never be reused
    as this profile's selection (it would train every SAE at the old study's hyperparameters)."""
    import json

    from gsae.config import ConfigError, load_profile
    from gsae.stages.selection import check_selection

    p = load_profile("default")
    mine = json.loads(json.dumps(p.to_dict(), default=str))
    ok = {"protocol": "per_arm", "lr": {"topk": 0.002}, "provenance": {"profile": mine}}
    assert check_selection(p, ok, tmp_path / "selection.json") is ok
    v1 = {"lr": 0.004, "beta": 0.1, "provenance": {"profile": {**mine, "selection": {"protocol": "v1"}}}}
    with pytest.raises(ConfigError, match="another selection protocol.*move the old results"):
        check_selection(p, v1, tmp_path / "selection.json")
    # the committed record was made when the profile still named its protocol: it is this profile's selection
    committed = ROOT / "results" / "default" / "selection.json"
    assert check_selection(p, json.loads(committed.read_text()), committed)["lr"] == {"topk": 0.004, "gsae": 0.004}
    other = {**ok, "provenance": {"profile": {**mine, "selection": {**mine["selection"], "seeds": [7, 8]}}}}
    with pytest.raises(ConfigError, match="other selection settings"):
        check_selection(p, other, tmp_path / "selection.json")


def test_step_changes_between_consecutive_recorded_lengths_by_hand():
    curve = {"4000": {"delta_ce": 0.3}, "1000": {"delta_ce": 0.5}, "2000": {"delta_ce": 0.4}}  # keys out of order
    steps = sel.step_changes(curve)
    assert [(a, b) for a, b, _ in steps] == [(1000, 2000), (2000, 4000)]
    assert [ch for _, _, ch in steps] == pytest.approx([-0.2, -0.25])
    assert sel.step_changes({"1000": {"delta_ce": 0.5}}) == []


def test_the_sampled_label_free_gradient_is_refused_as_a_pipeline_setting():
    raw = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    raw["harvest"]["label_free"] = "sampled"
    with pytest.raises(ConfigError, match="label_free: sampled is not a pipeline setting"):
        check_profile(profile_from_dict("sampled", raw))
    check_profile(profile_from_dict("argmax", {**raw, "harvest": {**raw["harvest"], "label_free": "argmax"}}))
