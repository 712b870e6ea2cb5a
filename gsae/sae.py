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

Speed (CPU training): the only dense [N, d_sae] work is the forward pre-activation GEMM (plus, for the
g-SAE, the attribution GEMM) and the top-k. The k selected pre-activations enter autograd through
``_SelectedPreActs`` and the decoder through ``_SparseDecode``, whose backward passes touch only the
selected (token, latent) pairs: O(N k d_in) instead of the O(N d_sae d_in) of autograd through a dense
gather. Forward values are bit-for-bit those of the dense formulas; gradients equal them up to float
summation order (tests/test_sae.py checks both against the dense reference).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .config import SAEConfig

AUX_DENSE_MAX = 3
"""AuxK runs as dense GEMMs on the dead columns while n_dead <= AUX_DENSE_MAX * k_aux, else sparsely (k_aux
gathered rows per token). A gathered multiply-add costs several times a GEMM's; on the 2-core AVX2 dev machine
the two paths cost the same near n_dead = 3.5 k_aux (d_in 576, d_sae 4608, batch 1024)."""


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


# --------------------------------------------------------------------------------------------------
# Sparse kernels. A code is (idx [N, k], w [N, k]): row n holds weight w[n, j] at latent idx[n, j].
# --------------------------------------------------------------------------------------------------


def _stable_argsort(keys: Tensor, n_keys: int) -> Tensor:
    """Stable argsort of integer keys in [0, n_keys). On CPU through numpy's single-threaded radix sort (for
    16-bit keys): torch's parallel radix sort stalls on its OpenMP barriers whenever another process shares
    the cores, measured 1 ms -> 160 ms for 32k keys on 2 busy cores."""
    if keys.device.type != "cpu":
        return keys.sort(stable=True).indices
    small = np.int16 if n_keys <= np.iinfo(np.int16).max else np.int32
    return torch.from_numpy(np.argsort(keys.numpy().astype(small), kind="stable"))


class _Pattern:
    """Which (token, latent) pairs a code holds: idx [N, k], plus its latent-major regrouping, computed on
    first use and then shared (the encoder's and the decoder's backward both need it)."""

    def __init__(self, idx: Tensor, d_sae: int):
        self.idx, self.d_sae = idx, d_sae
        self._by_latent: tuple[Tensor, Tensor, Tensor] | None = None

    def by_latent(self) -> tuple[Tensor, Tensor, Tensor]:
        """(order, rows, offsets): ``order`` sorts the flat entries by latent (stable, so sums run in token
        order), ``rows`` is each sorted entry's token, ``offsets`` [d_sae] where each latent's run starts."""
        if self._by_latent is None:
            flat = self.idx.reshape(-1)
            order = _stable_argsort(flat, self.d_sae)
            rows = order.div(self.idx.shape[-1], rounding_mode="floor")
            offsets = torch.zeros(self.d_sae, dtype=torch.long, device=flat.device)
            offsets[1:] = torch.bincount(flat, minlength=self.d_sae).cumsum(0)[:-1]
            self._by_latent = order, rows, offsets
        return self._by_latent

    def scatter_rows(self, w: Tensor, V: Tensor) -> Tensor:
        """out[s] = sum over entries (n, j) with idx[n, j] = s of w[n, j] * V[n]  ([d_sae, D]).

        The transpose of an embedding_bag, computed as an embedding_bag over the latent-sorted entries, so it
        reads only the N*k chosen rows (autograd's own embedding_bag backward is several times slower)."""
        order, rows, offsets = self.by_latent()
        return F.embedding_bag(rows, V, offsets, per_sample_weights=w.reshape(-1)[order], mode="sum")


