"""Steering with SAE decoder directions (claim C3): add alpha * d at the hook, measure how the LM's output moves.

Protocol (PREREG §5). For latent i with unit decoder direction d_i and an absolute strength alpha, the
activation at ``hook_name`` becomes ``x + alpha * d_i`` at every position ``p >= first`` (``first = 1``:
position 0, the attention-sink outlier that the harvest drops, keeps its clean value). Scored positions are
the predictions the harvest keeps, ``p = first..T-2`` (the logits at p predict token p+1; the last position
has no target), the same convention as ``gsae.evals``. Two numbers per (latent, alpha), each a mean over
contexts and scored positions (every context has the same number of scored positions, so the mean of
per-context means is the mean over all scored predictions):

* ``kl``: KL(p_clean || p_steered) in nats (primary);
* ``logprob_gain``: log p_steered(t) - log p_clean(t), also averaged over the latent's ``top_tokens`` (the
  tokens its direction promotes most under the direct path, ``promoted_tokens``).

Speed. Every (latent, alpha, context) triple is one batch row: the contexts are repeated along the batch and
each row gets its own ``alpha * d``. The clean forward is done once. For a residual-stream hook
(``blocks.L.hook_resid_pre`` or ``blocks.L.hook_resid_post``) the steered forward starts at the hook: the
clean residual is computed once (``stop_at_layer``), the offset is added to it and the model runs from block
L (resid_pre) or L + 1 (resid_post) with ``start_at_layer``, which is the same computation as a full forward
with a hook (tested). Any other hook, or a shortformer model (whose blocks need the positional embedding as
an extra input), uses the full forward with a TransformerLens hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens import HookedTransformer

from .lm import clean_residual, logits_with_offset, restart_layer
from .progress import bar as tqdm  # tqdm-compatible; draws on the terminal, never in a notebook

CONTROL_LABEL = "random directions (control)"
"""How C3's random-direction control is labelled in tables and figures."""


class SteeringResult(NamedTuple):
    kl: Tensor
    """[n_lat, n_alpha] float64: mean over contexts and scored positions of KL(p_clean || p_steered), nats."""
    logprob_gain: Tensor | None
    """[n_lat, n_alpha] float64: mean over contexts, scored positions and the latent's top tokens of
    log p_steered(t) - log p_clean(t); None when no ``top_tokens`` were given."""
    alphas: Tensor
    """[n_alpha] float64: the absolute strengths used (columns of ``kl`` and ``logprob_gain``)."""
    n_scored: int
    """Scored predictions behind each entry: n_ctx * (T - 1 - first)."""


