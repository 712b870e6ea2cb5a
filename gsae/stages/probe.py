"""Stage ``probe`` (C4): single-latent sparse probing on POS tags and genres per SAE and encoder, and the latent
browser. Writes ``probe_test-<key>.json`` per SAE (per-class AUCs and, under ``metrics``, their means).

``run_baselines`` gives C4's reference points: the same held-out single-feature POS probe applied to features
nobody trained as a dictionary, so a trained SAE's AUC can be read against what any basis of this residual stream
gives (notebook 05):

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

import sys
from pathlib import Path
from typing import Any

import torch

from .. import arms, io, probing
from ..config import Profile
from ..paths import results_dir
from ..runtime import module_device, to_device
from ..specs import SAESpec, baseline_arm, load_trained, sae_config, sae_dir, source_version, stage_file
from .contexts import contexts
from .harvest import reader


def probe_file(p: Profile) -> str:
    return stage_file(p, "probe", code=source_version(probing, sys.modules[__name__]))


PROBE_BLOCK_ELEMENTS = 1 << 28
"""Rows are encoded in chunks whose dense [rows, d_sae] pre-activations hold at most this many elements (1 GiB in
float32): the whole split at once for the smoke and default profiles, ~10,900 rows at a time at paper width."""


def probe_labels(p: Profile, lm, split: str = "test") -> dict[str, Any]:
    """Per harvested row of ``split``: POS tag and genre labels, and the classes probed (chosen on the test split;
    on another split, those of them with a positive and a negative token there). A corpus without POS tags
    (OpenWebText) or with a single genre gets no classes there; its AUC is then "not measured"."""
    mh = lm.info["model_hash"]
    ctx = contexts(p, lm.tokenizer, mh)[split]
    meta = reader(p, split, mh).meta()
    ci, pos = meta["ctx_index"], meta["pos"]
    pos_labels = ctx.pos_tags[ci, pos]
    genre_labels = ctx.genre_ids[ci]
    if split == "test":
        tag_classes = probing.frequent_classes(pos_labels, p.probing.min_tag_count, p.probing.max_tags)
        genre_classes = probing.frequent_classes(genre_labels, p.probing.min_tag_count, 100)
        genre_classes = genre_classes if len(genre_classes) >= 2 else []
    else:
        test = probe_labels(p, lm, "test")

        def scorable(classes: list[int], labels: torch.Tensor) -> list[int]:  # a positive and a negative token
            lab = labels[labels >= 0]
            return [c for c in classes if 0 < int((lab == c).sum()) < lab.numel()]

        tag_classes = scorable(test["tag_classes"], pos_labels)
        genre_classes = scorable(test["genre_classes"], genre_labels)
    return {"meta": meta, "pos": pos_labels, "genre": genre_labels, "tag_classes": tag_classes,
            "genre_classes": genre_classes, "tag_vocab": ctx.tag_vocab, "genres": ctx.genres}


def sparse_codes(p: Profile, lm, sae, mode: str, split: str = "test") -> tuple[torch.Tensor, torch.Tensor, int]:
    """The SAE's code of every row of ``split`` under encoder ``mode``, ``(top_acts, top_indices, d_sae)`` on the
    CPU, encoded in bounded chunks on the SAE's device (``PROBE_BLOCK_ELEMENTS``)."""
    device = module_device(sae)
    chunk = max(1, PROBE_BLOCK_ELEMENTS // sae.cfg.d_sae)
    acts, idx = [], []
    for rows in reader(p, split, lm.info["model_hash"]).chunks(chunk):
        with torch.no_grad():
            enc = sae.encode(to_device(rows.x, device), to_device(rows.gradient(mode), device))
        acts.append(enc.top_acts.cpu())
        idx.append(enc.top_indices.cpu())
    return torch.cat(acts), torch.cat(idx), sae.cfg.d_sae


NOT_MEASURED = {"probe_auc_pos": "the corpus has no POS tags", "probe_auc_genre": "the corpus has fewer than two "
                "genres with enough test tokens"}


def run_probing(p: Profile, lm, specs: list[SAESpec], progress: bool = True) -> dict[str, Any]:
    """C4 sparse probing per SAE and encode mode, cached per SAE. A probe without classes is recorded under
    ``not_measured`` (with the reason) and leaves its metric out, so the claim reads "not measured"."""
    mh = lm.info["model_hash"]
    name = probe_file(p)
    todo = [s for s in specs if not (sae_dir(p, s, mh) / name).exists()]
    if todo:
        lab, val = probe_labels(p, lm), probe_labels(p, lm, "val")
        probes = {"pos": ("probe_auc_pos", "tag_classes"), "genre": ("probe_auc_genre", "genre_classes")}
        skipped = {metric: NOT_MEASURED[metric] for metric, classes in probes.values() if not lab[classes]}
        for s in todo:
            sae = load_trained(p, s, mh, module_device(lm.model))
            out, metrics = {}, {}
            for mode in ("g", "plain") + (("g_free",) if s.primary_encode == "g_free" else ()):
                out[mode], metrics[mode] = {}, {}
                if len(skipped) == len(probes):
                    continue
                test_acts, val_acts = sparse_codes(p, lm, sae, mode), sparse_codes(p, lm, sae, mode, "val")
                for key, (metric, classes) in probes.items():
                    if not lab[classes]:
                        continue
                    r = probing.best_latent_auc(test_acts, lab[key], lab[classes])
                    out[mode][f"{key}_auc"] = [float(a) for a in r.auc]
                    metrics[mode][metric] = float(r.mean_auc)
                    if val[classes]:  # the best latent chosen on validation, scored on test
                        chosen = probing.best_latent_auc(val_acts, val[key], val[classes])
                        metrics[mode][f"{metric}_heldout"] = probing.held_out_auc(chosen, r)
            io.write_json(sae_dir(p, s, mh) / name, {**out, "metrics": metrics, "not_measured": skipped})
    return {s.name: io.read_json(sae_dir(p, s, mh) / name) for s in specs}


def write_latent_browser(p: Profile, lm, specs: list[SAESpec], n_latents: int = 8) -> Path:
    """Markdown cards of random live latents of each arm (primary, selection k, first seed), coded with the
    encoder each arm is meant for. Codes stay sparse (no [rows, d_sae] matrix)."""
    mh = lm.info["model_hash"]
    k, seed = p.experiment.beta_select_k, p.experiment.seeds[0]
    meta = reader(p, "test", mh).meta()
    tokens = contexts(p, lm.tokenizer, mh)["test"].tokens
    parts = [f"# Latent browser ({p.name} profile, k = {k}, seed {seed})\n\nRandom live latents (seed 0) with their "
             f"top-activating test tokens, marked **[[like this]]**. g-SAE codes use g-encode.\n"]
    for s in specs:
        if s.group != "primary" or s.k != k or s.seed != seed:
            continue
        sae = load_trained(p, s, mh, module_device(lm.model))
        top_acts, top_indices, d_sae = sparse_codes(p, lm, sae, s.primary_encode)
        live = torch.bincount(top_indices[top_acts > 0], minlength=d_sae).nonzero().flatten()
        pick = live[torch.randperm(len(live), generator=torch.Generator().manual_seed(0))[:n_latents]].sort().values
        parts.append(f"\n## {s.arm_impl.label} (beta = {s.sae.beta:g})\n")
        parts.append(probing.latent_cards(pick, (top_acts, top_indices, d_sae), meta["ctx_index"], meta["pos"], tokens,
                                          lm.tokenizer))
    path = results_dir(p) / "latent_browser.md"
    with io.atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts))
    return path


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


def run(p: Profile, lm, specs: list[SAESpec], progress: bool = True) -> dict[str, Any]:
    return run_probing(p, lm, specs, progress)
