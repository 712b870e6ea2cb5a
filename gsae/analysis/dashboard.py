"""Latent dashboards: one self-contained static HTML page per SAE (inline CSS and SVG; no script, no network).

Per latent i the page shows
  * its firing frequency and, when a second encoding of the same rows is given (the g-encode), how much its
    selection changes: the Jaccard distance 1 - |P & G| / |P | G| between the rows where it fires in the shown
    codes (P) and in the other encoding (G);
  * an activation-density histogram: log10 of its nonzero activations;
  * its top-activating contexts: a window around the maximal token, every token shaded by the latent's
    activation there (alpha = act / the latent's max; hover for the value; tokens the harvest did not keep
    are outlined and unshaded);
  * the top and bottom logits of its decoder direction, W_dec[i] @ W_U (the direct path; the final LayerNorm
    is ignored, as in SAE dashboards generally);
  * its POS association: the tags most over-represented among its labelled firings, with lift = share among
    its firings / base rate among all labelled rows;
  * the nearest decoder direction in the other arm (cosine similarity of W_dec rows).

Inputs are plain tensors (the sparse code of harvested rows, each row's context and position, the contexts'
token ids), so the generator depends on no pipeline stage. Nothing of size [N, d_sae] is formed: every pass
reads the code ``chunk_rows`` rows at a time, and only the picked latents get per-latent state.

Which latents: ``pick_latents`` takes the most frequent, then the most changed under the gradient, then
random live latents among the rest (seeded), so the groups never overlap.

The page itself is rendered by ``analysis.dashboard_html``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..config import ConfigError
from ..probing import checked_row_index
from ..progress import bar as tqdm  # tqdm-compatible; draws on the terminal, never in a notebook

GROUPS = ("frequent", "changed", "random")
GROUP_TITLES = {"frequent": "Most frequent", "changed": "Selection most changed by the gradient",
                "random": "Random live"}


@dataclass(frozen=True)
class DashboardConfig:
    n_frequent: int = 24
    """Latents picked by firing count (highest first)."""
    n_changed: int = 24
    """Latents picked by the Jaccard distance of their firing rows between the two encodings (needs g_codes)."""
    n_random: int = 24
    """Live latents picked at random among the rest (seeded)."""
    seed: int = 0
    """Seed of the random pick."""
    change_min_count: int = 10
    """A latent ranks as "changed" only if it fires on at least this many rows in the two encodings together
    (a latent firing twice would otherwise reach distance 1 by chance)."""
    n_examples: int = 8
    """Top-activating contexts shown per latent."""
    before: int = 16
    """Tokens shown before the activating token."""
    after: int = 7
    """Tokens shown after it (before + 1 + after = 24-token windows)."""
    n_logits: int = 10
    """Top and bottom logits shown."""
    n_pos: int = 5
    """POS tags shown per latent."""
    pos_min_count: int = 3
    """A tag is listed only if the latent fires on at least this many tokens with it (lift of rare tags is noise)."""
    n_bins: int = 24
    """Bins of each activation histogram."""
    chunk_rows: int = 65536
    """Rows of the code read at a time."""

    def __post_init__(self) -> None:
        for name in ("n_frequent", "n_changed", "n_random", "change_min_count", "before", "after", "n_logits",
                     "n_pos", "pos_min_count"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("n_examples", "n_bins", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


class SparseCodes(NamedTuple):
    top_acts: Tensor
    """[N, k] activations (>= 0; an entry of 0 does not fire)."""
    top_indices: Tensor
    """[N, k] latent ids."""


class LatentStats(NamedTuple):
    count: Tensor
    """[d_sae] int64: rows where the latent fires (act > 0)."""
    max_act: Tensor
    """[d_sae] float64: its largest activation (0 if it never fires)."""
    min_act: Tensor
    """[d_sae] float64: its smallest nonzero activation (0 if it never fires)."""


class SelectionChange(NamedTuple):
    n_plain: Tensor
    """[d_sae] int64: rows where the latent fires in the shown codes."""
    n_g: Tensor
    """[d_sae] int64: rows where it fires in the other encoding (g-encode)."""
    n_both: Tensor
    """[d_sae] int64: rows where it fires in both."""
    distance: Tensor
    """[d_sae] float64: Jaccard distance 1 - n_both / (n_plain + n_g - n_both); 0 for a latent firing in neither."""


class Pick(NamedTuple):
    latent: int
    group: str
    """One of GROUPS."""


class Example(NamedTuple):
    row: int
    """Row of the code (the maximal token of this context)."""
    ctx: int
    pos: int
    act: float
    start: int
    """Position of the first token of the window."""
    tokens: list[int]
    """Token ids of the window."""
    acts: list[float | None]
    """The latent's activation at each window token; None where the harvest kept no row for the token."""


