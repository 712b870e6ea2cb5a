"""Stage ``harvest``: x and g at the hook for every split, resumable shards + manifest (``gsae.harvest``).

Under ``torchrun --nproc_per_node=N -m gsae.pipeline harvest --profile P`` rank 0 loads (downloads) the LM and
builds the contexts first, then every rank harvests its share of each split's shards; rank 0 writes each
manifest after a barrier (``gsae.harvest.harvest``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import distributed
from .. import harvest as harvest_lib
from ..config import Profile, config_hash
from ..paths import SPLITS, run_dir
from ..runtime import module_device
from .contexts import contexts, contexts_manifest


def harvest_dir(p: Profile, split: str, model_hash: str) -> Path:
    return run_dir(p) / f"harvest-{config_hash(p.model, p.data, p.harvest, model_hash)}" / split


def reader(p: Profile, split: str, model_hash: str) -> harvest_lib.ActivationReader:
    return harvest_lib.ActivationReader(harvest_dir(p, split, model_hash))


def run(p: Profile, lm, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Harvest every split (resumable); returns each split's manifest."""
    with distributed.main_first():  # rank 0 tokenizes and caches the contexts; the others then read them
        mh = lm.info["model_hash"]
        ctx = contexts(p, lm.tokenizer, mh)
    cm = contexts_manifest(p, mh)
    device = module_device(lm.model)
    progress = progress and distributed.is_main()
    out = {}
    for split in SPLITS:
        meta = {"model_hash": mh, "data_hash": cm["data_hash"][split], "split_hash": cm["split_hash"],
                "split": split, "profile": p.name}
        if device.type != "cpu":  # shards computed on two kinds of device differ in their last bits: never mix
            meta["device"] = device.type
        out[split] = harvest_lib.harvest(lm.model, ctx[split].tokens, p.model.hook_name, harvest_dir(p, split, mh),
                                         n_tokens=p.harvest.tokens[split], cfg=p.harvest, meta=meta,
                                         progress=progress, label_free=split in p.harvest.label_free_splits)
    return out
