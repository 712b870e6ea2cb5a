"""The sampled label-free gradient (``HarvestConfig.label_free="sampled"``): the estimator is the mean of per-sample
summed-CE gradients against labels drawn from the model's own distribution, seeded per batch, with its own dataset
constant and the cosine with g in the manifest; the default (argmax) harvest keeps its bits and cache keys."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from test_harvest import CTX, HOOK, random_tokens, tiny_model

import gsae.harvest as H
from gsae.config import ConfigError, HarvestConfig, config_hash, load_profile
from gsae.io import read_json
from gsae.reader import gradient_scale

SAMPLED = HarvestConfig(batch_contexts=3, shard_tokens=32, label_free="sampled", label_free_samples=3,
                        label_free_seed=5)


@pytest.fixture(scope="module")
def model64():
    return tiny_model(torch.float64)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _logits_with_delta(model, tokens, delta=None):
    hooks = [] if delta is None else [(HOOK, lambda act, hook: act + delta)]
    with model.hooks(fwd_hooks=hooks):
        return model(tokens, return_type="logits")


def test_the_estimator_is_the_mean_of_per_sample_gradients(model64):
    """g_free equals the mean over S explicitly drawn label tensors of d(summed CE against them)/dx (autograd,
    one backward per draw), and a central finite difference of that mean loss with the labels held fixed."""
    tokens = random_tokens(2, 12)
    cap = H.capture_label_free(model64, tokens, HOOK, SAMPLED, first_context=7)
    assert torch.equal(cap.g, H.capture(model64, tokens, HOOK).g)  # g itself is untouched
    with torch.no_grad():
        labels = H.sampled_next_tokens(_logits_with_delta(model64, tokens), 3, H.batch_generator(5, 7))
    assert labels.shape == (2, 11, 3)
    x = cap.x.clone().requires_grad_(True)
    per_sample = []
    with torch.enable_grad():
        logits = _logits_with_delta(model64, tokens, x - cap.x)  # the forward as a function of x at the hook
        for s in range(3):
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[..., s].reshape(-1),
                                 reduction="sum")
            per_sample.append(torch.autograd.grad(ce, x, retain_graph=True)[0])
    torch.testing.assert_close(cap.g_free, torch.stack(per_sample).mean(0), rtol=1e-10, atol=1e-13)

    def mean_loss(delta):
        with torch.no_grad():
            lg = _logits_with_delta(model64, tokens, delta)
        return float(sum(F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), labels[..., s].reshape(-1),
                                         reduction="sum") for s in range(3)) / 3)

    h = 1e-5
    for b, t, i in ((0, 0, 3), (0, 5, 17), (1, 9, 30)):
        delta = torch.zeros_like(cap.x)
        delta[b, t, i] = h
        fd = (mean_loss(delta) - mean_loss(-delta)) / (2 * h)
        assert abs(fd - float(cap.g_free[b, t, i])) <= 1e-5 * abs(fd) + 1e-12
    assert float(cap.g_free[:, -1].abs().max()) == 0.0  # the last position predicts nothing


def test_the_draws_follow_the_predictive_distribution_and_are_seeded():
    logits = torch.tensor([[[2.0, 0.0, -1e9, 1.0, -1.0]] * 2])  # [1, 2, 5]: position 1 predicts nothing
    draws = H.sampled_next_tokens(logits, 40000, H.batch_generator(0, 0))
    assert draws.shape == (1, 1, 40000)
    freq = torch.bincount(draws.reshape(-1), minlength=5).double() / 40000
    assert freq[2] == 0  # a token of probability 0 is never drawn
    torch.testing.assert_close(freq, F.softmax(logits[0, 0].double(), -1), atol=0.01, rtol=0)
    again = H.sampled_next_tokens(logits, 40000, H.batch_generator(0, 0))
    assert torch.equal(draws, again)
    assert not torch.equal(draws, H.sampled_next_tokens(logits, 40000, H.batch_generator(0, 3)))
    assert not torch.equal(draws, H.sampled_next_tokens(logits, 40000, H.batch_generator(1, 0)))


def test_sampled_harvest_is_bit_identical_when_rerun_and_records_its_scale_and_cosine(model, tmp_path):
    a = H.harvest(model, CTX, HOOK, tmp_path / "a", n_tokens=60, cfg=SAMPLED, progress=False, label_free=True)
    b = H.harvest(model, CTX, HOOK, tmp_path / "b", n_tokens=60, cfg=SAMPLED, progress=False, label_free=True)
    assert a["files"] == b["files"]  # same sha256 for every shard
    other = H.harvest(model, CTX, HOOK, tmp_path / "c", n_tokens=60, progress=False, label_free=True,
                      cfg=dataclasses.replace(SAMPLED, label_free_seed=6))
    assert other["plan_hash"] != a["plan_hash"] and a["meta"]["label_free_estimator"] == "sampled"
    rows, rows_c = H.ActivationReader(tmp_path / "a").load_all(), H.ActivationReader(tmp_path / "c").load_all()
    assert torch.equal(rows.g, rows_c.g) and not torch.equal(rows.g_free, rows_c.g_free)
    # Each batch's draws depend on its first context only: the rows equal one capture of that batch (shard 1's
    # first batch: contexts 4-6, rows 32-55, with 4 contexts per shard and 3 per batch).
    cap = H.capture_label_free(model, CTX[4:7], HOOK, SAMPLED, first_context=4)
    torch.testing.assert_close(rows.g_free[32:56], cap.g_free[:, 1:-1].reshape(-1, 32), rtol=1e-5, atol=1e-7)
    stats = a["grad_stats"]
    mean_sq = rows.g_free.double().pow(2).sum(1).mean().item()
    assert stats["mean_sq_norm_g_free"] == pytest.approx(mean_sq, rel=1e-9)
    assert stats["grad_scale_free"] == pytest.approx(math.sqrt(32 / mean_sq), rel=1e-9)
    assert gradient_scale(a, "g_free") == stats["grad_scale_free"] != gradient_scale(a, "g") == stats["grad_scale"]
    cos = F.cosine_similarity(rows.g_free.double(), rows.g.double(), dim=-1)
    summary = a["label_free_cosine"]
    assert summary["n_rows"] == 60 and summary["mean"] == pytest.approx(float(cos.mean()), abs=1e-12)
    # the histogram median lies in the bin of the 30th of the 60 sorted cosines (bin width = 2 x resolution)
    assert abs(summary["median"] - float(cos.sort().values[29])) <= 2 * summary["median_resolution"] + 1e-12


def test_argmax_default_keeps_its_bits_cache_keys_and_scale(model, tmp_path):
    """The default estimator: g_free is ``capture(label_free=True)``'s, the plan hash and config_hash do not see the
    new settings, and g_free keeps the true-label constant (no grad_scale_free)."""
    cfg = HarvestConfig(batch_contexts=3, shard_tokens=32)
    assert cfg.label_free == "argmax"
    cap_new = H.capture_label_free(model, CTX[:3], HOOK, cfg, first_context=0)
    cap_old = H.capture(model, CTX[:3], HOOK, label_free=True)
    assert torch.equal(cap_new.g_free, cap_old.g_free) and torch.equal(cap_new.g, cap_old.g)
    m = H.harvest(model, CTX, HOOK, tmp_path, n_tokens=40, cfg=cfg, progress=False, label_free=True)
    assert m["meta"] == {"label_free_gradient": True}
    assert "grad_scale_free" not in m["grad_stats"] and "mean_sq_norm_g_free" in m["grad_stats"]
    assert gradient_scale(m, "g_free") == m["grad_stats"]["grad_scale"]
    assert -1 <= m["label_free_cosine"]["median"] <= 1
    assert "cos_free_hist" in read_json(tmp_path / "shard_00000.json")
    for name in ("default", "smoke"):
        p = load_profile(name)
        assert config_hash(p.harvest) == config_hash(dataclasses.replace(p.harvest, label_free="argmax",
                                                                         label_free_samples=4, label_free_seed=0))
        assert config_hash(p.harvest) != config_hash(dataclasses.replace(p.harvest, label_free="sampled"))
    with pytest.raises(ConfigError, match="label_free"):
        HarvestConfig(label_free="entropy")
    with pytest.raises(ConfigError, match="label_free_samples"):
        HarvestConfig(label_free_samples=0)


def test_cosine_summary_median_from_the_histogram():
    g = torch.randn(501, 8, generator=torch.Generator().manual_seed(0))
    f = g + 1.5 * torch.randn(501, 8, generator=torch.Generator().manual_seed(1))
    cos = F.cosine_similarity(f.double(), g.double(), dim=-1)
    recs = [H.cosine_stats(g[:200], f[:200]), H.cosine_stats(g[200:], f[200:])]
    out = H.cosine_summary(recs)
    assert out["n_rows"] == 501 and out["mean"] == pytest.approx(float(cos.mean()), abs=1e-12)
    assert abs(out["median"] - float(cos.median())) <= out["median_resolution"] * 2
    assert H.cosine_summary([recs[0], {"n_rows": 3}]) is None
