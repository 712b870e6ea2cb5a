"""Interpretability measures (claim C4): single-latent sparse probing on token labels, and a latent browser.

Sparse probing. For each class c (e.g. a Brown POS tag) and each latent j, the latent's activation is used
as the score of a one-vs-rest classifier over the labelled tokens (label >= 0); its ROC AUC is the
Mann-Whitney statistic with ties counted as 1/2:

    AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg),   R_pos = sum of the positives' average ranks.

The class's score is the best latent's AUC, used as is (a latent that fires on the class has AUC > 0.5; an
AUC below 0.5 is not flipped, because "fires LESS on the class" is not what a monosemantic latent means).

Efficiency. SAE codes are sparse: most of a latent's activations are exactly 0, one big tie. The ranks are
computed only over the nonzero entries: a latent with m nonzero values among N tokens gives each of its
N - m zeros the average rank (N - m + 1) / 2 and its nonzero values ranks N - m + (rank among the nonzeros).
Sorting the nonzero entries by (latent, value) once yields every latent's ranks at O(nnz log nnz); a latent
that never fires gets AUC exactly 0.5 with no work. Sums are in float64, exact for these sizes (ranks are
half-integers).

Latent browser. ``latent_cards`` renders, for each latent, its firing frequency and its top-activating
tokens in their context windows, as Markdown (display with ``IPython.display.Markdown``).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

# Activations: dense [N, d_sae], or the SAE's sparse code (top_acts [N, k], top_indices [N, k], d_sae).
SparseActs = tuple[Tensor, Tensor, int]
Acts = Tensor | SparseActs

DENSE_BLOCK_ELEMENTS = 1 << 24
"""Dense activations are converted to sparse entries this many matrix elements at a time (bounded memory)."""


class ProbeResult(NamedTuple):
    classes: tuple[int, ...]
    """Class ids, in the order asked for."""
    auc: Tensor
    """[C] float64: AUC of the best single latent for each class."""
    best_latent: Tensor
    """[C] int64: index of that latent (the lowest index among equal AUCs)."""
    n_pos: Tensor
    """[C] int64: tokens of the class among the labelled tokens."""
    n_tokens: int
    """Labelled tokens scored (label >= 0): n_pos + n_neg for every class."""
    mean_auc: float
    """Mean of ``auc`` over the classes (the C4 metric)."""
    all_auc: Tensor
    """[C, d_sae] float64: every latent's AUC for every class (0.5 for latents that never fire)."""


# ------------------------------------------------------------------------------------------------ inputs
def _check_sparse(acts: SparseActs, n_rows: int | None) -> SparseActs:
    if len(acts) != 3:
        raise ValueError("sparse activations must be a tuple (top_acts [N, k], top_indices [N, k], d_sae)")
    top_acts, top_indices, d_sae = acts
    if top_acts.dim() != 2 or top_acts.shape != top_indices.shape:
        raise ValueError(f"top_acts and top_indices must both be [N, k], got {tuple(top_acts.shape)} and "
                         f"{tuple(top_indices.shape)}")
    if top_indices.numel() and (int(top_indices.min()) < 0 or int(top_indices.max()) >= int(d_sae)):
        raise ValueError(f"top_indices must lie in 0..d_sae-1 = {int(d_sae) - 1}")
    nonzero = top_acts != 0
    if nonzero.any():
        # A latent listed twice in one row would make its activation ambiguous.
        masked = torch.where(nonzero, top_indices, -1 - torch.arange(top_indices.shape[1]))
        s = masked.sort(dim=1).values
        if (s[:, 1:] == s[:, :-1]).any():
            raise ValueError("a row of top_indices lists the same latent twice with a nonzero activation")
    _check_values(top_acts)
    if n_rows is not None and top_acts.shape[0] != n_rows:
        raise ValueError(f"activations have {top_acts.shape[0]} rows but labels/metadata have {n_rows}")
    return top_acts, top_indices, int(d_sae)


def _check_values(values: Tensor) -> None:
    if not values.is_floating_point():
        raise ValueError(f"activations must be floating point, got {values.dtype}")
    if values.numel() and not bool(torch.isfinite(values).all()):
        raise ValueError("activations contain NaN or inf")
    if values.numel() and float(values.min()) < 0:
        raise ValueError("activations must be >= 0 (SAE codes after ReLU); the zero-tie shortcut assumes it")