# ------------------------------------------------------------------------------------------------ helpers
def sample_live_latents(fire_counts: Tensor, n: int, seed: int) -> Tensor:
    """``n`` latents drawn uniformly without replacement among those with ``fire_counts > 0``, sorted.

    Fewer (all live latents) when fewer than ``n`` are live; empty when none is. The draw is a seeded
    ``torch.randperm`` on CPU, so the same counts and seed give the same latents on every machine."""
    if fire_counts.dim() != 1:
        raise ValueError(f"fire_counts must be 1-D [d_sae], got shape {tuple(fire_counts.shape)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    live = torch.nonzero(fire_counts.detach().cpu() > 0).flatten()
    perm = torch.randperm(live.numel(), generator=torch.Generator().manual_seed(seed))
    return live[perm[:n]].sort().values


def median_activation_norm(x: Tensor) -> float:
    """Median L2 norm of the rows of ``x`` [N, d] (average of the two middle values when N is even); the unit
    of the steering strengths (alpha = multiple x this)."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty [N, d] activation matrix, got shape {tuple(x.shape)}")
    return float(np.median(x.detach().double().norm(dim=-1).cpu().numpy()))


def promoted_tokens(model: HookedTransformer, directions: Tensor, n_top: int) -> Tensor:
    """[n, n_top] ids of the tokens each direction [n, d_model] raises most under the direct path, best first.

    Direct path: the logit change from adding d to the final residual, ignoring every block after the hook
    and the final norm's division by the residual's scale (a positive factor per position, which does not
    change the ranking). The final norm's centring (LayerNorm, LNPre) is applied to d, and its weights are
    applied when not folded: with ``fold_ln`` (how the project loads its models) they are already in W_U and
    ``ln_final`` has no weight. b_U does not depend on d, and a centred unembed shifts all of one direction's
    token scores by the same amount, so neither changes the ranking. Ties break towards the lower token id."""
    d_model = model.cfg.d_model
    if directions.dim() != 2 or directions.shape[1] != d_model:
        raise ValueError(f"directions must be [n, d_model={d_model}], got shape {tuple(directions.shape)}")
    if not 1 <= n_top <= model.cfg.d_vocab_out:
        raise ValueError(f"n_top must be in 1..d_vocab={model.cfg.d_vocab_out}, got {n_top}")
    W_U = model.W_U
    with torch.no_grad():
        d = directions.detach().to(W_U.device, W_U.dtype)
        if model.cfg.normalization_type in ("LN", "LNPre"):
            d = d - d.mean(-1, keepdim=True)
        w = getattr(model.ln_final, "w", None)
        if w is not None:
            d = d * w
        scores = d @ W_U
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return order[:, :n_top].cpu()


# ------------------------------------------------------------------------------------------------ forwards
# ------------------------------------------------------------------------------------------------ steering
def _check_steer_inputs(model: HookedTransformer, directions: Tensor, tokens: Tensor, hook_name: str,
                        alphas: Tensor, first: int, top_tokens: Tensor | None, batch: int) -> None:
    d_model = model.cfg.d_model
    if directions.dim() != 2 or directions.shape[1] != d_model or directions.shape[0] == 0:
        raise ValueError(f"directions must be a non-empty [n_lat, d_model={d_model}] tensor (unit decoder rows), "
                         f"got shape {tuple(directions.shape)}")
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32) or tokens.shape[0] == 0:
        raise ValueError(f"tokens must be a non-empty integer tensor [n_ctx, T], got "
                         f"{tuple(tokens.shape)} {tokens.dtype}")
    if first < 0 or tokens.shape[1] - 1 - first < 1:
        raise ValueError(f"first={first} with contexts of length {tokens.shape[1]} leaves no scored prediction; "
                         f"use first >= 0 and contexts of at least first + 2 tokens")
    if hook_name not in model.hook_dict:
        near = [h for h in model.hook_dict if "resid" in h][:6]
        raise ValueError(f"model has no hook {hook_name!r}; residual hooks include {near}")
    if alphas.numel() == 0 or not bool(torch.isfinite(alphas).all()):
        raise ValueError(f"alphas must be a non-empty sequence of finite strengths, got {alphas.tolist()}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if top_tokens is not None:
        V = model.cfg.d_vocab_out
        if (top_tokens.dim() != 2 or top_tokens.shape[0] != directions.shape[0] or top_tokens.shape[1] == 0
                or top_tokens.dtype not in (torch.int64, torch.int32)):
            raise ValueError(f"top_tokens must be an integer tensor [n_lat={directions.shape[0]}, n_top >= 1] "
                             f"(e.g. promoted_tokens(model, directions, 5)), got {tuple(top_tokens.shape)} "
                             f"{top_tokens.dtype}")
        if int(top_tokens.min()) < 0 or int(top_tokens.max()) >= V:
            raise ValueError(f"top_tokens must be token ids in 0..{V - 1}")


@torch.no_grad()
def steer(model: HookedTransformer, directions: Tensor, tokens: Tensor, hook_name: str, alphas: Sequence[float], *,
          first: int = 1, top_tokens: Tensor | None = None, batch: int = 8, progress: bool = True) -> SteeringResult:
    """Steer ``model`` along each of ``directions`` [n_lat, d_model] with each absolute strength in ``alphas``
    on the contexts ``tokens`` [n_ctx, T]; see the module docstring for the protocol.

    ``directions`` are used as given (pass unit-norm decoder rows so alpha is the length of the offset).
    ``batch`` is the number of (latent, alpha, context) rows per forward; the result does not depend on it
    beyond float rounding. ``top_tokens`` [n_lat, n_top] (e.g. ``promoted_tokens``) turns on
    ``logprob_gain``."""
    alphas_t = torch.as_tensor(list(alphas), dtype=torch.float64).flatten()
    _check_steer_inputs(model, directions, tokens, hook_name, alphas_t, first, top_tokens, batch)
    device = next(model.parameters()).device
    n_lat, n_alpha, (n_ctx, T) = directions.shape[0], alphas_t.numel(), tokens.shape
    tokens = tokens.to(device, torch.int64)
    dirs = directions.detach().to(device, torch.float32)
    top = top_tokens.to(device, torch.int64) if top_tokens is not None else None
    start = restart_layer(model, hook_name)
    scored = slice(first, T - 1)

    # Clean pass, once: hook activations (fast path) and clean log-probs of the scored predictions.
    resid_parts, logp_parts = [], []
    for c0 in range(0, n_ctx, batch):
        tok = tokens[c0:c0 + batch]
        resid = clean_residual(model, tok, start) if start is not None else None
        zero = torch.zeros(tok.shape[0], model.cfg.d_model, device=device)
        logits = logits_with_offset(model, tok, hook_name, start, resid, zero, first)
        logp_parts.append(F.log_softmax(logits[:, scored].float(), dim=-1))
        if resid is not None:
            resid_parts.append(resid)
    clean_logp = torch.cat(logp_parts)  # [n_ctx, S, V]
    clean_resid = torch.cat(resid_parts) if start is not None else None

    # Row r <-> (latent, alpha, context), latent-major; every row is one steered forward.
    n_rows = n_lat * n_alpha * n_ctx
    rows = torch.arange(n_rows, device=device)
    lat_of, alpha_of, ctx_of = rows // (n_alpha * n_ctx), (rows // n_ctx) % n_alpha, rows % n_ctx
    alphas_dev = alphas_t.to(device)
    kl_sum = torch.zeros(n_lat * n_alpha, dtype=torch.float64, device=device)
    gain_sum = torch.zeros(n_lat * n_alpha, dtype=torch.float64, device=device) if top is not None else None
    for r0 in tqdm(range(0, n_rows, batch), desc=f"steer {n_lat} latents x {n_alpha} alphas", disable=not progress,
                   leave=False):
        lat, a_idx, ctx = lat_of[r0:r0 + batch], alpha_of[r0:r0 + batch], ctx_of[r0:r0 + batch]
        offset = dirs[lat] * alphas_dev[a_idx, None].float()
        resid = clean_resid[ctx] if clean_resid is not None else None
        logits = logits_with_offset(model, tokens[ctx], hook_name, start, resid, offset, first)
        logp = F.log_softmax(logits[:, scored].float(), dim=-1)  # [B, S, V]
        logp_clean = clean_logp[ctx]
        kl = F.kl_div(logp, logp_clean, log_target=True, reduction="none").sum(-1)  # [B, S]
        cell = lat * n_alpha + a_idx
        kl_sum.index_add_(0, cell, kl.double().mean(-1))
        if gain_sum is not None:
            idx = top[lat][:, None, :].expand(-1, logp.shape[1], -1)  # [B, S, n_top]
            gain = logp.gather(-1, idx) - logp_clean.gather(-1, idx)
            gain_sum.index_add_(0, cell, gain.double().mean((-1, -2)))

    def per_cell(total: Tensor) -> Tensor:
        return (total / n_ctx).view(n_lat, n_alpha).cpu()

    return SteeringResult(kl=per_cell(kl_sum), logprob_gain=per_cell(gain_sum) if gain_sum is not None else None,
                          alphas=alphas_t, n_scored=n_ctx * (T - 1 - first))
