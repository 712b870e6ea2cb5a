"""Stage ``contexts``: the token windows of each split that the harvest will use (cached under runs/<profile>)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .. import data, io
from ..config import ConfigError, Profile, config_hash
from ..paths import SPLITS, cache_dir, run_dir


class SplitContexts(NamedTuple):
    tokens: torch.Tensor
    """[n_ctx, T] the contexts harvested for this split, in harvest order."""
    pos_tags: torch.Tensor
    """[n_ctx, T] POS tag index (-1: none)."""
    genre_ids: torch.Tensor
    """[n_ctx] index into ``genres``."""
    tag_vocab: tuple[str, ...]
    genres: tuple[str, ...]


def rows_per_context(p: Profile) -> int:
    """Harvested rows per context: the last position has no target, position 0 is dropped when exclude_pos0."""
    return p.data.ctx_len - 1 - int(p.harvest.exclude_pos0)


def _stage_dir(p: Profile, model_hash: str) -> Path:
    return run_dir(p) / f"contexts-{config_hash(p.data, p.harvest.tokens, p.harvest.exclude_pos0, model_hash)}"


def contexts(p: Profile, tokenizer: Any, model_hash: str) -> dict[str, SplitContexts]:
    """The contexts of each split that the harvest will use: all windows of the split's documents, shuffled
    (seeded) so a token budget samples many documents, then truncated to the budget. Cached."""
    stage = _stage_dir(p, model_hash)
    m = io.read_manifest(stage)
    if m is None:
        docs = data.load_corpus(p.data.corpus, cache_dir() / "corpus", openwebtext_docs=p.data.documents,
                                source=p.data.source)
        splits = data.split_documents(docs, p.data.split_fracs, p.data.split_seed)
        vocab = data.tag_vocabulary(docs)
        genres = tuple(sorted({d.genre for d in docs}))
        tensors, counts = {}, {}
        for i, split in enumerate(SPLITS):
            c = data.make_contexts(splits[split], tokenizer, p.data.ctx_len, with_tags=True, tag_vocab=vocab)
            need = math.ceil(p.harvest.tokens.get(split, 0) / rows_per_context(p))
            counts[split] = {"documents": len(splits[split]), "contexts": len(c.tokens),
                             "tokens": int(c.tokens.numel()), "harvest_contexts": need}
            if need > len(c.tokens):
                more = (f", or raise data.documents (now {len(docs)} documents)" if p.data.corpus == "openwebtext"
                        else "")
                raise ConfigError(
                    f"harvest.tokens.{split}={p.harvest.tokens[split]} needs {need} contexts but the {split} split "
                    f"has only {len(c.tokens)} ({len(c.tokens) * rows_per_context(p)} usable tokens); lower it{more}")
            perm = torch.randperm(len(c.tokens), generator=torch.Generator().manual_seed(p.data.split_seed + i))[:need]
            tensors[f"{split}.tokens"] = c.tokens[perm].contiguous()
            tensors[f"{split}.pos_tags"] = c.pos_tags[perm].contiguous()
            tensors[f"{split}.genre_ids"] = torch.tensor([genres.index(c.genres[j]) for j in perm.tolist()])
        stage.mkdir(parents=True, exist_ok=True)
        io.save_tensors(stage / "contexts.safetensors", tensors)
        m = io.write_manifest(stage, {"stage": "contexts", "tag_vocab": list(vocab), "genres": list(genres),
                                      "split_hash": data.split_hash(splits), "counts": counts,
                                      "data_hash": {s: data.data_hash(tensors[f"{s}.tokens"]) for s in SPLITS}},
                              files=["contexts.safetensors"])
    else:
        io.verify_manifest(stage, rebuild_hint=f"delete {stage} and re-run")
    t = io.load_tensors(stage / "contexts.safetensors")
    return {s: SplitContexts(t[f"{s}.tokens"], t[f"{s}.pos_tags"], t[f"{s}.genre_ids"], tuple(m["tag_vocab"]),
                             tuple(m["genres"])) for s in SPLITS}


def contexts_manifest(p: Profile, model_hash: str) -> dict[str, Any]:
    return io.read_json(_stage_dir(p, model_hash) / io.MANIFEST)


def run(p: Profile, lm, progress: bool = True) -> dict[str, SplitContexts]:
    """Every split's contexts (cached); returns them."""
    return contexts(p, lm.tokenizer, lm.info["model_hash"])