def _dense_or_sparse(acts: Acts, n_rows: int) -> tuple[Tensor | None, SparseActs | None, int]:
    if isinstance(acts, Tensor):
        if acts.dim() != 2 or acts.shape[0] != n_rows:
            raise ValueError(f"dense activations must be [N={n_rows}, d_sae], got shape {tuple(acts.shape)}")
        return acts, None, acts.shape[1]
    sparse = _check_sparse(acts, n_rows)
    return None, sparse, sparse[2]


# ------------------------------------------------------------------------------------------------ AUC
def _rank_sums(rows: Tensor, lats: Tensor, vals: Tensor, n_lat: int, n: int, row_class: Tensor,
               n_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """From the nonzero entries (row, latent, value) of an [n, n_lat] block: per latent its nonzero count
    [n_lat], and per (class, latent) the sum of the positives' nonzero-entry ranks and their count [C, n_lat].

    Ranks are over all n tokens (zeros included), ties averaged."""
    order = torch.argsort(vals, stable=True)
    order = order[torch.argsort(lats[order], stable=True)]  # by latent, then value
    rows, lats, vals = rows[order], lats[order], vals[order]
    m = vals.numel()
    count = torch.bincount(lats, minlength=n_lat)
    offset = torch.cumsum(count, 0) - count  # first entry of each latent in the sorted list
    idx = torch.arange(m)
    new_group = torch.ones(m, dtype=torch.bool)
    new_group[1:] = (lats[1:] != lats[:-1]) | (vals[1:] != vals[:-1])
    last_of_group = torch.ones(m, dtype=torch.bool)
    last_of_group[:-1] = new_group[1:]
    start = torch.cummax(torch.where(new_group, idx, 0), 0).values
    end = torch.cummin(torch.where(last_of_group, idx, m).flip(0), 0).values.flip(0)
    avg_in_latent = (start + end).double() / 2 - offset[lats].double() + 1  # 1-based rank among the nonzeros
    rank = (n - count[lats]).double() + avg_in_latent  # the latent's zeros rank below every nonzero value

    cls = row_class[rows]
    keep = cls >= 0
    key = cls[keep] * n_lat + lats[keep]
    rank_sum = torch.zeros(n_classes * n_lat, dtype=torch.float64).index_add_(0, key, rank[keep])
    pos_nonzero = torch.bincount(key, minlength=n_classes * n_lat)
    return count, rank_sum.view(n_classes, n_lat), pos_nonzero.view(n_classes, n_lat)


def best_latent_auc(acts: Acts, labels: Tensor, classes: Sequence[int]) -> ProbeResult:
    """Best single-latent one-vs-rest AUC for each of ``classes`` over the tokens with ``labels >= 0``.

    ``acts``: dense [N, d_sae] (>= 0) or the sparse code ``(top_acts [N, k], top_indices [N, k], d_sae)``;
    ``labels``: [N] integer class ids, -1 (any negative) = unlabelled, ignored. See the module docstring."""
    if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be a 1-D integer tensor [N], got {tuple(labels.shape)} {labels.dtype}")
    classes = tuple(int(c) for c in classes)
    if not classes or len(set(classes)) != len(classes) or min(classes) < 0:
        raise ValueError(f"classes must be distinct class ids >= 0, got {classes}")
    dense, sparse, d_sae = _dense_or_sparse(acts, labels.shape[0])
    labels = labels.detach().cpu().long()
    valid = labels >= 0
    lab = labels[valid]
    n = lab.numel()
    n_pos = torch.tensor([int((lab == c).sum()) for c in classes], dtype=torch.int64)
    bad = [c for c, p in zip(classes, n_pos.tolist(), strict=True) if p == 0 or p == n]
    if bad:
        raise ValueError(f"classes {bad} have no positive or no negative labelled token, so their AUC is "
                         f"undefined; choose classes with frequent_classes(labels, min_count, max_n)")
    # Every asked-for class occurs in ``lab`` (checked above), so its id is <= lab.max().
    class_index = torch.full((int(lab.max()) + 1,), -1, dtype=torch.int64)
    class_index[torch.tensor(classes)] = torch.arange(len(classes))
    row_class = class_index[lab]  # position of each token's class in ``classes``, -1 for the rest
    C = len(classes)

    count = torch.zeros(d_sae, dtype=torch.int64)
    rank_sum = torch.zeros(C, d_sae, dtype=torch.float64)
    pos_nonzero = torch.zeros(C, d_sae, dtype=torch.int64)
    if sparse is not None:
        top_acts, top_indices, _ = sparse
        v, i = top_acts.detach().cpu()[valid], top_indices.detach().cpu().long()[valid]
        r, k = torch.nonzero(v, as_tuple=True)
        count, rank_sum, pos_nonzero = _rank_sums(r, i[r, k], v[r, k].double(), d_sae, n, row_class, C)
    else:
        x = dense.detach().cpu()[valid]
        _check_values(x)
        block = max(1, DENSE_BLOCK_ELEMENTS // max(n, 1))
        for j0 in range(0, d_sae, block):
            r, j = torch.nonzero(x[:, j0:j0 + block], as_tuple=True)
            width = min(block, d_sae - j0)
            c_b, s_b, p_b = _rank_sums(r, j, x[r, j0 + j].double(), width, n, row_class, C)
            count[j0:j0 + width], rank_sum[:, j0:j0 + width], pos_nonzero[:, j0:j0 + width] = c_b, s_b, p_b

    n_zero = (n - count).double()
    pos = n_pos[:, None].double()
    # Positives that are zero for latent j share the zero block's average rank (n_zero + 1) / 2.
    r_pos = rank_sum + (pos - pos_nonzero.double()) * (n_zero[None, :] + 1) / 2
    all_auc = (r_pos - pos * (pos + 1) / 2) / (pos * (n - pos))
    best_auc, best = all_auc.max(dim=1)  # first index among ties
    return ProbeResult(classes=classes, auc=best_auc, best_latent=best, n_pos=n_pos, n_tokens=n,
                       mean_auc=float(best_auc.mean()), all_auc=all_auc)


def held_out_auc(choose: ProbeResult, score: ProbeResult) -> float:
    """Mean over classes of the AUC, on ``score``'s tokens, of the latent that is best on ``choose``'s tokens (e.g.
    chosen on the validation split, scored on the test split), so the pick is not scored on the tokens it was
    picked on. Classes absent from ``choose`` are left out."""
    where = {c: i for i, c in enumerate(choose.classes)}
    aucs = [float(score.all_auc[j, int(choose.best_latent[where[c]])])
            for j, c in enumerate(score.classes) if c in where]
    if not aucs:
        raise ValueError("no class is probed on both splits; lower probing.min_tag_count")
    return sum(aucs) / len(aucs)


def frequent_classes(labels: Tensor, min_count: int, max_n: int) -> list[int]:
    """Class ids (labels >= 0) with at least ``min_count`` tokens, most frequent first (ties: lower id first),
    at most ``max_n`` of them."""
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {tuple(labels.shape)}")
    if max_n < 0:
        raise ValueError(f"max_n must be >= 0, got {max_n}")
    lab = labels.detach().cpu().long()
    lab = lab[lab >= 0]
    if lab.numel() == 0:
        return []
    counts = torch.bincount(lab)
    order = torch.argsort(-counts, stable=True)
    return [int(c) for c in order.tolist() if counts[c] >= max(min_count, 1)][:max_n]


# ------------------------------------------------------------------------------------------------ browser
_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}|~$#])")


def escape_markdown(text: str) -> str:
    """Text safe inside a Markdown table cell (Jupyter): HTML entities for &<>, backslash before Markdown /
    LaTeX specials, visible symbols for newlines and tabs (a raw newline would end the table row)."""
    text = _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))
    return text.replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "⏎").replace("\t", "⇥")


