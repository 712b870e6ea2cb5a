"""KL fine-tuning arms (Karvonen 2025, arXiv 2503.17272): an SAE trained on its MSE loss, whose last ``kl_frac`` of
training steps add KL(clean || spliced), the divergence of the LM's next-token distribution when the SAE's
reconstruction replaces the activation at the hook.

Arms: ``topk_kl`` (TopK + KL fine-tune) and ``gsae_kl`` (g-SAE + KL fine-tune). Same module, SAELens format and
total training steps as ``topk`` / ``gsae``; the cfg.json metadata's ``arm`` tells them apart.

Schedule (``kl_steps``). Of the ``n = train.tokens // train.batch_size`` steps, the first ``n - n_kl`` are the
plain arm's steps on the shared row stream, bit for bit (the same ``Arm.loss``, optimiser, learning-rate schedule
and dead-latent counters); the last ``n_kl = max(1, round(kl_frac * n))`` steps (at least one MSE step first) are
KL steps. The learning-rate schedule runs on unchanged: with the shipped profiles (decay_frac 0.2 > kl_frac 0.05)
the KL phase lies in the final linear decay. A KL step reads no harvested rows; it runs the frozen LM on
``contexts_per_step`` = round(batch_size / (T - 1 - first)) train contexts (at least one), about ``batch_size``
predictions, drawn by ``ContextSampler`` (seeded reshuffles of the train split's harvested contexts; a pure function
of the seed and the step, so a resumed run draws the same contexts).

A KL step, following the evaluation's splice rule (``gsae.evals``):

* clean pass once per step and context batch, shared by every SAE in the KL phase (``gsae.lm.clean_pass``: clean
  log-probabilities of the scored predictions first..T-2, the hook activation x, and g when an arm needs it);
* the rows are x at positions first..T-2, the rows a harvest keeps (position 0 keeps its clean activation when
  ``exclude_pos0``; position T-1 only changes the unscored last logits under causal attention, so it keeps its
  clean activation too, which leaves every scored logit as the evaluation's splice of first..T-1 gives it);
* rows whose norm exceeds ``max_norm`` (the training cap, ``train.max_norm_factor`` x the train median norm) stay
  out of the MSE term as they stay out of the MSE batches, and keep their clean activation in the splice; rows
  above ``clean_above`` (the evaluation's massive-activation cap when ``eval.massive`` is "clean") keep their clean
  activation in the splice;
* loss = FVU + aux_coef x AuxK on the reconstructed rows (the arm's own MSE loss) + kl_coef x the mean over the
  scored predictions of KL(p_clean || p_spliced) in nats; the backward runs through the LM blocks above the hook
  (their parameters frozen for the call, so they get no ``.grad``) into the SAE alone.

g for ``gsae_kl``: computed in the step's clean pass rather than read from the harvest. The clean pass is needed
anyway (clean logits and x); its gradient is the harvest's definition exactly (d of the summed next-token CE, sum
not mean, ``gsae.lm.clean_pass``), it needs no row-by-context lookup into the shards, and it is full float32 where
a harvest may store float16. Its cost is one backward through the blocks above the hook per KL step.

The weighting against the paper. Karvonen trains on a weighted sum of KL and MSE and balances the two terms
dynamically (the MSE in his units is far from O(1)); here the MSE term is the FVU (normalised MSE, O(0.1)) and the
KL is in nats per prediction (O(0.1) for a trained SAE), so a fixed ``kl_coef`` (default 1) weighs them comparably
without a running scale that a checkpoint would have to carry. ``kl_frac`` defaults to 0.05 ("the final ... few
percent" of the tokens in the paper).

Cost. The paper's "few percent more compute" counts against training on LM activations computed on the fly; gsae
trains on harvested rows, so a KL token (a clean forward of the whole LM plus a forward and backward above the hook)
costs far more than an MSE token. Measured on CPU (2 shared threads) at the default profile's shapes (SmolLM2-135M,
block 17, 64-token contexts, batch 1024, d_sae 4608): ~0.4 ms per MSE token against ~31-33 ms per KL token (~75x),
so kl_frac 0.05 makes an SAE's training ~4.5-5x the plain arm's (a harvest row costs ~15 ms on the same machine).
tests/test_kl_finetune.py prints the ratio on its tiny LM (~3-4x).
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..config import TrainConfig
from ..lm import CleanPass, clean_pass, frozen_params, kl_per_token, restart_layer, spliced_logits
from .gsae import GSAEArm
from .registry import LossTerms, register
from .topk import TopKArm


class KLData(NamedTuple):
    """What the KL phase needs besides the row stream."""

    model: Any
    """The frozen LM (a ``HookedTransformer``) on the training device."""
    hook_name: str
    tokens: Tensor
    """[n_ctx, T] int64: the train split's harvested contexts (any device; batches are moved to the LM's)."""
    exclude_pos0: bool = True
    """Position 0 keeps its clean activation and is not scored (the harvest's and the evaluation's rule)."""
    max_norm: float | None = None
    """Rows with a larger norm stay out of the MSE term and keep their clean activation in the splice."""
    clean_above: float | None = None
    """Rows with a larger norm keep their clean activation in the splice (the evaluation's massive rule)."""


class KLBatch(NamedTuple):
    """One KL step's contexts and their clean pass (shared by every SAE in its KL phase)."""

    data: KLData
    tokens: Tensor
    """[B, T] on the LM's device."""
    first: int
    clean: CleanPass


def kl_steps(n_steps: int, cfg: TrainConfig) -> int:
    """KL steps at the end of ``n_steps``: round(kl_frac x n_steps), at least one (kl_frac > 0), at most
    n_steps - 1 (step 0 is an MSE step: it sets b_dec from the first batch)."""
    if cfg.kl_frac <= 0 or n_steps < 2:
        return 0
    return min(n_steps - 1, max(1, round(cfg.kl_frac * n_steps)))


def contexts_per_step(batch_size: int, rows_per_ctx: int) -> int:
    """Contexts per KL step: the nearest whole number of contexts to ``batch_size`` scored predictions."""
    return max(1, round(batch_size / rows_per_ctx))


class ContextSampler:
    """Context indices of KL step j: the j-th slice of ``per_step`` of an endless sequence of seeded permutations of
    the ``n_ctx`` contexts (one per epoch). A pure function of (seed, j): resuming in the KL phase draws the same."""

    def __init__(self, n_ctx: int, per_step: int, seed: int):
        if n_ctx <= 0 or per_step <= 0:
            raise ValueError(f"need contexts and contexts per step, got n_ctx={n_ctx}, per_step={per_step}")
        self.n_ctx, self.per_step, self.seed = n_ctx, per_step, seed
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            key = int.from_bytes(hashlib.sha256(f"kl-contexts:{self.seed}:{epoch}".encode()).digest()[:8], "little")
            self._perms = {epoch: torch.randperm(self.n_ctx, generator=torch.Generator().manual_seed(key >> 1))}
        return self._perms[epoch]

    def __call__(self, j: int) -> Tensor:
        flat = torch.arange(j * self.per_step, (j + 1) * self.per_step)
        epochs, pos = flat // self.n_ctx, flat % self.n_ctx
        return torch.cat([self._perm(int(e))[pos[epochs == e]] for e in torch.unique(epochs).tolist()])


class KLPhase:
    """Draws each KL step's contexts and runs their clean pass once for every SAE in the KL phase."""

    def __init__(self, data: KLData, batch_size: int, seed: int):
        if data.tokens.dim() != 2:
            raise ValueError(f"KLData.tokens must be [n_ctx, T] token ids, got shape {tuple(data.tokens.shape)}")
        self.data = data
        self.first = int(data.exclude_pos0)
        self.rows_per_ctx = data.tokens.shape[1] - 1 - self.first
        if self.rows_per_ctx < 1:
            raise ValueError(f"contexts of {data.tokens.shape[1]} tokens leave no scored prediction")
        self.per_step = contexts_per_step(batch_size, self.rows_per_ctx)
        self.sampler = ContextSampler(data.tokens.shape[0], self.per_step, seed)

    @property
    def tokens_per_step(self) -> int:
        """Scored predictions (= rows) per KL step."""
        return self.per_step * self.rows_per_ctx

    def batch(self, j: int, gradients: set[str] = frozenset()) -> KLBatch:
        """KL step j's contexts and clean pass; ``gradients`` names the gradients the SAEs need ("g", "g_free")."""
        model = self.data.model
        device = next(iter(model.parameters())).device
        tok = self.data.tokens[self.sampler(j)].to(device)
        clean = clean_pass(model, tok, self.data.hook_name, self.first, need_grad=bool(gradients),
                           label_free="g_free" in gradients)
        return KLBatch(self.data, tok, self.first, clean)


def differentiable_splice(model: Any, tokens: Tensor, hook_name: str, first: int, x_clean: Tensor,
                          x_new: Tensor) -> Tensor:
    """Logits with the hook activation set to ``x_new`` at positions first..T-1, differentiable in ``x_new``:
    ``gsae.lm.spliced_logits``'s restart at the hook's block for a residual hook; otherwise a full forward whose
    hook returns the splice (``gsae.lm.patched_logits`` runs under no_grad)."""
    if restart_layer(model, hook_name) is not None:
        return spliced_logits(model, tokens, hook_name, first, x_clean, x_new)

    def patch(act: Tensor, hook: Any) -> Tensor:
        return torch.cat([act[:, :first], x_new[:, first:].to(act.dtype)], dim=1)

    return model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook_name, patch)], padding_side="right")


