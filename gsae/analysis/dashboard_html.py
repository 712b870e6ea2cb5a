"""The latent dashboard as a page: one self-contained static HTML file per SAE (inline CSS and SVG; no script, no
network) rendered from ``analysis.dashboard.Dashboard``, and its screenshot.

Screenshot: ``python -m gsae.analysis.dashboard_html --screenshot page.html page.png`` runs headless Chromium
(Debian package ``chromium``) with networking, sync and component updates off.
"""

from __future__ import annotations

import argparse
import html
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..io import atomic_path
from .dashboard import GROUP_TITLES, GROUPS, Dashboard, Example, LatentCard

# ------------------------------------------------------------------------------------------------ rendering
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:16px 24px;color:#222;
max-width:1240px}
h1{font-size:22px;margin:0 0 6px}h2{font-size:17px;margin:0 0 6px}h3{font-size:13px;margin:0 0 4px;color:#555}
.help{font-size:13px;color:#444;background:#f6f6f6;padding:8px 12px;border-radius:6px}
.help li{margin:2px 0}
nav{font-size:13px;margin:10px 0}nav a{margin-right:6px;text-decoration:none;color:#0645ad}
section.latent{border-top:2px solid #ddd;padding:12px 0 8px}
.tag{font-size:12px;background:#eef;border-radius:4px;padding:1px 6px;color:#335;font-weight:normal}
.stats{font-size:13px;color:#444;margin-bottom:6px}
.panels{display:flex;gap:18px;flex-wrap:wrap;align-items:flex-start;margin-bottom:8px}
.panel{font-size:12px}
table{border-collapse:collapse;font-size:12px}td,th{padding:1px 6px;text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.tok{white-space:pre;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;border-radius:2px}
.tok.max{outline:1.5px solid #b30000}
.tok.nh{outline:1px dotted #999;color:#777}
.ctx{margin:2px 0;line-height:1.7}
.ctx .val{display:inline-block;width:56px;text-align:right;margin-right:8px;font-size:12px;color:#555;
font-variant-numeric:tabular-nums}
.pos{color:#060}.neg{color:#900}
"""

HELP = """
<ul>
<li><b>Frequency</b>: share of harvested tokens on which the latent fires (activation &gt; 0).</li>
<li><b>Selection change</b> (when a second encoding is given): rows where the latent fires in the shown
encoding (plain), in the g-encode, in both, and the Jaccard distance 1 &minus; both / either.</li>
<li><b>Activation density</b>: histogram of log10 of the latent's nonzero activations.</li>
<li><b>Top contexts</b>: the contexts of its largest activations, with a window around the maximal token
(outlined in red). Each token is shaded by the latent's activation there relative to its maximum; hover for the
value. Dotted tokens were not harvested, so their activation is unknown.</li>
<li><b>Logits</b>: the largest and smallest entries of W_dec[i] &middot; W_U (direct path, no final LayerNorm).</li>
<li><b>POS</b>: tags over-represented among its labelled firings: count, share of its firings, and lift = share /
base rate over all labelled tokens.</li>
<li><b>Nearest in the other arm</b>: the other SAE's decoder row with the largest cosine to this one.</li>
</ul>
"""


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _visible(text: str) -> str:
    """A token's text with newlines and tabs made visible and an empty token marked (spaces stay: pre)."""
    text = text.replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "⏎").replace("\t", "⇥")
    return text if text else "∅"


def shade(act: float, max_act: float) -> float:
    """Background alpha of a token: its activation over the latent's maximum, in [0, 1]."""
    return 0.0 if max_act <= 0 else min(max(act / max_act, 0.0), 1.0)


def _svg_hist(counts: Sequence[int], edges: Sequence[float], width: int = 260, height: int = 90,
              xlabel: str = "log10 activation") -> str:
    """Bars of ``counts`` over ``edges`` as inline SVG, with the edge values on the axis."""
    top = max(max(counts, default=0), 1)
    pad, plot_h = 4, height - 28
    bar_w = (width - 2 * pad) / max(len(counts), 1)
    parts = [f'<svg width="{width}" height="{height}" role="img">']
    for i, c in enumerate(counts):
        h = plot_h * c / top
        parts.append(f'<rect x="{pad + i * bar_w:.1f}" y="{pad + plot_h - h:.1f}" width="{max(bar_w - 1, 0.5):.1f}" '
                     f'height="{h:.1f}" fill="#e06c00"><title>{_esc(f"[{edges[i]:.2f}, {edges[i + 1]:.2f}): {c}")}'
                     f"</title></rect>")
    y = pad + plot_h
    parts.append(f'<line x1="{pad}" y1="{y}" x2="{width - pad}" y2="{y}" stroke="#888"/>')
    if edges:
        parts.append(f'<text x="{pad}" y="{y + 12}" font-size="10">{edges[0]:.2f}</text>')
        parts.append(f'<text x="{width - pad}" y="{y + 12}" font-size="10" text-anchor="end">{edges[-1]:.2f}</text>')
    parts.append(f'<text x="{width / 2:.0f}" y="{y + 23}" font-size="10" text-anchor="middle">{_esc(xlabel)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _context_html(ex: Example, max_act: float, text: dict[int, str]) -> str:
    spans = []
    for q, (t, a) in enumerate(zip(ex.tokens, ex.acts, strict=True)):
        tok = text[t]
        cls = "tok max" if ex.start + q == ex.pos else "tok"
        if a is None:
            spans.append(f'<span class="{cls} nh" title="{_esc(f"{tok!r}: not harvested")}">{_esc(_visible(tok))}'
                         f"</span>")
            continue
        alpha = shade(a, max_act)
        style = f' style="background:rgba(255,102,0,{alpha:.3f})"' if alpha > 0 else ""
        spans.append(f'<span class="{cls}"{style} data-act="{a:.6g}" title="{_esc(f"{tok!r}: {a:.3f}")}">'
                     f"{_esc(_visible(tok))}</span>")
    return (f'<div class="ctx" data-row="{ex.row}" data-ctx="{ex.ctx}" data-pos="{ex.pos}">'
            f'<span class="val">{ex.act:.3f}</span>{"".join(spans)}</div>')


def _logit_table(rows: list[tuple[int, float]], text: dict[int, str], cls: str, head: str) -> str:
    body = "".join(f'<tr><td><span class="tok">{_esc(_visible(text[t]))}</span></td>'
                   f'<td class="num {cls}">{v:+.3f}</td></tr>' for t, v in rows)
    return f'<div class="panel"><h3>{head}</h3><table>{body}</table></div>'


def _card_html(card: LatentCard, dash: Dashboard) -> str:
    freq = card.count / max(dash.n_rows, 1)
    stats = [f"fires on {card.count:,} of {dash.n_rows:,} tokens ({100 * freq:.3f}%)",
             f"max activation {card.max_act:.3f}"]
    if card.change is not None:
        n_p, n_g, n_b, dist = card.change
        stats.append(f"selection: plain {n_p:,}, g-encode {n_g:,}, both {n_b:,}, Jaccard distance {dist:.3f}")
    panels = [f'<div class="panel"><h3>Activation density ({card.count:,} firings)</h3>'
              f"{_svg_hist(card.hist_counts, card.hist_edges)}</div>",
              _logit_table(card.top_logits, dash.token_text, "pos", "Top logits"),
              _logit_table(card.bottom_logits, dash.token_text, "neg", "Bottom logits")]
    if card.pos is not None:
        body = "".join(f'<tr><td>{_esc(tag)}</td><td class="num">{n}</td><td class="num">{100 * share:.1f}%</td>'
                       f'<td class="num">{lift:.2f}</td></tr>' for tag, n, share, lift in card.pos)
        if not card.pos:
            body = '<tr><td colspan="4">too few labelled firings</td></tr>'
        panels.append('<div class="panel"><h3>POS association</h3><table><tr><th>tag</th><th class="num">n</th>'
                      f'<th class="num">share</th><th class="num">lift</th></tr>{body}</table></div>')
    if card.nearest is not None:
        other, cos = card.nearest
        panels.append(f'<div class="panel"><h3>Nearest in {_esc(dash.other_name)}</h3>'
                      f'<span class="nearest" data-latent="{other}" data-cos="{cos:.6f}">latent {other}, '
                      f"cosine {cos:.3f}</span></div>")
    contexts = "".join(_context_html(ex, card.max_act, dash.token_text) for ex in card.examples)
    return (f'<section class="latent" id="latent-{card.latent}" data-group="{card.group}">'
            f'<h2>Latent {card.latent} <span class="tag">{_esc(GROUP_TITLES[card.group])}</span></h2>'
            f'<div class="stats">{_esc("; ".join(stats))}</div><div class="panels">{"".join(panels)}</div>'
            f"<h3>Top contexts</h3>{contexts or '<p>never fires on these tokens</p>'}</section>")


def render_html(dash: Dashboard) -> str:
    """The page: title, panel help, overview of firing densities, an index by group, one section per latent."""
    nav = []
    for g in GROUPS:
        links = " ".join(f'<a href="#latent-{c.latent}">{c.latent}</a>' for c in dash.cards if c.group == g)
        if links:
            nav.append(f"<div><b>{_esc(GROUP_TITLES[g])}</b>: {links}</div>")
    dens = dash.log_density
    n_bins = 40
    lo, hi = (min(dens), max(dens)) if dens else (-1.0, 0.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    counts = [0] * n_bins
    for d in dens:
        counts[min(int((d - lo) / (hi - lo) * n_bins), n_bins - 1)] += 1
    edges = [lo + (hi - lo) * i / n_bins for i in range(n_bins + 1)]
    overview = _svg_hist(counts, edges, width=420, height=110, xlabel="log10 firing frequency (live latents)")
    head = (f"<p>{dash.n_rows:,} harvested tokens; d_sae {dash.d_sae:,}, k {dash.k}; {dash.n_live:,} live latents "
            f"({dash.d_sae - dash.n_live:,} never fire); {len(dash.cards)} latents shown.</p>")
    if dash.note:
        head += f'<p class="note">{_esc(dash.note)}</p>'
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(dash.title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{_esc(dash.title)}</h1>{head}<div class=\"help\">{HELP}</div>"
            f"<div class=\"panel\"><h3>Firing frequency of all live latents</h3>{overview}</div>"
            f"<nav id=\"index\">{''.join(nav)}</nav>"
            f"{''.join(_card_html(c, dash) for c in dash.cards)}</body></html>\n")


def write_html(path: str | Path, page: str) -> Path:
    """Write the page atomically (UTF-8)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ screenshot
def find_chromium() -> str | None:
    """Path of a Chromium binary on PATH (Debian's ``chromium``), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(html_path: str | Path, png_path: str | Path, window_size: tuple[int, int] = (1280, 1600),
               timeout_s: float = 120.0) -> Path:
    """Render ``html_path`` in headless Chromium to ``png_path`` (the top ``window_size`` pixels), offline."""
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"{html_path} does not exist; build the dashboard first")
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH; install it (Debian: apt-get install -y chromium)")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gsae-chromium-") as work:
        shot = Path(work) / "shot.png"  # chromium picks the format from the suffix, so not atomic_path's .tmp
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={Path(work) / 'profile'}", f"--screenshot={shot}",
               f"--window-size={window_size[0]},{window_size[1]}", html_path.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not shot.is_file() or shot.stat().st_size == 0:
            raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}")
        with atomic_path(png_path) as tmp:
            shutil.copyfile(shot, tmp)
    return png_path


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m gsae.analysis.dashboard_html", description=__doc__.split("\n")[0])
    ap.add_argument("--screenshot", nargs=2, metavar=("IN_HTML", "OUT_PNG"), required=True,
                    help="render a dashboard page to PNG with headless Chromium")
    ap.add_argument("--window-size", default="1280,1600", help="WIDTH,HEIGHT in pixels (default 1280,1600)")
    a = ap.parse_args(argv)
    w, h = (int(x) for x in a.window_size.split(","))
    print(screenshot(a.screenshot[0], a.screenshot[1], (w, h)))


if __name__ == "__main__":
    main()