def _mark(token: str) -> str:
    """**[[token]]** with the token's surrounding spaces moved outside the marker (so " the" reads
    " **[[the]]**", and the bold renders); an all-space token shows as ␣."""
    core = token.strip(" ")
    lead, trail = token[:len(token) - len(token.lstrip(" "))], token[len(token.rstrip(" ")):]
    return f"{lead}**[[{core}]]**{trail}" if core else "**[[␣]]**"


def _column_getter(acts: Acts | Callable[[int], Tensor], n_rows: int) -> Callable[[int], Tensor]:
    if callable(acts) and not isinstance(acts, Tensor):
        return lambda j: acts(j).detach().cpu().double().flatten()
    dense, sparse, d_sae = _dense_or_sparse(acts, n_rows)

    def column(j: int) -> Tensor:
        if not 0 <= j < d_sae:
            raise ValueError(f"latent {j} is out of range for d_sae={d_sae}")
        if dense is not None:
            return dense[:, j].detach().cpu().double()
        top_acts, top_indices, _ = sparse
        r, k = torch.nonzero(top_indices.cpu() == j, as_tuple=True)
        col = torch.zeros(n_rows, dtype=torch.float64)
        col[r] = top_acts.detach().cpu()[r, k].double()
        return col

    return column


def checked_row_index(row_ctx: Tensor, row_pos: Tensor, context_tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(row_ctx, row_pos, context_tokens) as CPU int64, after checking every row points inside the contexts."""
    row_ctx, row_pos, ctx_tok = row_ctx.cpu().long(), row_pos.cpu().long(), context_tokens.cpu().long()
    n_ctx, T = ctx_tok.shape
    if row_ctx.numel() and (int(row_ctx.min()) < 0 or int(row_ctx.max()) >= n_ctx or int(row_pos.min()) < 0
                            or int(row_pos.max()) >= T):
        raise ValueError(f"row_ctx / row_pos point outside context_tokens [{n_ctx}, {T}]; pass the contexts "
                         f"the harvest was built from")
    return row_ctx, row_pos, ctx_tok


def latent_cards(latent_ids: Sequence[int], acts: Acts | Callable[[int], Tensor], row_ctx: Tensor, row_pos: Tensor,
                 context_tokens: Tensor, tokenizer: Any, n_examples: int = 8, window: int = 12,
                 after: int = 4) -> str:
    """Markdown cards, one per latent: firing frequency and the ``n_examples`` top-activating tokens.

    ``acts``: dense [N, d_sae], sparse ``(top_acts, top_indices, d_sae)``, or a function latent -> [N] column.
    Row r of ``acts`` is token ``context_tokens[row_ctx[r], row_pos[r]]`` (the harvest's ``ctx_index`` and
    ``pos``). Each example shows ``window`` tokens before and ``after`` tokens after the activating token,
    which is marked **[[like this]]**, with its activation. Examples are ordered by activation, ties by row;
    only rows where the latent fires (> 0) are shown. Text is decoded with ``tokenizer.decode`` and escaped."""
    if row_ctx.dim() != 1 or row_ctx.shape != row_pos.shape:
        raise ValueError(f"row_ctx and row_pos must be 1-D of equal length, got {tuple(row_ctx.shape)} "
                         f"and {tuple(row_pos.shape)}")
    if context_tokens.dim() != 2:
        raise ValueError(f"context_tokens must be [n_ctx, T], got shape {tuple(context_tokens.shape)}")
    if n_examples < 1 or window < 0 or after < 0:
        raise ValueError(f"need n_examples >= 1, window >= 0, after >= 0; got {n_examples}, {window}, {after}")
    n_rows = row_ctx.shape[0]
    row_ctx, row_pos, ctx_tok = checked_row_index(row_ctx, row_pos, context_tokens)
    n_ctx, T = ctx_tok.shape
    column = _column_getter(acts, n_rows)

    def text(ids: Tensor) -> str:
        return escape_markdown(tokenizer.decode(ids.tolist())) if ids.numel() else ""

    cards = []
    for j in latent_ids:
        col = column(int(j))
        if col.shape != (n_rows,):
            raise ValueError(f"activations of latent {j} have shape {tuple(col.shape)}, expected [{n_rows}]")
        fired = int((col > 0).sum())
        lines = [f"### Latent {int(j)}", ""]
        if fired == 0:
            cards.append("\n".join(lines + [f"never fires on these {n_rows:,} tokens"]))
            continue
        lines.append(f"fires on {fired:,} of {n_rows:,} tokens ({100 * fired / n_rows:.3f}%); "
                     f"max activation {float(col.max()):.3f}")
        lines += ["", "| act | context |", "|---:|:---|"]
        values, rows = torch.sort(col, descending=True, stable=True)
        for v, r in zip(values[:min(n_examples, fired)].tolist(), rows[:min(n_examples, fired)].tolist(),
                        strict=True):
            c, p = int(row_ctx[r]), int(row_pos[r])
            lo, hi = max(0, p - window), min(T, p + 1 + after)
            before, token, rest = text(ctx_tok[c, lo:p]), text(ctx_tok[c, p:p + 1]), text(ctx_tok[c, p + 1:hi])
            snippet = ("…" if lo > 0 else "") + before + _mark(token) + rest + ("…" if hi < T else "")
            lines.append(f"| {v:.3f} | {snippet.strip()} |")
        cards.append("\n".join(lines))
    return "\n\n".join(cards) + "\n"
