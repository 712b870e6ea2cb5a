"""The v2 selection and convergence figures draw exactly the recorded numbers."""

import numpy as np

from gsae import figures


def test_selection_and_convergence_figures_plot_the_recorded_trials():
    sel = {"protocol": "per_arm", "k": 32, "seeds": [100, 101], "lr": {"topk": 0.004, "gsae": 0.008},
           "lr_trials": {"topk": {"0.002": 0.5, "0.004": 0.4, "0.008": 0.45},
                         "gsae": {"0.004": 0.42, "0.008": 0.38, "0.016": 0.41}}}
    fig = figures.plot_selection(sel, None, "topk", "gsae")
    lines = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == 3]
    assert [list(ln.get_ydata()) for ln in lines] == [[0.5, 0.4, 0.45], [0.42, 0.38, 0.41]]
    np.testing.assert_allclose(lines[1].get_xdata(), [0.004, 0.008, 0.016])
    conv = {"primary_tokens": 2000, "curves": {"topk": {"1000": {"delta_ce": 0.6}, "2000": {"delta_ce": 0.5},
                                                        "4000": {"delta_ce": 0.49}}}}
    fig = figures.plot_convergence(conv)
    line = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == 3][0]
    assert list(line.get_xdata()) == [1000, 2000, 4000] and list(line.get_ydata()) == [0.6, 0.5, 0.49]
