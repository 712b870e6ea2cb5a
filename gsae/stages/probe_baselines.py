"""Reference points for C4's probe (notebook 05; not a pipeline stage of its own): the probe stage's held-out
single-feature POS probe applied to features nobody trained as a dictionary, so a trained SAE's AUC can be read
against what any basis of this residual stream gives.

* ``residual``: the d_in raw residual-stream dimensions, each in both signs. The probe scores a feature as
  "fires on the class" and needs features >= 0, so dimension j enters as ``x_j - min_j`` and ``max_j - x_j`` (min
  and max over the split): monotone in ``+x_j`` and ``-x_j``, hence the same AUCs.
* ``random_init``: at each k of the grid, the baseline arm's SAE as training starts it (the arm's own
  initialisation, seed 0) with ``b_dec`` at the train split's mean (training sets it to its first batch's mean),
  coded with the plain encoder.

As in the probe stage, the best feature of each POS class is chosen on the validation split and scored on the
test split (``probe_auc_pos_heldout``); the in-sample AUC (chosen and scored on test, ``probe_auc_pos``) is kept
beside it. Written to ``results/<profile>/probe_baselines.json`` with provenance.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import arms, io, probing
from ..config import Profile
from ..paths import results_dir
from ..runtime import module_device
from ..specs import baseline_arm, sae_config
from .harvest import reader
from .probe import probe_labels, sparse_codes


def residual_features(x: torch.Tensor) -> torch.Tensor:
    """[n, d] activations -> [n, 2 d] non-negative features whose AUCs are those of +x_j (first d) and -x_j."""
    x = x.double()
    return torch.cat([x - x.min(0).values, x.max(0).values - x], dim=1)


def random_init_sae(p: Profile, lm, k: int, seed: int = 0) -> torch.nn.Module:
    """The baseline arm's SAE at initialisation (module docstring), on the LM's device."""
    train = reader(p, "train", lm.info["model_hash"])
    arm = baseline_arm(p)
    own = {hp: grid[0] for hp, grid in arms.get(arm).hyperparameter_grid(p.experiment).items()}
    cfg = sae_config(p, arm, train.d, k, train.manifest["grad_stats"]["grad_scale"], **own)
    sae = arms.get(arm).build(cfg, seed=seed)
    with torch.no_grad():
        sae.init_b_dec(train.statistics().mean)
    return sae.to(module_device(lm.model))


def _pos_scores(val_acts: probing.Acts, test_acts: probing.Acts, val: dict, test: dict) -> dict[str, float]:
    scored = probing.best_latent_auc(test_acts, test["pos"], test["tag_classes"])
    chosen = probing.best_latent_auc(val_acts, val["pos"], val["tag_classes"])
    return {"probe_auc_pos": scored.mean_auc, "probe_auc_pos_heldout": probing.held_out_auc(chosen, scored)}


def run_baselines(p: Profile, lm) -> dict[str, Any]:
    """Both baselines' POS probe AUCs (module docstring); writes and returns probe_baselines.json's content."""
    test, val = probe_labels(p, lm), probe_labels(p, lm, "val")
    if not test["tag_classes"]:
        out: dict[str, Any] = {"not_measured": "the corpus has no POS tags"}
    else:
        mh = lm.info["model_hash"]
        x_val, x_test = (reader(p, split, mh).load_all().x for split in ("val", "test"))
        out = {"residual": _pos_scores(residual_features(x_val), residual_features(x_test), val, test),
               "random_init": {}}
        for k in p.experiment.k_grid:
            sae = random_init_sae(p, lm, k)
            out["random_init"][str(k)] = _pos_scores(sparse_codes(p, lm, sae, "plain", "val"),
                                                     sparse_codes(p, lm, sae, "plain"), val, test)
    out["provenance"] = io.provenance(profile=p.to_dict())
    io.write_json(results_dir(p) / "probe_baselines.json", out)
    return out
