"""Every way gsae runs the LM around its hook, in one place: the gradient capture of the harvest, the clean
pass and splices of the evaluation, and the offset forward of steering.

Conventions shared by all of them:

* A forward hook swaps the hook activation for a detached leaf when a gradient is needed, so nothing below the
  hook builds a graph, the backward stops at the hook, and the parameters (frozen for the call) get no ``.grad``.
* g = d(sum over predicted tokens of next-token cross-entropy)/dx -- the SUM, not the mean (``gsae.harvest``
  explains why): the same token gets the same g alone or inside a batch.
* ``padding_side="right"``: contexts are fixed-length windows with no padding, and a left-padding tokenizer
  default would make TransformerLens mask real tokens that share the pad id.
* For a residual hook a splice or steer restarts the forward at the hook's block (``restart_layer``), skipping
  the blocks below, whose output is the clean activation anyway; other hooks run the full forward with a hook.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens import HookedTransformer

_RESID_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")


# ------------------------------------------------------------------------------------------------ losses
def at_least_f32(t: Tensor) -> Tensor:
    """Half-precision logits are upcast for the softmax; float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def kl_per_token(logp_ref: Tensor, logits_new: Tensor) -> Tensor:
    """KL(p_ref || p_new) over the last dim; ``logp_ref`` are log-probabilities, ``logits_new`` raw logits."""
    logp_new = F.log_softmax(at_least_f32(logits_new), dim=-1)
    return F.kl_div(logp_new, logp_ref, log_target=True, reduction="none").sum(-1)


def per_token_ce(logits: Tensor, tokens: Tensor, first: int) -> Tensor:
    """[B, T-1-first] CE of the predictions at positions first..T-2 (logits at p score token p+1)."""
    T = tokens.shape[1]
    logp = F.log_softmax(at_least_f32(logits[:, first:T - 1]), dim=-1)
    return -logp.gather(-1, tokens[:, first + 1:, None]).squeeze(-1)


def ce_and_kl(logits: Tensor, tokens: Tensor, first: int, logp_ref: Tensor) -> tuple[Tensor, Tensor]:
    """``per_token_ce(logits, tokens, first)`` and ``kl_per_token(logp_ref, logits[:, first:T-1])`` from one
    log-softmax of the scored logits (the same operations on the same inputs, so the same bits, at half the passes
    over a [B, T, vocab] tensor)."""
    T = tokens.shape[1]
    logp = F.log_softmax(at_least_f32(logits[:, first:T - 1]), dim=-1)
    ce = -logp.gather(-1, tokens[:, first + 1:, None]).squeeze(-1)
    return ce, F.kl_div(logp, logp_ref, log_target=True, reduction="none").sum(-1)


# ---------------------------------------------------------------------------------------- gradient capture (harvest)
class Capture(NamedTuple):
    x: Tensor
    """[B, T, d] activation at the hook (detached, model dtype and device)."""
    g: Tensor
    """[B, T, d] d(loss_sum)/dx; the last position is exactly 0."""
    loss_sum: Tensor
    """Scalar: sum of next-token cross-entropies over the B*(T-1) predicted tokens."""
    n_pred: int
    """Number of predicted tokens, B*(T-1)."""
    g_free: Tensor | None = None
    """[B, T, d] the label-free gradient (``label_free_ce``), when asked for; else None."""


def label_free_ce(logits: Tensor) -> Tensor:
    """[B, T-1] cross-entropy of each prediction against the model's own argmax (a pseudo-label), the loss of the
    label-free gradient g_free = d(sum of these)/dx (PREREG §1). It needs no next token: the expected CE under
    the model's own distribution has zero expected gradient, E_{y~p}[grad -log p_y] = 0, and the entropy's gradient
    measures confidence rather than prediction; the argmax CE's gradient equals the true label's wherever the model
    is right. The argmax is taken on detached logits (the pseudo-label is a constant, like a label)."""
    pred = logits[:, :-1]
    target = pred.detach().argmax(-1, keepdim=True)
    return -F.log_softmax(at_least_f32(pred), dim=-1).gather(-1, target).squeeze(-1)


