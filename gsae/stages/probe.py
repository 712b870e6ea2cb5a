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
from ..runtime import module_device, to_device
from ..specs import SAESpec, load_trained, sae_dir, source_version, stage_file
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


def run(p: Profile, lm=None, progress: bool = True) -> dict[str, Any]:
    from . import load_lm
    from .train import all_specs

    lm = lm or load_lm(p, progress)
    return run_probing(p, lm, all_specs(p, lm), progress)
