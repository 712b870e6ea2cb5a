"""TopK and gradient-aware TopK (g-SAE) sparse autoencoders: one module, one code path.

Shapes follow SAELens so the weights load there unchanged: ``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]`` (rows are unit-norm dictionary directions), ``b_enc [d_sae]``, ``b_dec [d_in]``.

    z = (x - b_dec) @ W_enc + b_enc                    (SAELens apply_b_dec_to_input=True; Gao's b_pre)
    s = z + beta * z * |g~ @ W_dec.T|                  (g~ = g scaled as SAEConfig.grad_norm says)
    idx = topk(s, k);  values = ReLU(z[idx]) ("z") or ReLU(s[idx]) ("score")
    x_hat = sum_j values_j * W_dec[idx_j] + b_dec

With beta = 0, or with no gradient given ("plain-encode"), s is z itself, so the module *is* a TopK SAE.
The attribution |g~ @ W_dec.T| is computed under no_grad: the selection is not differentiable, and in
"score" mode the gradient weighting acts as a fixed gain (stop-gradient through W_dec in the score).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SAEConfig


class EncoderOutput(NamedTuple):
    top_acts: Tensor
    """[..., k] values passed to the decoder (>= 0)."""
    top_indices: Tensor
    """[..., k] latent indices (int64)."""
    pre_acts: Tensor
    """[..., d_sae] encoder pre-activations z (needed by AuxK)."""


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    top_acts: Tensor
    top_indices: Tensor
    fvu: Tensor
    """Normalised MSE: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the batch (the training loss)."""
    auxk_loss: Tensor
    """AuxK loss (Gao et al.), normalised like ``fvu``; 0 when no latent is dead."""


def scale_grad(g: Tensor, cfg: SAEConfig) -> Tensor:
    """The gradient as the selection score uses it (see ``SAEConfig.grad_norm``)."""
    if cfg.grad_norm == "token":
        rms = g.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(torch.finfo(g.dtype).tiny)
        return g / rms
    return g * cfg.grad_scale


class GSAE(nn.Module):
    """A TopK SAE whose k latents are chosen by s = z + beta z |W_dec g| when a gradient is given."""

    def __init__(self, cfg: SAEConfig, seed: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        # Decoder rows: random unit directions; encoder initialised as the decoder's transpose
        # (Gao et al.), so at init each latent reads along the direction it writes.
        w = torch.randn(cfg.d_sae, cfg.d_in, generator=gen, dtype=dtype)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        # b_dec starts at 0 and is set to the mean of the first training batch by ``init_b_dec``
        # (both arms see the same first batch, so both start from the same b_dec).
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))

    # ----------------------------------------------------------------------------- encode / decode
    def pre_acts(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def selection_score(self, z: Tensor, g: Tensor | None) -> Tensor:
        """s = z + beta z |g~ W_dec^T|; s is z itself when beta = 0 or g is None (plain TopK)."""
        if g is None or self.cfg.beta == 0:
            return z
        with torch.no_grad():
            attr = (scale_grad(g.to(z.dtype), self.cfg) @ self.W_dec.T).abs_()
        return z + self.cfg.beta * z * attr

    def encode(self, x: Tensor, g: Tensor | None = None) -> EncoderOutput:
        """Sparse code of ``x`` ([..., d_in]). With ``g`` ("g-encode") the gradient helps choose the k
        latents; without it ("plain-encode") this is TopK."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"expected activations with last dim d_in={self.cfg.d_in}, got shape {tuple(x.shape)}")
        if g is not None and g.shape != x.shape:
            raise ValueError(f"gradient shape {tuple(g.shape)} must equal activation shape {tuple(x.shape)}")
        z = self.pre_acts(x)
        s = self.selection_score(z, g)
        top_s, idx = s.topk(self.cfg.k, dim=-1, sorted=False)
        vals = top_s if (s is z or self.cfg.value_mode == "score") else z.gather(-1, idx)
        return EncoderOutput(F.relu(vals), idx, z)

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """x_hat from the sparse code; a gather-and-sum over k rows of W_dec (embedding_bag), never a dense
        [.., d_sae] product."""
        lead = top_acts.shape[:-1]
        flat_idx = top_indices.reshape(-1, top_indices.shape[-1])
        flat_val = top_acts.reshape(-1, top_acts.shape[-1]).to(self.W_dec.dtype)
        out = F.embedding_bag(flat_idx, self.W_dec, per_sample_weights=flat_val, mode="sum")
        return (out + self.b_dec).reshape(*lead, self.cfg.d_in)

    def decode_dense(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """Reference decoder: scatter into a dense [.., d_sae] code, then matmul (for tests)."""
        dense = torch.zeros(*top_acts.shape[:-1], self.cfg.d_sae, dtype=self.W_dec.dtype)
        dense.scatter_(-1, top_indices, top_acts.to(self.W_dec.dtype))
        return dense @ self.W_dec + self.b_dec

    def to_dense(self, enc: EncoderOutput) -> Tensor:
        """The [..., d_sae] latent activations (zeros outside the top k)."""
        dense = torch.zeros_like(enc.pre_acts)
        return dense.scatter_(-1, enc.top_indices, enc.top_acts)

    # ----------------------------------------------------------------------------- training forward
    def forward(self, x: Tensor, g: Tensor | None = None, dead_mask: Tensor | None = None,
                k_aux: int = 0) -> ForwardOutput:
        """Reconstruct ``x`` ([N, d_in]) and return the training losses.

        ``dead_mask`` ([d_sae] bool) switches on AuxK: the residual x - x_hat (detached) is reconstructed
        from the top ``k_aux`` pre-activations among dead latents (Gao et al. 2024, appendix A.2)."""
        enc = self.encode(x, g)
        x_hat = self.decode(enc.top_acts, enc.top_indices)
        denom = (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
        fvu = (x_hat - x).pow(2).sum() / denom
        auxk = x.new_zeros(())
        if dead_mask is not None and k_aux > 0 and bool(dead_mask.any()):
            kk = min(k_aux, int(dead_mask.sum()))
            masked = enc.pre_acts.masked_fill(~dead_mask, -torch.inf)
            aux_vals, aux_idx = masked.topk(kk, dim=-1, sorted=False)
            resid = (x - x_hat).detach()
            resid_hat = self.decode(F.relu(aux_vals), aux_idx) - self.b_dec
            auxk = (resid_hat - resid).pow(2).sum() / (resid - resid.mean(0)).pow(2).sum().clamp_min(
                torch.finfo(x.dtype).tiny)
            auxk = torch.nan_to_num(auxk, nan=0.0)
        return ForwardOutput(x_hat, enc.top_acts, enc.top_indices, fvu, auxk)

    # ----------------------------------------------------------------------------- constraints
    @torch.no_grad()
    def init_b_dec(self, x: Tensor) -> None:
        self.b_dec.copy_(x.reshape(-1, self.cfg.d_in).mean(0))

    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder(self) -> None:
        """Project out of W_dec.grad the component along each (unit) row, so a step keeps rows near unit norm."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec
