"""Stand-ins for what the paper profile downloads, so its code path runs (and is tested, and timed) offline.

* ``random_gpt2``: a HookedTransformer with GPT-2 small's exact shape (12 blocks, d_model 768, 12 heads, d_mlp
  3072, vocabulary 50,257, n_ctx 1024) and seeded random weights. Same FLOPs and memory per token as GPT-2
  small, meaningless outputs: for timing, memory and plumbing, never for results.
* ``byte_tokenizer``: a byte-level tokenizer (one token per byte, + ``<|endoftext|>``) built in memory, no files.
* ``write_openwebtext_like``: a local corpus file in the shape ``data.source`` reads for OpenWebText (one JSON
  object with a ``text`` field per line; web-article-like lengths), from a seeded word list.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

GPT2_SMALL = {"n_layers": 12, "d_model": 768, "d_head": 64, "n_heads": 12, "d_mlp": 3072, "d_vocab": 50257,
              "n_ctx": 1024, "act_fn": "gelu_new", "normalization_type": "LN"}
"""GPT-2 small's shape (Radford et al. 2019; TransformerLens' "gpt2" config before weight processing)."""

_WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
          "they you were her she there been one all we their has would when if so no will more out up said what its "
          "about into than them can only other time new some could these two may first then do any like my now "
          "over such our man me even most made after also did many before must through back years where much your "
          "way well down should because each just those people how too little state good very make world still "
          "own see men work long get here between both life being under never day same another know while last "
          "might us great old year off come since against go came right used take three government city market "
          "report company police school game team week data study water health house music film party season")


def random_gpt2(seed: int = 0, device: str | torch.device = "cpu", **overrides: Any) -> HookedTransformer:
    """A GPT-2-small-shaped HookedTransformer with seeded random weights, frozen and in eval mode.
    ``overrides`` change the shape (e.g. ``n_layers=2`` for a quicker stand-in)."""
    cfg = HookedTransformerConfig(**{**GPT2_SMALL, **overrides}, seed=seed, device=str(device),
                                  positional_embedding_type="standard", default_prepend_bos=False,
                                  model_name="gpt2-shaped-random")
    return HookedTransformer(cfg, tokenizer=None, move_to_device=True).requires_grad_(False).eval()


def byte_tokenizer() -> Any:
    """A fast Hugging Face tokenizer over raw UTF-8 bytes: ids 0..255 are the 256 bytes (in the order of GPT-2's
    byte-to-character table), 256 is ``<|endoftext|>``.
    Supports offsets (``return_offsets_mapping``) like any fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special, pad_token=special,
                                   unk_token=special, model_max_length=1 << 30)


def write_openwebtext_like(path: str | Path, n_docs: int, seed: int = 0, mean_words: int = 600) -> Path:
    """``n_docs`` web-article-like documents (lengths log-normal around ``mean_words`` words, sentences and
    paragraphs) as JSON lines ``{"text": ...}`` at ``path``; deterministic for a seed."""
    rng = random.Random(seed)
    words = _WORDS.split()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n_docs):
            n = max(20, int(rng.lognormvariate(0, 0.6) * mean_words))
            paragraphs, sentence, out = [], [], []
            for i in range(n):
                w = rng.choice(words) if rng.random() < 0.9 else str(rng.randint(1, 2030))
                sentence.append(w.capitalize() if not sentence else w)
                if len(sentence) >= rng.randint(8, 24) or i == n - 1:
                    out.append(" ".join(sentence) + rng.choice(".....?!"))
                    sentence = []
                    if rng.random() < 0.2:
                        paragraphs.append(" ".join(out))
                        out = []
            paragraphs.append(" ".join(out))
            f.write(json.dumps({"text": "\n\n".join(p for p in paragraphs if p)}) + "\n")
    return path