@contextlib.contextmanager
def frozen_params(model: torch.nn.Module) -> Iterator[None]:
    """Turn requires_grad off on every parameter for the duration (restored after), so the forward builds
    no graph below the hook and autograd never allocates a parameter ``.grad``."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def check_tokens(tokens: Tensor, min_len: int) -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be an integer tensor [batch, ctx_len], got "
                         f"{getattr(tokens, 'dtype', type(tokens))} {tuple(getattr(tokens, 'shape', ()))}")
    if tokens.shape[1] < min_len:
        raise ValueError(f"contexts must have at least {min_len} tokens (the last position has no next token "
                         f"and is dropped), got ctx_len={tokens.shape[1]}; raise data.ctx_len")


def check_hook(model: HookedTransformer, hook_name: str) -> None:
    if hook_name not in model.hook_dict:
        resid = [n for n in model.hook_dict if "resid" in n][:6]
        raise ValueError(f"model has no hook point {hook_name!r}; valid names look like {resid} "
                         f"(see model.hook_dict)")


def capture(model: HookedTransformer, tokens: Tensor, hook_name: str, label_free: bool = False) -> Capture:
    """Activation x and summed-loss gradient g at ``hook_name`` for every position of ``tokens`` [B, T]; with
    ``label_free`` also g_free, the gradient of ``label_free_ce`` summed the same way (a second backward).

    g = d(sum_{b, t<T-1} CE(logits[b, t], tokens[b, t+1])) / dx  -- the SUM of per-token losses (module
    docstring), so a sequence gets the same g alone or inside a batch, and g does not shrink as 1/(B(T-1)).
    The model's parameters are frozen for the call (flags restored after); they never receive ``.grad``.
    """
    check_tokens(tokens, 2)
    check_hook(model, hook_name)
    leaves: list[Tensor] = []

    def store_leaf(act: Tensor, hook: Any) -> Tensor:
        # Detaching cuts the graph below the hook; the leaf is what we differentiate with respect to.
        leaf = act.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf

    with frozen_params(model), torch.enable_grad(), model.hooks(fwd_hooks=[(hook_name, store_leaf)]):
        # padding_side="right": fixed-length windows have no padding, so TL must not build an attention
        # mask from pad-token ids (which would mask real EOS tokens if the tokenizer pads on the left).
        if label_free:  # "both" computes the loss exactly as "loss" does, and also returns the logits
            logits, per_token = model(tokens, return_type="both", loss_per_token=True, padding_side="right")
        else:
            per_token = model(tokens, return_type="loss", loss_per_token=True, padding_side="right")
        if len(leaves) != 1:
            raise RuntimeError(f"hook {hook_name!r} fired {len(leaves)} times in one forward; expected once")
        loss_sum = per_token.sum()
        (g,) = torch.autograd.grad(loss_sum, leaves[0], retain_graph=label_free)
        g_free = torch.autograd.grad(label_free_ce(logits).sum(), leaves[0])[0] if label_free else None
    return Capture(x=leaves[0].detach(), g=g, loss_sum=loss_sum.detach(), n_pred=per_token.numel(), g_free=g_free)


# ------------------------------------------------------------------------------- clean pass and splices (evaluation)
class CleanPass(NamedTuple):
    logp: Tensor
    """[B, T-1-first, V] clean log-probabilities of the scored predictions (at least float32)."""
    ce: Tensor
    """[B, T-1-first] clean per-token CE."""
    x: Tensor
    """[B, T, d] clean activation at the hook."""
    g: Tensor | None
    """[B, T, d] d(sum of the CE of predictions 0..T-2)/dx (the harvest's g), or None when not asked for."""
    g_free: Tensor | None = None
    """[B, T, d] the label-free gradient (``label_free_ce``), or None when not asked for."""


def clean_pass(model: Any, tokens: Tensor, hook_name: str, first: int, need_grad: bool,
               label_free: bool = False) -> CleanPass:
    """One clean forward giving logits, the hook activation and (if ``need_grad``) its gradient.

    g is the harvest's gradient (``capture``): d(sum of the CE of ALL predictions 0..T-2)/dx.
    At the scored positions (>= first) this equals the gradient of the scored CE alone, because under causal
    attention the prediction at position 0 depends on x_0 only. The hook swaps in a detached leaf and the
    parameters are frozen for the call, so autograd runs only above the hook and writes no ``.grad``."""
    store: dict[str, Tensor] = {}

    def grab(act: Tensor, hook: Any) -> Tensor:
        if need_grad:
            act = act.detach().requires_grad_(True)
        store["x"] = act
        return act

    grad_ctx = frozen_params(model) if need_grad else contextlib.nullcontext()
    with grad_ctx, torch.enable_grad() if need_grad else torch.no_grad():
        # padding_side="right" as in the harvest: fixed-length windows have no padding, and a left-padding
        # tokenizer default would make TL mask real tokens that share the pad id.
        logits = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook_name, grab)],
                                      padding_side="right")
        ce_all = per_token_ce(logits, tokens, 0)
        g = torch.autograd.grad(ce_all.sum(), store["x"], retain_graph=label_free)[0] if need_grad else None
        g_free = (torch.autograd.grad(label_free_ce(logits).sum(), store["x"])[0]
                  if need_grad and label_free else None)
    T = tokens.shape[1]
    logp = F.log_softmax(at_least_f32(logits.detach()[:, first:T - 1]), dim=-1)
    return CleanPass(logp, ce_all.detach()[:, first:], store["x"].detach(), g, g_free)


