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
        return {s.name: {mode: {"delta_ce": math.log2(s.train.lr / best[s.arm]) ** 2 + 1 + 0.01 * s.seed}
                         for mode in ("plain", "g")} for s in specs}

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


def beta_training(monkeypatch, g_best: float, plain_best: float = 0.1):
    """Validation delta_ce of a trial = (log2(lr / 4e-3))^2 + 1 + (log3(beta / best))^2, with best = ``g_best`` for
    the g-encode and ``plain_best`` for the plain-encode; records what was trained."""
    trained = []

    def score(p, lm, specs, progress):
        trained.extend(specs)
        lr_term = {s.name: math.log2(s.train.lr / 4e-3) ** 2 + 1 for s in specs}
        return {s.name: {mode: {"delta_ce": lr_term[s.name] + math.log(s.sae.beta / best, 3) ** 2,
                                "selection_changed_share": 0.1 * s.sae.beta}
                         for mode, best in (("plain", plain_best), ("g", g_best))} for s in specs}

    monkeypatch.setattr(sel, "_score", score)
    monkeypatch.setattr(sel, "reader", lambda p, split, mh: SimpleNamespace(
        d=16, manifest={"grad_stats": {"grad_scale": 1.0}}))
    return trained


V5_SELECTION = {"lr": {"topk": 4e-3, "gsae": 4e-3}, "lr_trials": {"topk": {}, "gsae": {}},
                "extensions": {"topk": 0, "gsae": 0}, "at_edge": {"topk": False, "gsae": False}, "grad_scale": 1.0}


def test_beta_is_chosen_by_the_registered_encoder_at_each_betas_own_lr(monkeypatch):
    trained = beta_training(monkeypatch, g_best=1.0)
    out = sel.select_beta(default_profile(), SimpleNamespace(info={"model_hash": "x"}), V5_SELECTION, progress=False)
    rec = out["arms"]["gsae"]
    assert rec["beta"] == 1.0 and rec["lr"] == pytest.approx(4e-3) and not rec["at_edge"] and rec["extensions"] == 0
    assert [b["beta"] for b in rec["betas"]] == [0.1, 0.3, 1.0, 3.0]
    assert rec["betas"][2]["score"] == pytest.approx(1.0)  # lr term 1 at 4e-3, beta term 0 at the g-encode's best
    # the first beta reuses selection.json's lr (its trials at that lr only); every other beta gets TopK's lr trials
    per_beta = Counter(s.sae.beta for s in trained)
    assert per_beta[0.1] == 2 and per_beta[0.3] == per_beta[1.0] == per_beta[3.0] == 8
    assert all(s.arm == "gsae" and s.group == "selection" and s.seed in (100, 101) for s in trained)
    assert {s.name for s in trained if s.sae.beta == 3.0 and s.train.lr == 4e-3} == {
        "selection/gsae-k32-s100-lr0.004-beta3", "selection/gsae-k32-s101-lr0.004-beta3"}


def test_a_chosen_beta_on_the_edge_extends_the_grid_by_its_own_ratio(monkeypatch):
    beta_training(monkeypatch, g_best=9.0)
    out = sel.select_beta(default_profile(), SimpleNamespace(info={"model_hash": "x"}), V5_SELECTION, progress=False)
    rec = out["arms"]["gsae"]
    assert rec["beta"] == pytest.approx(9.0) and rec["extensions"] == 2 and not rec["at_edge"]  # 27 shows 9 is inside
    beta_training(monkeypatch, g_best=100.0)  # two extensions (selection.max_extensions) and still on the edge
    rec = sel.select_beta(default_profile(), SimpleNamespace(info={"model_hash": "x"}), V5_SELECTION, False)["arms"]
    assert rec["gsae"]["beta"] == pytest.approx(27.0) and rec["gsae"]["extensions"] == 2 and rec["gsae"]["at_edge"]


def test_the_v6_grid_is_eight_paired_seeds_at_the_chosen_beta_and_four_at_every_other():
    """The default profile under PREREG v6: TopK and the chosen beta at seeds 0-7 (group primary), each other beta of
    the dose grid at seeds 0-3 (group beta_<b>) at its own lr; no curve over k, no robustness variants."""
    p = default_profile()
    specs = experiment_specs(p, 576, 1.0, {"gsae": {"beta": 1.0}}, {"topk": 4e-3, "gsae": 8e-3})
    specs += sel.dose_specs(p, "gsae", 576, 1.0, {0.1: 4e-3, 0.3: 2e-3, 3.0: 4e-3})
    count = Counter((s.group, s.arm) for s in specs)
    assert count == {("primary", "topk"): 8, ("primary", "gsae"): 8, ("beta_0.1", "gsae"): 4,
                     ("beta_0.3", "gsae"): 4, ("beta_3", "gsae"): 4}
    assert {s.sae.beta for s in specs if s.group == "primary" and s.arm == "gsae"} == {1.0}
    assert {(s.sae.beta, s.train.lr) for s in specs if s.group == "beta_0.3"} == {(0.3, 2e-3)}
    assert {s.seed for s in specs if s.group.startswith("beta_")} == {0, 1, 2, 3} and {s.k for s in specs} == {32}
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


def test_no_beta_selection_keeps_the_first_beta_and_trains_every_beta_at_the_arms_lr(monkeypatch):
    trained = beta_training(monkeypatch, g_best=3.0)
    raw = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    raw["experiment"] = {**raw["experiment"], "beta_grid": [0.1, 1.0], "beta_select_encode": "none"}
    rec = sel.select_beta(profile_from_dict("x", raw), SimpleNamespace(info={"model_hash": "x"}), V5_SELECTION,
                          progress=False)["arms"]["gsae"]
    assert not trained and rec["beta"] == 0.1 and [(b["beta"], b["lr"]) for b in rec["betas"]] == [(0.1, 4e-3),
                                                                                                (1.0, 4e-3)]
