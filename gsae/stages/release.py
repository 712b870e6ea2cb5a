"""Stage ``release``: the released SAEs and their latent dashboards. The primary SAE of every arm at the selection
k and the first seed is exported to ``saes/<profile>/`` in SAELens' format (``gsae.release.export_release``), and one
static HTML page per arm is built by ``analysis.dashboard`` from the test split's harvested rows, plus a
headless-Chromium screenshot of each page.

What each page shows, and why:
  * Codes: the plain-encode (TopK on z, SAELens' ``encode``) for every arm, so the two arms' pages show the same
    kind of code, the one a user of a released SAE gets without a gradient.
  * "Selection most changed by the gradient": each latent's Jaccard distance between the rows where it fires
    under plain-encode and under gradient selection. For an arm whose code uses the gradient that is its own
    g-encode. For an arm that does not (TopK, beta = 0) it is the gradient selection of the first such arm
    (its beta, grad_norm and value_mode; the SAE's own grad_scale, the same dataset constant) applied to this
    SAE's weights: "which of TopK's latents would the g-SAE's rule pick differently". An SAE module without a
    beta (not ``gsae.sae.GSAE``) gets no such group; its slots go to random live latents, so every page shows
    n_frequent + n_changed + n_random latents (72 by default) when that many are live.
  * POS association from the Brown tags of the test contexts; logits from the LM's W_U; the nearest decoder
    direction in the next arm of the profile (the first arm for the last).

Outputs: ``results/<profile>/dashboards/<arm>-k<k>-s<seed>.html`` (committed for the default profile; about
1-2 MB each, self-contained: no script, no network) and ``<figures_dir>/dashboard_<arm>-k<k>-s<seed>.png``.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .. import io
from ..analysis import dashboard, dashboard_html
from ..config import Profile
from ..paths import figures_dir, results_dir
from ..release import model_info
from ..sae import GSAE
from ..specs import SAESpec, load_trained
from .contexts import contexts
from .harvest import reader
from .probe import probe_labels

GRADIENT_SELECTION_FIELDS = ("beta", "grad_norm", "value_mode")
"""What a gradient view borrows from the arm whose code uses the gradient (grad_scale stays the SAE's own)."""
SCREENSHOT_SIZE = (1280, 1200)
"""Pixels of each screenshot: the title, the overview and the first latent (about 0.3 MB of PNG)."""


class DashboardPages(NamedTuple):
    pages: dict[str, Path]
    """Arm name -> HTML page."""
    screenshots: dict[str, Path]
    """Arm name -> PNG (empty when no Chromium is installed)."""
    n_latents: dict[str, int]
    """Arm name -> latents shown."""
    changed_from: dict[str, str]
    """Arm name -> what its "changed" group compares the plain-encode with (shown under the page's title)."""
    dashboards: dict[str, dashboard.Dashboard]
    """Arm name -> everything its page shows."""


def encode_rows(sae: nn.Module, x: Tensor, g: Tensor | None, chunk_rows: int = 8192) -> dashboard.SparseCodes:
    """Sparse code of every row (g-encode when ``g`` is given), ``chunk_rows`` rows at a time so the dense
    pre-activations never exceed [chunk_rows, d_sae]."""
    acts, idx = [], []
    with torch.no_grad():
        for r0 in range(0, x.shape[0], chunk_rows):
            enc = sae.encode(x[r0:r0 + chunk_rows], None if g is None else g[r0:r0 + chunk_rows])
            acts.append(enc.top_acts)
            idx.append(enc.top_indices)
    return dashboard.SparseCodes(torch.cat(acts), torch.cat(idx))


def gradient_view(sae: nn.Module, donor: nn.Module | None) -> nn.Module | None:
    """An SAE whose code can use the gradient: ``sae`` itself if it does, else (both being ``GSAE``) ``sae``'s
    weights with ``donor``'s gradient selection; None when neither applies."""
    if getattr(sae, "uses_gradient", False):
        return sae
    if donor is None or not isinstance(sae, GSAE) or not isinstance(donor, GSAE):
        return None
    cfg = dataclasses.replace(sae.cfg, **{f: getattr(donor.cfg, f) for f in GRADIENT_SELECTION_FIELDS})
    view = GSAE(cfg)
    view.load_state_dict(sae.state_dict())
    return view


def _primary(p: Profile, specs: list[SAESpec]) -> list[SAESpec]:
    k, seed = p.experiment.beta_select_k, p.experiment.seeds[0]
    chosen = [s for s in specs if s.group == "primary" and s.k == k and s.seed == seed]
    if not chosen:
        raise FileNotFoundError(f"no primary SAE at k={k}, seed {seed} among the {len(specs)} specs; run the "
                                f"train stage first")
    return chosen


def write_dashboards(p: Profile, lm, specs: list[SAESpec], cfg: dashboard.DashboardConfig | None = None,
                     screenshots: bool = True, provenance: dict[str, Any] | None = None) -> DashboardPages:
    """One dashboard page per arm (primary SAE, selection k, first seed) and, if Chromium is installed and
    ``screenshots``, a PNG of each page's top (its provenance recorded beside the figures)."""
    cfg = cfg or dashboard.DashboardConfig()
    mh = lm.info["model_hash"]
    chosen = _primary(p, specs)
    saes = {s.arm: load_trained(p, s, mh) for s in chosen}
    donor = next((saes[s.arm] for s in chosen if s.arm_impl.has_gradient_encoder), None)
    donor_label = next((s.arm_impl.label for s in chosen if s.arm_impl.has_gradient_encoder), "")
    lab = probe_labels(p, lm)
    rows = reader(p, "test", mh).load_all()  # the test split is eval-sized; its rows align with lab's labels
    tokens = contexts(p, lm.tokenizer, mh)["test"].tokens
    W_U = lm.model.W_U.detach()
    out = DashboardPages({}, {}, {}, {}, {})
    for i, s in enumerate(chosen):
        sae, other = saes[s.arm], chosen[(i + 1) % len(chosen)]
        view = gradient_view(sae, donor)
        page_cfg = cfg if view is not None else dataclasses.replace(cfg, n_changed=0,
                                                                    n_random=cfg.n_random + cfg.n_changed)
        if view is sae:
            changed_from = f"this SAE's own g-encode (beta = {sae.cfg.beta:g})"
        elif view is not None:
            changed_from = (f"the {donor_label}'s gradient selection (beta = {donor.cfg.beta:g}) applied to this "
                            f"SAE's weights ({s.arm_impl.label} has no gradient encoder of its own)")
        else:
            changed_from = "nothing (no gradient selection applies to this SAE; random latents fill the group)"
        codes = encode_rows(sae, rows.x, None)
        g_codes = encode_rows(view, rows.x, rows.g) if view is not None else None
        title = (f"{s.arm_impl.label} latents: {p.name} profile, k = {s.k}, seed {s.seed} "
                 f"(beta = {s.sae.beta:g}), test split, plain-encode codes")
        dash = dashboard.build_dashboard(
            codes, sae.cfg.d_sae, rows.meta["ctx_index"], rows.meta["pos"], tokens, lm.tokenizer, W_U, sae.W_dec,
            g_codes=g_codes, pos_labels=lab["pos"], pos_names=lab["tag_vocab"],
            other_W_dec=None if other is s else saes[other.arm].W_dec,
            other_name=f"{other.arm_impl.label} (k = {other.k}, seed {other.seed})", title=title, cfg=page_cfg,
            note=f"Codes shown: plain-encode (TopK on z). Selection change: against {changed_from}.")
        stem = f"{s.arm}-k{s.k}-s{s.seed}"
        out.pages[s.arm] = dashboard_html.write_html(results_dir(p) / "dashboards" / f"{stem}.html",
                                                dashboard_html.render_html(dash))
        out.n_latents[s.arm] = len(dash.cards)
        out.changed_from[s.arm] = changed_from
        out.dashboards[s.arm] = dash
    if screenshots and dashboard_html.find_chromium() is None:
        warnings.warn("no Chromium on PATH: dashboards written without screenshots (Debian: apt-get install "
                      "chromium)", stacklevel=2)
    elif screenshots:
        from ..analysis.figures import record_provenance

        for arm, page in out.pages.items():
            png = dashboard_html.screenshot(page, figures_dir(p) / f"dashboard_{page.stem}.png", SCREENSHOT_SIZE)
            record_provenance(png, provenance or io.provenance(profile=p.to_dict(), model=model_info(lm)))
            out.screenshots[arm] = png
    return out


def run(p: Profile, lm, specs: list[SAESpec], progress: bool = True) -> dict[str, Any]:
    """Export the released SAEs (checked on the test split's rows) and write their dashboards."""
    from ..release import export_release

    rows = reader(p, "test", lm.info["model_hash"]).load_all()
    return {"released": export_release(p, lm, specs, rows),
            "dashboards": write_dashboards(p, lm, specs, provenance=io.provenance(profile=p.to_dict(),
                                                                                  model=model_info(lm)))}