@torch.no_grad()
def patched_logits(model: Any, tokens: Tensor, hook_name: str, first: int,
                   replace: Callable[[Tensor], Tensor]) -> Tensor:
    """Logits with the hook activation replaced by ``replace(act)`` at positions first..T-1."""

    def patch(act: Tensor, hook: Any) -> Tensor:
        new = replace(act).to(act.dtype).expand_as(act)
        return torch.cat([act[:, :first], new[:, first:]], dim=1)

    return model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook_name, patch)], padding_side="right")


def spliced_logits(model: Any, tokens: Tensor, hook_name: str, first: int, x_clean: Tensor, x_new: Tensor) -> Tensor:
    """Logits with the hook activation set to ``x_new`` at positions first..T-1 (``x_clean`` before). For a
    residual hook the forward restarts at the hook's block (``start_at_layer``), skipping the blocks below,
    whose output is ``x_clean`` anyway; other hooks run the full forward with a patching hook."""
    start = restart_layer(model, hook_name)
    if start is None:
        return patched_logits(model, tokens, hook_name, first, lambda a: x_new)
    resid = torch.cat([x_clean[:, :first], x_new[:, first:].to(x_clean.dtype)], dim=1)
    return model(resid, start_at_layer=start, return_type="logits")


# ---------------------------------------------------------------------------------------- offset forwards (steering)
def restart_layer(model: HookedTransformer, hook_name: str) -> int | None:
    """Block index to restart the forward at for a residual hook (None: use a full forward with a hook)."""
    m = _RESID_HOOK.fullmatch(hook_name)
    if m is None or model.cfg.positional_embedding_type == "shortformer":
        return None
    return int(m.group(1)) + (1 if m.group(2) == "post" else 0)


def logits_with_offset(model: HookedTransformer, tokens: Tensor, hook_name: str, start: int | None,
                 resid: Tensor | None, offset: Tensor, first: int) -> Tensor:
    """Logits with ``offset`` [B, d] added to the hook activation at positions >= first.

    ``resid`` [B, T, d] is the clean hook activation (fast path, ``start`` not None); otherwise the full
    forward on ``tokens`` [B, T] runs with a hook that adds the offset."""
    if start is not None:
        steered = resid.clone()
        steered[:, first:] += offset[:, None, :].to(resid.dtype)
        return model(steered, start_at_layer=start, return_type="logits")
    calls = []

    def add(act: Tensor, hook: Any) -> Tensor:
        calls.append(1)
        act = act.clone()
        act[:, first:] += offset[:, None, :].to(act.dtype)
        return act

    # padding_side="right": fixed-length windows have no padding (see ``capture``).
    logits = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook_name, add)], padding_side="right")
    if len(calls) != 1:
        raise RuntimeError(f"hook {hook_name!r} fired {len(calls)} times in one forward; expected once")
    return logits


def clean_residual(model: HookedTransformer, tokens: Tensor, start: int) -> Tensor:
    """The residual stream entering block ``start``: the hook activation for the fast path."""
    return model(tokens, stop_at_layer=start, padding_side="right")
