"""The probing baselines: the raw-residual features give the AUCs of +x_j and -x_j (checked against scipy's
Mann-Whitney U), and the probing figure draws the baselines and the paired difference it is given."""

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from gsae import probing
from gsae.analysis import figures as gf
from gsae.stages.probe import residual_features

matplotlib.use("Agg")


def test_residual_features_give_the_auc_of_both_signs_of_each_dimension():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=gen)
    labels = torch.randint(0, 3, (300,), generator=gen)
    x[labels == 1, 2] -= 1.5  # class 1 sits LOW on dimension 2: only the -x_2 feature can see it
    x[labels == 2, 0] += 1.0  # class 2 sits high on dimension 0
    feats = residual_features(x)
    assert feats.shape == (300, 8) and float(feats.min()) == 0.0
    r = probing.best_latent_auc(feats, labels, [1, 2])
    for ci, c in enumerate((1, 2)):
        for j in range(4):
            for sign, col in ((1, j), (-1, 4 + j)):
                u = sps.mannwhitneyu(sign * x[labels == c, j].numpy(), sign * x[labels != c, j].numpy()).statistic
                expected = u / ((labels == c).sum().item() * (labels != c).sum().item())
                assert float(r.all_auc[ci, col]) == pytest.approx(expected, abs=1e-12)
    assert int(r.best_latent[0]) == 4 + 2 and int(r.best_latent[1]) == 0


def test_probing_figure_draws_baselines_and_the_paired_difference_with_its_margin():
    rows, frame = [], []
    for k in (8, 32):
        for s in range(3):
            for arm, mode, v in (("topk", "plain", 0.80 + 0.01 * s), ("gsae", "plain", 0.79 + 0.02 * s),
                                 ("gsae", "g", 0.75)):
                rows.append({"variant": "primary", "arm": arm, "encode_mode": mode, "k": k, "seed": s,
                             "metrics": {"probe_auc_pos_heldout": v}})
    for r in rows:
        frame.append({"arm": r["arm"], "k": r["k"], "seed": r["seed"], "metric": "probe_auc_pos_heldout",
                      "value": r["metrics"]["probe_auc_pos_heldout"]})
    base = {"residual": {"probe_auc_pos_heldout": 0.7}, "random_init": {"8": {"probe_auc_pos_heldout": 0.6},
                                                                        "32": {"probe_auc_pos_heldout": 0.65}}}
    fig = gf.plot_probing(gf.metrics_frame(rows), rows, base, margin=0.02)
    values, diff = fig.axes
    assert any(list(line.get_ydata()) == [0.7, 0.7] for line in values.lines)
    assert any(list(line.get_ydata()) == [0.6, 0.65] for line in values.lines)
    assert any(list(line.get_ydata()) == [-0.02, -0.02] for line in diff.lines)
    means = [line for line in diff.lines if line.get_marker() == "o" and len(line.get_xdata()) == 2]
    # g-SAE plain minus TopK, seed by seed: -0.01, 0.0, +0.01 -> mean 0 at both k.
    assert np.allclose(means[-1].get_ydata(), [0.0, 0.0], atol=1e-12)
    assert "ROC AUC" in diff.get_ylabel() and pd.notna(values.get_ylabel())