def kl_finetune_loss(arm: Any, sae: nn.Module, batch: KLBatch, dead_mask: Tensor | None, k_aux: int,
                     train: TrainConfig) -> LossTerms:
    """The KL step's loss (module docstring): FVU + aux_coef x AuxK + kl_coef x mean KL(clean || spliced), with the
    terms "fvu", "auxk" and "kl" (unweighted)."""
    data, first, clean = batch.data, batch.first, batch.clean
    T = batch.tokens.shape[1]
    param = next(iter(sae.parameters()))
    d = clean.x.shape[-1]
    x = clean.x[:, first:T - 1].reshape(-1, d).to(param.device, param.dtype)
    gmode = arm.gradient if getattr(sae, "uses_gradient", False) else None
    g = None if gmode is None else {"g": clean.g, "g_free": clean.g_free}[gmode]
    if gmode is not None and g is None:
        raise ValueError(f"the KL batch has no {gmode!r}: KLPhase.batch was not asked for it")
    g = None if g is None else g[:, first:T - 1].reshape(-1, d).to(param.device, param.dtype)
    norms = x.norm(dim=-1)
    keep = None if data.max_norm is None else norms <= data.max_norm
    if keep is None:
        out = sae(x, g, dead_mask=dead_mask, k_aux=k_aux)
        rows = out.x_hat
    else:
        out = sae(x[keep], None if g is None else g[keep], dead_mask=dead_mask, k_aux=k_aux)
        rows = x.clone()
        rows[keep] = out.x_hat
    if data.clean_above is not None:
        rows = torch.where(norms[:, None] > data.clean_above, x, rows)
    x_new = torch.cat([clean.x[:, :first], rows.reshape(-1, T - 1 - first, d).to(clean.x.dtype),
                       clean.x[:, T - 1:]], dim=1)
    with frozen_params(data.model):  # the graph holds no LM parameter: the backward reaches the SAE alone
        logits = differentiable_splice(data.model, batch.tokens, data.hook_name, first, clean.x, x_new)
        kl = kl_per_token(clean.logp, logits[:, first:T - 1]).mean()
    kl = kl.to(param.device)
    total = out.fvu + train.aux_coef * out.auxk_loss + train.kl_coef * kl
    return LossTerms(total, {"fvu": out.fvu, "auxk": out.auxk_loss, "kl": kl}, out.top_acts, out.top_indices)


class KLFineTune:
    """Mixin: an arm whose last ``train.kl_frac`` of steps are KL fine-tuning steps (``gsae.train`` asks
    ``kl_finetune``)."""

    kl_finetune = True
    sensitivity_variants: dict[str, dict[str, Any]] = {}
    legacy_architectures: tuple[str, ...] = ()

    def kl_loss(self, sae: nn.Module, batch: KLBatch, dead_mask: Tensor | None, k_aux: int,
                train: TrainConfig) -> LossTerms:
        return kl_finetune_loss(self, sae, batch, dead_mask, k_aux, train)


class TopKKLArm(KLFineTune, TopKArm):
    name = "topk_kl"
    label = "TopK + KL fine-tune"
    color = "#7f7f7f"


class GSAEKLArm(KLFineTune, GSAEArm):
    name = "gsae_kl"
    label = "g-SAE + KL fine-tune"
    color = "#ff7f0e"


register(TopKKLArm())
register(GSAEKLArm())