def _sampled_dots(U: Tensor, E: Tensor, idx: Tensor) -> Tensor:
    """out[n, j] = U[n] . E[idx[n, j]]  ([N, k]): the entries of U @ E.T a code needs, without the dense product."""
    n, k = idx.shape
    if U.dtype in (torch.float32, torch.float64):
        with warnings.catch_warnings():  # "sparse CSR is beta": the op is exercised by tests/test_sae.py
            warnings.simplefilter("ignore", UserWarning)
            crow = torch.arange(0, n * k + 1, k, device=idx.device)
            pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), U.new_zeros(n * k), size=(n, E.shape[0]),
                                              check_invariants=False)
            return torch.sparse.sampled_addmm(pattern, U, E.T, beta=0.0).values().reshape(n, k)
    out = U.new_empty(n, k)  # half precision: no sparse kernel, so gather in chunks of ~4M elements
    step = max(1, (1 << 22) // max(1, k * U.shape[1]))
    for a in range(0, n, step):
        out[a:a + step] = (E[idx[a:a + step]] * U[a:a + step, None, :]).sum(-1)
    return out


class _SelectedPreActs(torch.autograd.Function):
    """The selected pre-activations z[n, idx[n, j]] of z = (x - b_dec) @ W_enc + b_enc, given their values.

    Forward returns ``values`` (gathered from the dense z the selection already computed, so bit-identical);
    backward reaches W_enc and b_enc through the chosen columns only. b_dec's gradient needs no per-token
    pass: sum_n dL/dx_c[n] = W_enc @ dL/db_enc, since both sum the same entries."""

    @staticmethod
    def forward(ctx, values: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                pattern: _Pattern) -> Tensor:
        ctx.save_for_backward(x - b_dec, W_enc)
        ctx.pattern = pattern
        return values.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x_c, W_enc = ctx.saved_tensors
        idx = ctx.pattern.idx
        grad = grad.contiguous()
        g_x = g_W = g_b_enc = g_b_dec = None
        if ctx.needs_input_grad[1]:
            g_x = F.embedding_bag(idx, W_enc.T.contiguous(), per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[2]:
            g_W = ctx.pattern.scatter_rows(grad, x_c).T.contiguous()
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            g_b_enc = grad.new_zeros(W_enc.shape[1]).index_add_(0, idx.reshape(-1), grad.reshape(-1))
            g_b_dec = -(W_enc @ g_b_enc) if ctx.needs_input_grad[4] else None
        return None, g_x, g_W, g_b_enc, g_b_dec, None


class _ColumnPreActs(torch.autograd.Function):
    """The pre-activation columns z[:, cols] given their values; backward through those columns only, as dense
    GEMMs of width len(cols) (AuxK with few dead latents: GEMM speed beats gathering k_aux rows per token)."""

    @staticmethod
    def forward(ctx, values: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                cols: Tensor) -> Tensor:
        ctx.save_for_backward(x - b_dec, W_enc, cols)
        return values.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x_c, W_enc, cols = ctx.saved_tensors
        g_x = g_W = g_b_enc = g_b_dec = None
        W_cols = W_enc.index_select(1, cols) if (ctx.needs_input_grad[1] or ctx.needs_input_grad[4]) else None
        if ctx.needs_input_grad[1]:
            g_x = grad @ W_cols.T
        if ctx.needs_input_grad[2]:
            g_W = torch.zeros_like(W_enc).index_copy_(1, cols, x_c.T @ grad)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            g_cols = grad.sum(0)
            g_b_enc = grad.new_zeros(W_enc.shape[1]).index_copy_(0, cols, g_cols)
            g_b_dec = -(W_cols @ g_cols) if ctx.needs_input_grad[4] else None
        return None, g_x, g_W, g_b_enc, g_b_dec, None


class _SparseDecode(torch.autograd.Function):
    """sum_j w[n, j] * W_dec[idx[n, j]] ([N, d_in], no bias) with a backward over the chosen rows only."""

    @staticmethod
    def forward(ctx, w: Tensor, pattern: _Pattern, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(w, W_dec)
        ctx.pattern = pattern
        return F.embedding_bag(pattern.idx, W_dec, per_sample_weights=w, mode="sum")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        w, W_dec = ctx.saved_tensors
        grad = grad.contiguous()
        g_w = _sampled_dots(grad, W_dec, ctx.pattern.idx) if ctx.needs_input_grad[0] else None
        g_W = ctx.pattern.scatter_rows(w, grad) if ctx.needs_input_grad[2] else None
        return g_w, None, g_W


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

    @property
    def uses_gradient(self) -> bool:
        """Whether a gradient changes the code (beta > 0): only then do g-encode and plain-encode differ."""
        return self.cfg.beta > 0

    # ----------------------------------------------------------------------------- encode / decode
    def pre_acts(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def _attribution(self, g: Tensor, dtype: torch.dtype) -> Tensor:
        """|g~ W_dec^T| ([..., d_sae]), without gradient (the score's gain is a constant)."""
        with torch.no_grad():
            return (scale_grad(g.to(dtype), self.cfg) @ self.W_dec.T).abs_()

    def selection_score(self, z: Tensor, g: Tensor | None) -> Tensor:
        """s = z + beta z |g~ W_dec^T|; s is z itself when beta = 0 or g is None (plain TopK)."""
        if g is None or self.cfg.beta == 0:
            return z
        return z + self.cfg.beta * z * self._attribution(g, z.dtype)

    def _select(self, x: Tensor, g: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(z, idx, top_s, attr) for flat x [N, d_in]: z keeps its autograd graph (for callers of ``pre_acts``);
        the selection itself is computed without one, since top-k is not differentiable."""
        # pre_acts' expression (bit-identical to SAELens); the in-place bias add saves a [N, d_sae] buffer.
        z = ((x - self.b_dec) @ self.W_enc).add_(self.b_enc)
        attr = None
        with torch.no_grad():
            s = z.detach()
            if g is not None and self.cfg.beta != 0:
                attr = self._attribution(g, z.dtype)
                s = s * self.cfg.beta  # s + beta * s * attr, in place: the same rounding, fewer buffers
                s.mul_(attr).add_(z.detach())
            top_s, idx = s.topk(self.cfg.k, dim=-1, sorted=False)
        return z, idx, top_s, attr

    def _selected_pre_acts(self, x: Tensor, z: Tensor, pattern: _Pattern) -> Tensor:
        """z gathered at the pattern's indices; differentiable (sparse backward) when z is."""
        values = z.detach().gather(-1, pattern.idx)
        if not z.requires_grad:
            return values
        return _SelectedPreActs.apply(values, x, self.W_enc, self.b_enc, self.b_dec, pattern)

    def _encode_flat(self, x: Tensor, g: Tensor | None) -> tuple[Tensor, Tensor, _Pattern]:
        """(top_acts, z, pattern) for x, g of shape [N, d_in]."""
        z, idx, top_s, attr = self._select(x, g)
        pattern = _Pattern(idx, self.cfg.d_sae)
        if not z.requires_grad:
            vals = top_s if (attr is None or self.cfg.value_mode == "score") else z.gather(-1, idx)
        else:
            vals = self._selected_pre_acts(x, z, pattern)
            if attr is not None and self.cfg.value_mode == "score":
                vals = vals + self.cfg.beta * vals * attr.gather(-1, idx)  # the score's formula, entry by entry
        return F.relu(vals), z, pattern

    def encode(self, x: Tensor, g: Tensor | None = None) -> EncoderOutput:
        """Sparse code of ``x`` ([..., d_in]). With ``g`` ("g-encode") the gradient helps choose the k
        latents; without it ("plain-encode") this is TopK."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"expected activations with last dim d_in={self.cfg.d_in}, got shape {tuple(x.shape)}")
        if g is not None and g.shape != x.shape:
            raise ValueError(f"gradient shape {tuple(g.shape)} must equal activation shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        d = self.cfg.d_in
        acts, z, pattern = self._encode_flat(x.reshape(-1, d), None if g is None else g.reshape(-1, d))
        return EncoderOutput(acts.reshape(*lead, self.cfg.k), pattern.idx.reshape(*lead, self.cfg.k),
                             z.reshape(*lead, self.cfg.d_sae))

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """x_hat from the sparse code; a gather-and-sum over k rows of W_dec (embedding_bag), never a dense
        [.., d_sae] product, forward or backward."""
        lead = top_acts.shape[:-1]
        pattern = _Pattern(top_indices.reshape(-1, top_indices.shape[-1]), self.cfg.d_sae)
        flat_val = top_acts.reshape(-1, top_acts.shape[-1]).to(self.W_dec.dtype)
        return (_SparseDecode.apply(flat_val, pattern, self.W_dec) + self.b_dec).reshape(*lead, self.cfg.d_in)

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
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"expected activations with last dim d_in={self.cfg.d_in}, got shape {tuple(x.shape)}")
        if g is not None and g.shape != x.shape:
            raise ValueError(f"gradient shape {tuple(g.shape)} must equal activation shape {tuple(x.shape)}")
        lead, d = x.shape[:-1], self.cfg.d_in
        x_flat = x.reshape(-1, d)
        top_acts, z, pattern = self._encode_flat(x_flat, None if g is None else g.reshape(-1, d))
        x_hat = (_SparseDecode.apply(top_acts.to(self.W_dec.dtype), pattern, self.W_dec) + self.b_dec).reshape(x.shape)
        denom = (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
        fvu = (x_hat - x).pow(2).sum() / denom
        auxk = x.new_zeros(())
        if dead_mask is not None and k_aux > 0 and bool(dead_mask.any()):
            resid = (x - x_hat).detach()
            # No b_dec in the auxiliary reconstruction: it is already in the residual.
            resid_hat = self._auxk_reconstruction(x_flat, z, dead_mask, k_aux).reshape(x.shape)
            auxk = (resid_hat - resid).pow(2).sum() / (resid - resid.mean(0)).pow(2).sum().clamp_min(
                torch.finfo(x.dtype).tiny)
            auxk = torch.nan_to_num(auxk, nan=0.0)
        k = self.cfg.k
        return ForwardOutput(x_hat, top_acts.reshape(*lead, k), pattern.idx.reshape(*lead, k), fvu, auxk)

    def _auxk_reconstruction(self, x: Tensor, z: Tensor, dead_mask: Tensor, k_aux: int) -> Tensor:
        """sum of W_dec rows over the top min(k_aux, n_dead) dead latents of each token, weighted by ReLU(z).

        Only dead columns are searched. Few dead latents (n_dead <= AUX_DENSE_MAX * k_aux): dense GEMMs on
        the dead columns; many: the same sparse path as the main code, with k_aux latents per token."""
        dead = dead_mask.nonzero().squeeze(1)
        with torch.no_grad():
            z_dead = z.detach().index_select(-1, dead)
            top = None if len(dead) <= k_aux else z_dead.topk(k_aux, dim=-1, sorted=False).indices
        if len(dead) <= AUX_DENSE_MAX * k_aux:
            pre = (_ColumnPreActs.apply(z_dead, x, self.W_enc, self.b_enc, self.b_dec, dead) if z.requires_grad
                   else z_dead)
            acts = F.relu(pre)
            if top is not None:  # zero all but each token's top k_aux dead latents
                acts = acts * torch.zeros_like(z_dead).scatter_(-1, top, 1.0)
            return acts @ self.W_dec.index_select(0, dead)
        aux_idx = dead.expand(len(z), len(dead)).contiguous() if top is None else dead[top]
        pattern = _Pattern(aux_idx, self.cfg.d_sae)
        return _SparseDecode.apply(F.relu(self._selected_pre_acts(x, z, pattern)), pattern, self.W_dec)

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


# --------------------------------------------------------------------------------------------------
# How much the gradient changes the selection
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def selected_latents(sae: GSAE, x: Tensor, g: Tensor | None, beta: float | None = None) -> Tensor:
    """[N, k] indices the g-SAE rule selects for the rows ``x`` [N, d_in] with gradient ``g`` at ``beta`` (the SAE's
    own by default; its grad_norm and grad_scale either way): ``sae.encode(x, g).top_indices`` at the SAE's beta
    (the same arithmetic), TopK(z) at beta = 0 or without ``g``."""
    beta = sae.cfg.beta if beta is None else float(beta)
    x = x.reshape(-1, sae.cfg.d_in)
    s = z = ((x - sae.b_dec) @ sae.W_enc).add_(sae.b_enc)
    if g is not None and beta != 0:
        s = z * beta  # GSAE._select's in-place s + beta * s * attr: the same rounding
        s.mul_(sae._attribution(g.reshape(-1, sae.cfg.d_in), z.dtype)).add_(z)
    return s.topk(sae.cfg.k, dim=-1, sorted=False).indices


def changed_count(selected: Tensor, reference: Tensor) -> Tensor:
    """[N] how many of the k indices in each row of ``selected`` [N, k] are NOT in that row of ``reference`` [N, k]
    (index sets: the order within a row does not matter)."""
    return (~(selected[:, :, None] == reference[:, None, :]).any(-1)).sum(-1)


@torch.no_grad()
def selection_changed_share(sae: GSAE, x: Tensor, g: Tensor, beta: float | None = None, chunk: int = 4096) -> float:
    """Mean over the rows of ``x`` of the share of the k latents the g-SAE rule selects with ``g`` at ``beta`` (the
    SAE's own by default) that plain TopK(z) does not select: 0 at beta = 0, and 1 when the gradient replaces every
    latent. Chunked, so any number of rows fits; for drawing the share against beta on the same weights."""
    x, g = x.reshape(-1, sae.cfg.d_in), g.reshape(-1, sae.cfg.d_in)
    changed = 0
    for i in range(0, len(x), chunk):
        xb, gb = x[i:i + chunk], g[i:i + chunk]
        changed += int(changed_count(selected_latents(sae, xb, gb, beta), selected_latents(sae, xb, None)).sum())
    return changed / (len(x) * sae.cfg.k) if len(x) else float("nan")