class LatentCard(NamedTuple):
    latent: int
    group: str
    count: int
    max_act: float
    hist_edges: list[float]
    """n_bins + 1 edges, in log10 of the activation."""
    hist_counts: list[int]
    examples: list[Example]
    top_logits: list[tuple[int, float]]
    """(token id, logit) for the highest entries of W_dec[i] @ W_U."""
    bottom_logits: list[tuple[int, float]]
    pos: list[tuple[str, int, float, float]] | None
    """(tag, firings with the tag, share among labelled firings, lift over the base rate); None if no POS given."""
    nearest: tuple[int, float] | None
    """(latent of the other arm, cosine) of the nearest decoder direction; None if no other arm given."""
    change: tuple[int, int, int, float] | None
    """(n_plain, n_g, n_both, distance) of SelectionChange; None if no second encoding given."""


class Dashboard(NamedTuple):
    title: str
    n_rows: int
    d_sae: int
    k: int
    n_live: int
    log_density: list[float]
    """log10 firing frequency of every live latent (the page's overview histogram)."""
    cards: list[LatentCard]
    token_text: dict[int, str]
    """Decoded text of every token id the page shows."""
    other_name: str
    note: str = ""
    """A line under the title (e.g. what the "changed" group compares against)."""


# ------------------------------------------------------------------------------------------------ streaming
def _check_codes(codes: SparseCodes, d_sae: int, what: str) -> SparseCodes:
    acts, idx = codes
    if acts.dim() != 2 or acts.shape != idx.shape:
        raise ValueError(f"{what}: top_acts and top_indices must both be [N, k], got {tuple(acts.shape)} and "
                         f"{tuple(idx.shape)}")
    if not acts.is_floating_point():
        raise ValueError(f"{what}: top_acts must be floating point, got {acts.dtype}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d_sae):
        raise ValueError(f"{what}: top_indices must lie in 0..{d_sae - 1} (d_sae={d_sae}); pass the SAE's d_sae")
    return SparseCodes(acts.detach().cpu(), idx.detach().cpu().long())


def _chunks(codes: SparseCodes, chunk_rows: int, desc: str | None) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(first row, top_acts, top_indices) of each chunk of rows, values in float64; a progress bar unless
    ``desc`` is None or there is a single chunk."""
    n = codes.top_acts.shape[0]
    for r0 in tqdm(range(0, n, chunk_rows), desc=desc, leave=False, disable=desc is None or n <= chunk_rows):
        yield r0, codes.top_acts[r0:r0 + chunk_rows].double(), codes.top_indices[r0:r0 + chunk_rows]


def latent_stats(codes: SparseCodes, d_sae: int, chunk_rows: int = 65536) -> LatentStats:
    """Per latent: firing count, largest and smallest nonzero activation."""
    codes = _check_codes(codes, d_sae, "codes")
    count = torch.zeros(d_sae, dtype=torch.long)
    mx = torch.zeros(d_sae, dtype=torch.float64)
    mn = torch.full((d_sae,), math.inf, dtype=torch.float64)
    for _, acts, idx in _chunks(codes, chunk_rows, "latent stats"):
        fired = acts > 0
        lat, val = idx[fired], acts[fired]
        count += torch.bincount(lat, minlength=d_sae)
        mx.scatter_reduce_(0, lat, val, "amax")
        mn.scatter_reduce_(0, lat, val, "amin")
    mn[count == 0] = 0.0
    return LatentStats(count, mx, mn)


def selection_change(codes: SparseCodes, g_codes: SparseCodes, d_sae: int, chunk_rows: int = 65536) -> SelectionChange:
    """How each latent's set of firing rows differs between two encodings of the same rows."""
    codes, g_codes = _check_codes(codes, d_sae, "codes"), _check_codes(g_codes, d_sae, "g_codes")
    if codes.top_acts.shape[0] != g_codes.top_acts.shape[0]:
        raise ValueError(f"codes has {codes.top_acts.shape[0]} rows but g_codes {g_codes.top_acts.shape[0]}; "
                         f"both must encode the same rows")
    n_plain, n_g, n_both = (torch.zeros(d_sae, dtype=torch.long) for _ in range(3))
    for (_, acts, idx), (_, g_acts, g_idx) in zip(_chunks(codes, chunk_rows, "selection change"),
                                                   _chunks(g_codes, chunk_rows, None), strict=True):
        rows = torch.arange(acts.shape[0])[:, None]
        keys = (rows * d_sae + idx)[acts > 0]  # (row, latent) pairs that fire, as one integer each
        g_keys = (rows * d_sae + g_idx)[g_acts > 0]
        both = torch.isin(g_keys, keys)
        n_plain += torch.bincount(keys % d_sae, minlength=d_sae)
        n_g += torch.bincount(g_keys % d_sae, minlength=d_sae)
        n_both += torch.bincount(g_keys[both] % d_sae, minlength=d_sae)
    union = n_plain + n_g - n_both
    distance = torch.where(union > 0, 1 - n_both.double() / union.clamp_min(1), torch.zeros((), dtype=torch.float64))
    return SelectionChange(n_plain, n_g, n_both, distance)


# ------------------------------------------------------------------------------------------------ picking
def pick_latents(count: Tensor, n_frequent: int, n_changed: int, n_random: int, seed: int = 0,
                 change: SelectionChange | None = None, change_min_count: int = 10) -> list[Pick]:
    """Most frequent, then most changed, then random live latents among those not yet taken.

    Frequent: by count (ties: lower id). Changed: latents that fire in the shown codes and on at least
    ``change_min_count`` rows of the two encodings together, by Jaccard distance, then union size, then id.
    Random: a seeded permutation of the remaining live latents, shown in id order. Groups may come out
    shorter when too few latents qualify."""
    count = count.cpu().long()
    if n_changed > 0 and change is None:
        raise ValueError("picking 'changed' latents needs the second encoding (g_codes); pass it or set n_changed=0")
    live = count > 0
    taken = torch.zeros_like(live)
    picks: list[Pick] = []

    def take(order: Tensor, n: int, group: str) -> None:
        chosen = order[~taken[order]][:n]
        taken[chosen] = True
        picks.extend(Pick(int(j), group) for j in chosen.tolist())

    ids = torch.arange(count.numel())
    take(ids[live][torch.argsort(-count[live], stable=True)], n_frequent, "frequent")
    if n_changed > 0:
        union = change.n_plain + change.n_g - change.n_both
        ok = ids[live & (union >= max(change_min_count, 1))]
        order = ok[torch.argsort(-union[ok], stable=True)]  # ties in distance: larger union first
        order = order[torch.argsort(-change.distance[order], stable=True)]
        take(order, n_changed, "changed")
    rest = ids[live & ~taken]
    gen = torch.Generator().manual_seed(seed)
    take(rest[torch.randperm(rest.numel(), generator=gen)][:n_random].sort().values, n_random, "random")
    return picks


# ------------------------------------------------------------------------------------------------ building
def _top_rows(codes: SparseCodes, slot_of: Tensor, n_slots: int, stats: LatentStats, latents: Tensor,
              cfg: DashboardConfig, pos_labels: Tensor | None, n_tags: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pass for the picked latents (slots): top ``n_examples`` (value, row) each, ties to the earlier row;
    histograms of log10 activation; POS tag counts of the firings."""
    n = cfg.n_examples
    best_val = torch.full((n_slots, n), -math.inf, dtype=torch.float64)
    best_row = torch.full((n_slots, n), -1, dtype=torch.long)
    hist = torch.zeros(n_slots * cfg.n_bins, dtype=torch.long)
    tags = torch.zeros(n_slots * max(n_tags, 1), dtype=torch.long)
    lo, hi = _hist_range(stats, latents)
    for r0, acts, idx in _chunks(codes, cfg.chunk_rows, "top contexts"):
        slot = slot_of[idx]
        rr, kk = torch.nonzero((slot >= 0) & (acts > 0), as_tuple=True)  # row-major: rows ascending
        s, v, row = slot[rr, kk], acts[rr, kk], rr + r0
        b = ((v.log10() - lo[s]) / (hi[s] - lo[s]) * cfg.n_bins).floor().long().clamp_(0, cfg.n_bins - 1)
        hist.index_add_(0, s * cfg.n_bins + b, torch.ones_like(b))
        if pos_labels is not None:
            lab = pos_labels[row]
            ok = lab >= 0
            tags.index_add_(0, s[ok] * n_tags + lab[ok], torch.ones_like(lab[ok]))
        # Chunk candidates: each slot's n best, by value then row; merged with the running best by a stable
        # sort, so among equal values the earlier row (earlier chunk, or earlier in the chunk) stays first.
        o = torch.argsort(-v, stable=True)
        o = o[torch.argsort(s[o], stable=True)]
        s, v, row = s[o], v[o], row[o]
        per_slot = torch.bincount(s, minlength=n_slots)
        rank = torch.arange(s.numel()) - (per_slot.cumsum(0) - per_slot)[s]
        keep = rank < n
        cand_val = torch.full_like(best_val, -math.inf)
        cand_row = torch.full_like(best_row, -1)
        cand_val[s[keep], rank[keep]] = v[keep]
        cand_row[s[keep], rank[keep]] = row[keep]
        merged_val, order = torch.cat([best_val, cand_val], 1).sort(dim=1, descending=True, stable=True)
        best_val, best_row = merged_val[:, :n], torch.cat([best_row, cand_row], 1).gather(1, order[:, :n])
    return best_val, best_row, hist.view(n_slots, cfg.n_bins), tags.view(n_slots, max(n_tags, 1))


def _hist_range(stats: LatentStats, latents: Tensor) -> tuple[Tensor, Tensor]:
    """log10 range of each picked latent's nonzero activations, widened to one decade if (nearly) empty."""
    lo = stats.min_act[latents].clamp_min(1e-30).log10()
    hi = stats.max_act[latents].clamp_min(1e-30).log10()
    flat = (hi - lo) < 1e-6
    return torch.where(flat, lo - 0.5, lo), torch.where(flat, hi + 0.5, hi)


def _window_acts(codes: SparseCodes, slot_of: Tensor, n_slots: int, wanted: set[tuple[int, int]],
                 row_ctx: Tensor, row_pos: Tensor, n_ctx: int, chunk_rows: int) -> dict[tuple[int, int, int], float]:
    """{(slot, ctx, pos): activation} for every firing of a picked latent inside a (slot, ctx) it shows."""
    if not wanted:
        return {}
    wanted_keys = torch.tensor(sorted(s * n_ctx + c for s, c in wanted))
    out: dict[tuple[int, int, int], float] = {}
    for r0, acts, idx in _chunks(codes, chunk_rows, "context windows"):
        slot = slot_of[idx]
        rr, kk = torch.nonzero((slot >= 0) & (acts > 0), as_tuple=True)
        s, v, row = slot[rr, kk], acts[rr, kk], rr + r0
        ctx = row_ctx[row]
        hit = torch.isin(s * n_ctx + ctx, wanted_keys)
        for key in zip(s[hit].tolist(), ctx[hit].tolist(), row_pos[row[hit]].tolist(), v[hit].tolist(), strict=True):
            out[key[:3]] = max(out.get(key[:3], 0.0), key[3])
    return out


def build_dashboard(codes: SparseCodes, d_sae: int, row_ctx: Tensor, row_pos: Tensor, context_tokens: Tensor,
                    tokenizer: Any, W_U: Tensor, W_dec: Tensor, *, g_codes: SparseCodes | None = None,
                    pos_labels: Tensor | None = None, pos_names: Sequence[str] | None = None,
                    other_W_dec: Tensor | None = None, other_name: str = "other arm", title: str = "SAE latents",
                    cfg: DashboardConfig | None = None, note: str = "") -> Dashboard:
    """Everything one SAE's page shows (render it with ``render_html``).

    ``codes``: the sparse code of N harvested rows (shown); row r is token ``context_tokens[row_ctx[r],
    row_pos[r]]``. ``tokenizer``: anything with ``decode(list[int]) -> str``. ``W_U`` [d_model, d_vocab] and
    ``W_dec`` [d_sae, d_model] (the SAE must read the residual stream or an output added to it).
    Optional: ``g_codes`` (a second encoding of the same rows, e.g. the g-encode; without it the "changed" group
    is empty),
    ``pos_labels`` [N] (tag ids, -1 = unlabelled) with ``pos_names``, ``other_W_dec`` [d_sae', d_model] (the
    other arm's decoder, for the nearest direction), ``note`` (a line shown under the title)."""
    cfg = cfg or DashboardConfig()
    codes = _check_codes(codes, d_sae, "codes")
    n_rows, k = codes.top_acts.shape
    if row_ctx.dim() != 1 or row_ctx.shape != row_pos.shape or row_ctx.shape[0] != n_rows:
        raise ValueError(f"row_ctx and row_pos must be 1-D with one entry per row of the code ({n_rows}), got "
                         f"{tuple(row_ctx.shape)} and {tuple(row_pos.shape)}")
    if context_tokens.dim() != 2:
        raise ValueError(f"context_tokens must be [n_ctx, T], got shape {tuple(context_tokens.shape)}")
    row_ctx, row_pos, ctx_tok = checked_row_index(row_ctx, row_pos, context_tokens)
    n_ctx, T = ctx_tok.shape
    W_dec = W_dec.detach().cpu().float()
    W_U = W_U.detach().cpu().float()
    if W_dec.shape[0] != d_sae or W_U.dim() != 2 or W_U.shape[0] != W_dec.shape[1]:
        raise ValueError(f"need W_dec [d_sae={d_sae}, d_model] and W_U [d_model, d_vocab] with the same d_model; got "
                         f"{tuple(W_dec.shape)} and {tuple(W_U.shape)} (logits need an SAE on the residual stream)")
    if other_W_dec is not None and (other_W_dec.dim() != 2 or other_W_dec.shape[1] != W_dec.shape[1]):
        raise ValueError(f"other_W_dec must be [d_sae', {W_dec.shape[1]}], got {tuple(other_W_dec.shape)}")
    n_tags = 0
    if pos_labels is not None:
        pos_labels = pos_labels.cpu().long()
        if pos_names is None or pos_labels.shape != (n_rows,):
            raise ValueError(f"pos_labels must be [N={n_rows}] and come with pos_names; got {tuple(pos_labels.shape)}")
        n_tags = len(pos_names)
        if n_rows and int(pos_labels.max()) >= n_tags:
            raise ValueError(f"pos_labels go up to {int(pos_labels.max())} but pos_names has only {n_tags} names")

    stats = latent_stats(codes, d_sae, cfg.chunk_rows)
    change = selection_change(codes, g_codes, d_sae, cfg.chunk_rows) if g_codes is not None else None
    picks = pick_latents(stats.count, cfg.n_frequent, cfg.n_changed if change is not None else 0, cfg.n_random,
                         cfg.seed, change, cfg.change_min_count)
    latents = torch.tensor([p.latent for p in picks], dtype=torch.long)
    slot_of = torch.full((d_sae,), -1, dtype=torch.long)
    slot_of[latents] = torch.arange(len(picks))

    best_val, best_row, hist, tags = _top_rows(codes, slot_of, len(picks), stats, latents, cfg, pos_labels, n_tags)
    wanted = {(s, int(row_ctx[r])) for s in range(len(picks)) for r in best_row[s].tolist() if r >= 0}
    window = _window_acts(codes, slot_of, len(picks), wanted, row_ctx, row_pos, n_ctx, cfg.chunk_rows)
    harvested = torch.zeros(n_ctx, T, dtype=torch.bool)
    harvested[row_ctx, row_pos] = True

    logits = W_dec[latents] @ W_U  # [n_picked, d_vocab]
    n_log = min(cfg.n_logits, logits.shape[1])
    top = logits.topk(n_log, dim=1)
    bottom = (-logits).topk(n_log, dim=1)
    nearest = None
    if other_W_dec is not None:
        unit = W_dec[latents] / W_dec[latents].norm(dim=1, keepdim=True).clamp_min(1e-12)
        other = other_W_dec.detach().cpu().float()
        other = other / other.norm(dim=1, keepdim=True).clamp_min(1e-12)
        nearest = (unit @ other.T).max(dim=1)
    base = None
    if pos_labels is not None:
        lab = pos_labels[pos_labels >= 0]
        base = torch.bincount(lab, minlength=n_tags).double() / max(lab.numel(), 1)
    lo, hi = _hist_range(stats, latents)

    cards: list[LatentCard] = []
    shown_tokens: set[int] = set()
    for s, (j, group) in enumerate(picks):
        examples = []
        for v, r in zip(best_val[s].tolist(), best_row[s].tolist(), strict=True):
            if r < 0:
                break
            c, p = int(row_ctx[r]), int(row_pos[r])
            a, b = max(0, p - cfg.before), min(T, p + cfg.after + 1)
            toks = ctx_tok[c, a:b].tolist()
            acts = [window.get((s, c, q), 0.0) if harvested[c, q] else None for q in range(a, b)]
            examples.append(Example(r, c, p, v, a, toks, acts))
            shown_tokens.update(toks)
        pos = None
        if base is not None:
            n_lab = int(tags[s].sum())
            rows = []
            for t in range(n_tags):
                cnt = int(tags[s, t])
                if cnt >= max(cfg.pos_min_count, 1) and base[t] > 0:
                    share = cnt / n_lab
                    rows.append((pos_names[t], cnt, share, share / float(base[t])))
            pos = sorted(rows, key=lambda x: (-x[3], -x[1], x[0]))[:cfg.n_pos]
        top_l = list(zip(top.indices[s].tolist(), top.values[s].tolist(), strict=True))
        bot_l = list(zip(bottom.indices[s].tolist(), (-bottom.values[s]).tolist(), strict=True))
        shown_tokens.update(t for t, _ in top_l + bot_l)
        edges = torch.linspace(float(lo[s]), float(hi[s]), cfg.n_bins + 1).tolist()
        cards.append(LatentCard(
            latent=j, group=group, count=int(stats.count[j]), max_act=float(stats.max_act[j]), hist_edges=edges,
            hist_counts=hist[s].tolist(), examples=examples, top_logits=top_l, bottom_logits=bot_l, pos=pos,
            nearest=None if nearest is None else (int(nearest.indices[s]), float(nearest.values[s])),
            change=None if change is None else (int(change.n_plain[j]), int(change.n_g[j]), int(change.n_both[j]),
                                                float(change.distance[j]))))
    token_text = {t: tokenizer.decode([t]) for t in sorted(shown_tokens)}
    live = stats.count[stats.count > 0]
    log_density = (live.double() / max(n_rows, 1)).log10().tolist()
    return Dashboard(title, n_rows, d_sae, k, int(live.numel()), log_density, cards, token_text, other_name, note)
