"""Stage ``probe`` (C4): single-latent sparse probing on POS tags and genres per SAE and encoder, and the latent
browser. Writes ``probe_test-<key>.json`` per SAE (per-class AUCs and, under ``metrics``, their means)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from .. import io, probing
from ..config import Profile
from ..paths import results_dir
from ..specs import SAESpec, load_trained, sae_dir, source_version, stage_file
from .contexts import contexts
from .harvest import reader


def probe_file(p: Profile) -> str:
    return stage_file(p, "probe", code=source_version(probing, sys.modules[__name__]))


def probe_labels(p: Profile, lm, split: str = "test") -> dict[str, Any]:
    """Per harvested row of ``split``: POS tag and genre labels, and the frequent classes used for probing (always
    counted on the test split, so both splits probe the same classes)."""
    mh = lm.info["model_hash"]
    ctx = contexts(p, lm.tokenizer, mh)[split]
    rows = reader(p, split, mh).load_all()
    ci, pos = rows.meta["ctx_index"], rows.meta["pos"]
    pos_labels = ctx.pos_tags[ci, pos]
    genre_labels = ctx.genre_ids[ci]
    if split == "test":
        tag_classes = probing.frequent_classes(pos_labels, p.probing.min_tag_count, p.probing.max_tags)
        genre_classes = probing.frequent_classes(genre_labels, p.probing.min_tag_count, 100)
    else:
        test = probe_labels(p, lm, "test")

        def scorable(classes: list[int], labels: torch.Tensor) -> list[int]:  # a positive and a negative token
            lab = labels[labels >= 0]
            return [c for c in classes if 0 < int((lab == c).sum()) < lab.numel()]

        tag_classes = scorable(test["tag_classes"], pos_labels)
        genre_classes = scorable(test["genre_classes"], genre_labels)
    return {"rows": rows, "pos": pos_labels, "genre": genre_labels, "tag_classes": tag_classes,
            "genre_classes": genre_classes, "tag_vocab": ctx.tag_vocab, "genres": ctx.genres}


def run_probing(p: Profile, lm, specs: list[SAESpec], progress: bool = True) -> dict[str, Any]:
    """C4 sparse probing per SAE and encode mode, cached per SAE."""
    mh = lm.info["model_hash"]
    name = probe_file(p)
    todo = [s for s in specs if not (sae_dir(p, s, mh) / name).exists()]
    if todo:
        lab, val = probe_labels(p, lm), probe_labels(p, lm, "val")
        for s in todo:
            sae = load_trained(p, s, mh)
            out, metrics = {}, {}
            for mode in ("g", "plain") + (("g_free",) if s.primary_encode == "g_free" else ()):
                res = {}
                for split, labels in (("test", lab), ("val", val)):
                    with torch.no_grad():
                        enc = sae.encode(labels["rows"].x, labels["rows"].gradient(mode))
                    acts = (enc.top_acts, enc.top_indices, sae.cfg.d_sae)
                    res[split] = {kind: probing.best_latent_auc(acts, labels[kind], labels[f"{cls}_classes"])
                                  for kind, cls in (("pos", "tag"), ("genre", "genre")) if labels[f"{cls}_classes"]}
                rp, rg = res["test"]["pos"], res["test"]["genre"]
                out[mode] = {"pos_auc": [float(a) for a in rp.auc], "genre_auc": [float(a) for a in rg.auc]}
                metrics[mode] = {"probe_auc_pos": float(rp.mean_auc), "probe_auc_genre": float(rg.mean_auc)}
                for kind in res["val"]:  # chosen on validation, scored on test (a split may lack a class)
                    metrics[mode][f"probe_auc_{kind}_heldout"] = probing.held_out_auc(res["val"][kind],
                                                                                     res["test"][kind])
            io.write_json(sae_dir(p, s, mh) / name, {**out, "metrics": metrics})
    return {s.name: io.read_json(sae_dir(p, s, mh) / name) for s in specs}


def write_latent_browser(p: Profile, lm, specs: list[SAESpec], n_latents: int = 8) -> Path:
    """Markdown cards of random live latents of each arm (primary, selection k, first seed), coded with the
    encoder each arm is meant for."""
    mh = lm.info["model_hash"]
    k, seed = p.experiment.beta_select_k, p.experiment.seeds[0]
    lab = probe_labels(p, lm)
    rows = lab["rows"]
    tokens = contexts(p, lm.tokenizer, mh)["test"].tokens
    parts = [f"# Latent browser ({p.name} profile, k = {k}, seed {seed})\n\nRandom live latents (seed 0) with their "
             f"top-activating test tokens, marked **[[like this]]**. g-SAE codes use g-encode.\n"]
    for s in specs:
        if s.group != "primary" or s.k != k or s.seed != seed:
            continue
        sae = load_trained(p, s, mh)
        with torch.no_grad():
            enc = sae.encode(rows.x, rows.gradient(s.primary_encode))
        dense = sae.to_dense(enc)
        live = torch.nonzero(dense.gt(0).any(0)).flatten()
        pick = live[torch.randperm(len(live), generator=torch.Generator().manual_seed(0))[:n_latents]].sort().values
        parts.append(f"\n## {s.arm_impl.label} (beta = {s.sae.beta:g})\n")
        parts.append(probing.latent_cards(pick, dense, rows.meta["ctx_index"], rows.meta["pos"], tokens, lm.tokenizer))
    path = results_dir(p) / "latent_browser.md"
    with io.atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts))
    return path


def run(p: Profile, lm=None, progress: bool = True) -> dict[str, Any]:
    from . import load_lm
    from .train import all_specs

    lm = lm or load_lm(p, progress)
    return run_probing(p, lm, all_specs(p, lm), progress)
