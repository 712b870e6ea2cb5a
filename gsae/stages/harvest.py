"""Stage ``harvest``: x and g at the hook for every split, resumable shards + manifest (``gsae.harvest``).

Under ``torchrun --nproc_per_node=N -m gsae.pipeline harvest --profile P`` rank 0 loads (downloads) the LM and
builds the contexts first, then every rank harvests its share of each split's shards; rank 0 writes each
manifest after a barrier (``gsae.harvest.harvest``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import distributed
from .. import harvest as harvest_lib
from ..config import ConfigError, Profile, config_hash
from ..paths import SPLITS, run_dir
from ..runtime import module_device
from .contexts import contexts, contexts_manifest


def harvest_dir(p: Profile, split: str, model_hash: str) -> Path:
    return run_dir(p) / f"harvest-{config_hash(p.model, p.data, p.harvest, model_hash)}" / split


def reader(p: Profile, split: str, model_hash: str) -> harvest_lib.ActivationReader:
    return harvest_lib.ActivationReader(harvest_dir(p, split, model_hash))


_HELD: dict[tuple[str, str], harvest_lib.ActivationReader] = {}
"""The split held in memory by this process (at most one), keyed by harvest directory and device."""


def holds_in_memory(p: Profile, train_reader: harvest_lib.ActivationReader, device: torch.device) -> bool:
    """Whether SAE training holds the train split in ``device``'s memory (``runtime.train_data``): always with
    ``memory`` (refused when the split is larger than the device's free memory), never with ``disk``, and with
    ``auto`` on a GPU whose free memory is at least twice the split's stored size."""
    if p.runtime.train_data == "disk" or (p.runtime.train_data == "auto" and device.type != "cuda"):
        return False
    need = train_reader.stored_bytes
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    if p.runtime.train_data == "memory" and free is not None and need > free:
        raise ConfigError(f"the train split ({need / 2**30:.1f} GiB) does not fit in {device}'s free memory "
                          f"({free / 2**30:.1f} GiB); set runtime.train_data: disk (or auto) in profile {p.name}")
    return holds(p.runtime.train_data, need, free)


def holds(train_data: str, need: int, free: int | None) -> bool:
    """The rule of ``runtime.train_data`` for a split of ``need`` bytes and ``free`` bytes free on the training
    device (None: the CPU)."""
    return train_data == "memory" or (train_data == "auto" and free is not None and 2 * need <= free)


def training_data(p: Profile, train_reader: harvest_lib.ActivationReader,
                  device: torch.device | str | None) -> harvest_lib.ActivationReader:
    """What SAE training draws its batches from: ``train_reader`` itself, or the same split held in ``device``'s
    memory (``holds_in_memory``), loaded once per process and shared by every SAE trained after it."""
    device = torch.device(device or "cpu")
    if train_reader.held_device is not None or not holds_in_memory(p, train_reader, device):
        return train_reader
    key = (str(train_reader.dir), str(device))
    if key not in _HELD:
        _HELD.clear()  # one split at a time: drop the last one before loading the next
        _HELD[key] = train_reader.held_in(device)
    return _HELD[key]


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
