import math
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from gsae.analysis.dashboard import (
    DashboardConfig,
    SelectionChange,
    SparseCodes,
    build_dashboard,
    latent_stats,
    pick_latents,
    selection_change,
)
from gsae.analysis.dashboard_html import find_chromium, render_html, screenshot, write_html
from gsae.config import ConfigError, SAEConfig
from gsae.sae import GSAE

VOID = {"meta", "br", "img", "input", "link", "hr"}  # HTML void elements (SVG ones here are written <x .../>)


class Page(HTMLParser):
    """Parses the page, checks that tags nest, and collects sections, contexts and token spans."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.sections: dict[str, dict] = {}
        self.links: list[str] = []
        self.tags_in_tokens: list[str] = []  # markup inside a token span (must stay empty: tokens are text)
        self.text: list[str] = []
        self._section: dict | None = None
        self._span: dict | None = None
        self.feed(page)
        self.close()
        assert not self.stack, f"unclosed tags {self.stack}"

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self._span is not None:
            self.tags_in_tokens.append(tag)
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "a":
            self.links.append(a["href"])
        if tag == "section" and a.get("class") == "latent":
            self._section = {"group": a["data-group"], "contexts": [], "nearest": None}
            self.sections[a["id"]] = self._section
        if self._section is None:
            return
        if tag == "div" and a.get("class") == "ctx":
            self._section["contexts"].append({"row": int(a["data-row"]), "tokens": []})
        if tag == "span" and "tok" in a.get("class", "").split() and self._section["contexts"]:
            style = a.get("style", "")
            alpha = float(style.split(",")[-1].rstrip(")")) if style else 0.0
            self._span = {"act": float(a["data-act"]) if "data-act" in a else None, "alpha": alpha,
                          "title": a["title"], "max": "max" in a["class"].split(), "text": ""}
            self._section["contexts"][-1]["tokens"].append(self._span)
        if tag == "span" and a.get("class") == "nearest":
            self._section["nearest"] = (int(a["data-latent"]), float(a["data-cos"]))

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag == "section":
            self._section = None
        if tag == "span":
            self._span = None

    def handle_data(self, data):
        self.text.append(data)
        if self._span is not None:
            self._span["text"] += data


class ToyTokenizer:
    """decode(ids): a fixed string per id; a few carry HTML specials."""

    special = {7: " <b>x</b>", 8: "\n", 9: ' "q" & <', 10: ""}

    def decode(self, ids):
        return "".join(self.special.get(i, f" w{i}") for i in ids)


def hand_example():
    """3 contexts of 10 tokens; every position but 0 is a harvested row (27 rows). Latent 0's largest activation
    is at (ctx 1, pos 4); (ctx 0, pos 2) and (ctx 2, pos 6) tie at 1.5 (the earlier row must come first).
    Firing counts: latent 1: 9, latent 0: 6, latents 2 and 3: 1, latent 4: 0."""
    n_ctx, T, d_sae = 3, 10, 5
    ctx_tokens = torch.arange(20, 20 + n_ctx * T).view(n_ctx, T)
    ctx_tokens[1, 4], ctx_tokens[1, 5], ctx_tokens[1, 3] = 7, 8, 9
    row_ctx = torch.arange(n_ctx).repeat_interleave(T - 1)
    row_pos = torch.arange(1, T).repeat(n_ctx)
    dense = torch.zeros(row_ctx.numel(), d_sae)

    def row(c, p):
        return int(((row_ctx == c) & (row_pos == p)).nonzero())

    for (c, p), v in {(1, 4): 2.0, (1, 5): 0.5, (1, 2): 1.0, (0, 2): 1.5, (2, 6): 1.5, (2, 7): 0.25}.items():
        dense[row(c, p), 0] = v
    dense[:, 1] = 0.1 * (torch.arange(row_ctx.numel()) % 3 == 0)  # latent 1: 9 rows of 0.1
    dense[row(0, 5), 2] = 3.0
    dense[row(2, 9), 3] = 0.7
    top_acts, top_indices = dense.topk(2, dim=1)  # rows where fewer than 2 latents fire carry a 0 entry
    return SparseCodes(top_acts, top_indices), dense, row_ctx, row_pos, ctx_tokens, row


def build(codes, row_ctx, row_pos, ctx_tokens, d_sae=5, d_model=4, **kw):
    gen = torch.Generator().manual_seed(0)
    W_dec = kw.pop("W_dec", torch.randn(d_sae, d_model, generator=gen))
    W_U = kw.pop("W_U", torch.randn(d_model, 40 + ctx_tokens.numel(), generator=gen))
    cfg = kw.pop("cfg", DashboardConfig(n_frequent=3, n_changed=0, n_random=0, before=3, after=1, chunk_rows=5))
    return build_dashboard(codes, d_sae, row_ctx, row_pos, ctx_tokens, ToyTokenizer(), W_U, W_dec, cfg=cfg, **kw)


# ------------------------------------------------------------------------------------------------ contexts
def test_top_contexts_shading_and_escaping():
    codes, dense, row_ctx, row_pos, ctx_tokens, row = hand_example()
    dash = build(codes, row_ctx, row_pos, ctx_tokens)
    assert [c.latent for c in dash.cards] == [1, 0, 2]  # by count: 9, 6, 1
    card = dash.cards[1]
    assert card.count == 6 and card.max_act == 2.0
    # Examples: by activation, the tie 1.5 / 1.5 in row order; every firing row listed once.
    assert [(e.row, e.act) for e in card.examples] == [(row(1, 4), 2.0), (row(0, 2), 1.5), (row(2, 6), 1.5),
                                                       (row(1, 2), 1.0), (row(1, 5), 0.5), (row(2, 7), 0.25)]
    top = card.examples[0]
    assert (top.ctx, top.pos, top.start) == (1, 4, 1)
    assert top.tokens == ctx_tokens[1, 1:6].tolist()
    assert top.acts == [0.0, 1.0, 0.0, 2.0, 0.5]
    assert card.examples[1].start == 0 and card.examples[1].acts[0] is None  # position 0 was not harvested

    page = Page(render_html(dash))
    sec = page.sections["latent-0"]
    assert sec["contexts"][0]["row"] == row(1, 4)
    toks = sec["contexts"][0]["tokens"]
    assert [t["max"] for t in toks] == [False, False, False, True, False]
    assert [t["act"] for t in toks] == [0.0, 1.0, 0.0, 2.0, 0.5]
    shaded = [(t["act"], t["alpha"]) for c in sec["contexts"] for t in c["tokens"] if t["act"] is not None]
    shaded.sort()
    assert all(a1 <= a2 for (_, a1), (_, a2) in zip(shaded, shaded[1:], strict=False))  # monotone in activation
    assert shaded[0][1] == 0.0 and shaded[-1] == (2.0, 1.0)
    unharvested = sec["contexts"][1]["tokens"][0]
    assert unharvested["act"] is None and "not harvested" in unharvested["title"]
    # Token text with HTML specials: shown literally (parsed back as text), never as markup.
    assert page.tags_in_tokens == []
    assert toks[2]["text"] == ' "q" & <' and '"q" & <' in toks[2]["title"]
    assert toks[3]["text"] == " <b>x</b>" and toks[4]["text"] == "⏎"
    raw = render_html(dash)
    assert "<b>x</b>" not in raw and "&lt;b&gt;x&lt;/b&gt;" in raw


def test_page_structure_index_and_offline():
    codes, _, row_ctx, row_pos, ctx_tokens, _ = hand_example()
    cfg = DashboardConfig(n_frequent=1, n_changed=1, n_random=2, change_min_count=1, chunk_rows=4)
    g_codes = SparseCodes(codes.top_acts.flip(0), codes.top_indices.flip(0))
    raw = render_html(build(codes, row_ctx, row_pos, ctx_tokens, cfg=cfg, g_codes=g_codes, title="<arm> & co"))
    page = Page(raw)
    assert len(page.sections) == 4  # 4 live latents: 1 frequent + 1 changed + 2 random
    assert [s["group"] for s in page.sections.values()] == ["frequent", "changed", "random", "random"]
    assert sorted(page.links) == sorted(f"#{sid}" for sid in page.sections)  # the index links every section once
    assert "<title>&lt;arm&gt; &amp; co</title>" in raw
    assert "<script" not in raw and "http" not in raw and "src=" not in raw  # self-contained, nothing fetched


def test_histogram_and_pos_hand_computed():
    # Latent 0 fires on rows 0, 1, 2 with 1, 10, 100; latent 1 on rows 3..7.
    acts = torch.tensor([[1.0], [10.0], [100.0], [0.2], [0.2], [0.2], [0.2], [0.2]])
    idx = torch.tensor([[0], [0], [0], [1], [1], [1], [1], [1]])
    row_ctx, row_pos = torch.zeros(8, dtype=torch.long), torch.arange(8)
    labels = torch.tensor([0, 0, 1, 1, 1, 1, -1, 2])  # labelled: 7 rows, tag 0: 2, tag 1: 4, tag 2: 1
    cfg = DashboardConfig(n_frequent=2, n_changed=0, n_random=0, n_bins=2, pos_min_count=1, chunk_rows=3)
    dash = build(SparseCodes(acts, idx), row_ctx, row_pos, torch.arange(8)[None], d_sae=2, cfg=cfg,
                 pos_labels=labels, pos_names=["NOUN", "VERB", "<DET>"])
    lat1, lat0 = dash.cards
    # log10 range [0, 2] in 2 bins: 1 -> bin 0; 10 (= edge 1) and 100 (the top edge) -> bin 1.
    assert lat0.hist_edges == [0.0, 1.0, 2.0] and lat0.hist_counts == [1, 2]
    assert sum(lat1.hist_counts) == 5
    # Latent 0's labelled firings: tag 0 twice, tag 1 once. Lift = share / base rate.
    assert [p[:2] for p in lat0.pos] == [("NOUN", 2), ("VERB", 1)]
    assert lat0.pos[0][2:] == pytest.approx((2 / 3, (2 / 3) / (2 / 7)))
    assert lat0.pos[1][2:] == pytest.approx((1 / 3, (1 / 3) / (4 / 7)))
    # Latent 1: rows 3..7 -> tags 1, 1, 1, (unlabelled), 2: <DET> has lift (1/4) / (1/7) = 1.75 > VERB's 1.3125.
    assert [p[0] for p in lat1.pos] == ["<DET>", "VERB"]
    assert "&lt;DET&gt;" in render_html(dash)


def test_nearest_decoder_direction_cosine():
    codes, _, row_ctx, row_pos, ctx_tokens, _ = hand_example()
    W_dec = torch.tensor([[2.0, 0, 0], [0, 1, 1], [0, 0, 3], [1, 0, 0], [1, 0, 0]])
    other = torch.tensor([[0.0, 1, 0], [1, 1, 0], [-1, 0, 0]])
    dash = build(codes, row_ctx, row_pos, ctx_tokens, d_model=3, W_dec=W_dec, other_W_dec=other, other_name="TopK")
    nearest = {c.latent: c.nearest for c in dash.cards}
    # Latent 0 = e_x: cosines 0, 1/sqrt(2), -1. Latent 1 = (e_y + e_z)/sqrt(2): 1/sqrt(2), 1/2, 0.
    assert nearest[0][0] == 1 and nearest[0][1] == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert nearest[1][0] == 0 and nearest[1][1] == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert nearest[2][1] == pytest.approx(0.0, abs=1e-6)
    page = Page(render_html(dash))
    assert page.sections["latent-0"]["nearest"] == pytest.approx((1, 1 / math.sqrt(2)), abs=1e-6)


# ------------------------------------------------------------------------------------------------ picking
def test_selection_change_hand_computed():
    # Row 0: plain {0, 1}, g {0, 2}; row 1: plain {1, 3 (value 0: not firing)}, g {1, 3}; row 2: plain {2}, g {2}.
    plain = SparseCodes(torch.tensor([[1.0, 1], [1, 0], [1, 0]]), torch.tensor([[0, 1], [1, 3], [2, 0]]))
    g = SparseCodes(torch.tensor([[1.0, 1], [1, 1], [1, 0]]), torch.tensor([[0, 2], [1, 3], [2, 1]]))
    ch = selection_change(plain, g, d_sae=5, chunk_rows=2)
    assert ch.n_plain.tolist() == [1, 2, 1, 0, 0]
    assert ch.n_g.tolist() == [1, 1, 2, 1, 0]
    assert ch.n_both.tolist() == [1, 1, 1, 0, 0]
    assert ch.distance.tolist() == pytest.approx([0.0, 0.5, 0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="same rows"):
        selection_change(plain, SparseCodes(g.top_acts[:2], g.top_indices[:2]), d_sae=5)


def test_pick_latents_deterministic_and_deduplicated():
    d_sae = 40
    count = torch.zeros(d_sae, dtype=torch.long)
    count[:30] = torch.arange(30, 0, -1) * 10  # latents 0..29 live, latent 0 most frequent; 30..39 dead
    count[5] = count[4]  # a tie: the lower id first
    n_plain = count.clone()
    n_g = count.clone()
    n_both = count.clone()
    n_both[[1, 12, 20, 25]] = count[[1, 12, 20, 25]] // 2  # distance 2/3 each; 1 is also "frequent"
    n_both[7] = count[7] // 5
    n_g[33] = 50  # fires only under g-encode and never in the shown codes: not pickable
    distance = 1 - n_both.double() / (n_plain + n_g - n_both).clamp_min(1)
    distance[n_plain + n_g - n_both == 0] = 0
    ch = SelectionChange(n_plain, n_g, n_both, distance)

    picks = pick_latents(count, 3, 4, 6, seed=0, change=ch, change_min_count=1)
    groups = {g: [p.latent for p in picks if p.group == g] for g in ("frequent", "changed", "random")}
    assert groups["frequent"] == [0, 1, 2]
    # Changed: 7 (distance 0.8), then 12, 20, 25 at 2/3 by union size (count falls with id); 1 already taken.
    assert groups["changed"] == [7, 12, 20, 25]
    assert len(groups["random"]) == 6 and groups["random"] == sorted(groups["random"])
    ids = [p.latent for p in picks]
    assert len(set(ids)) == len(ids) == 13 and all(count[i] > 0 for i in ids)
    assert pick_latents(count, 3, 4, 6, seed=0, change=ch, change_min_count=1) == picks
    other_seed = pick_latents(count, 3, 4, 6, seed=1, change=ch, change_min_count=1)
    assert other_seed[:7] == picks[:7] and other_seed[7:] != picks[7:]
    # More asked for than live latents: groups come out shorter, still disjoint.
    many = pick_latents(count, 20, 0, 20, seed=0)
    assert sorted(p.latent for p in many) == list(range(30))
    with pytest.raises(ValueError, match="g_codes"):
        pick_latents(count, 1, 1, 1)


# ------------------------------------------------------------------------------------------------ model + SAE
def test_with_tiny_model_and_gsae_matches_dense_reference():
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64,
                                                      d_vocab=100, n_ctx=32, act_fn="gelu", normalization_type="LN",
                                                      device="cpu"))
    ctx = torch.randint(0, 100, (16, 12))
    _, cache = model.run_with_cache(ctx, names_filter="blocks.1.hook_resid_pre")
    x = cache["blocks.1.hook_resid_pre"].reshape(-1, 32)
    row_ctx, row_pos = torch.arange(16).repeat_interleave(12), torch.arange(12).repeat(16)
    sae = GSAE(SAEConfig(d_in=32, d_sae=64, k=4, beta=2.0), seed=0).requires_grad_(False)
    g = torch.randn_like(x)
    plain, genc = sae.encode(x), sae.encode(x, g)
    cfg = DashboardConfig(n_frequent=4, n_changed=4, n_random=4, change_min_count=5, chunk_rows=50)
    dash = build_dashboard(SparseCodes(plain.top_acts, plain.top_indices), 64, row_ctx, row_pos, ctx, ToyTokenizer(),
                           model.W_U, sae.W_dec, g_codes=SparseCodes(genc.top_acts, genc.top_indices), cfg=cfg)
    assert len(dash.cards) == 12 and len(Page(render_html(dash)).sections) == 12
    dense, dense_g = sae.to_dense(plain), sae.to_dense(genc)
    W_U = model.W_U.detach().double()
    for card in dash.cards:
        col = dense[:, card.latent]
        assert card.count == int((col > 0).sum())
        vals = [e.act for e in card.examples]
        assert vals == pytest.approx(col.sort(descending=True).values[:len(vals)].tolist())
        assert card.examples[0].row == int(col.argmax())
        fired, fired_g = col > 0, dense_g[:, card.latent] > 0
        union = int((fired | fired_g).sum())
        assert card.change[3] == pytest.approx(1 - int((fired & fired_g).sum()) / union)
        logits = sae.W_dec[card.latent].double() @ W_U
        assert card.top_logits[0][0] == int(logits.argmax()) and card.bottom_logits[0][0] == int(logits.argmin())
        assert card.top_logits[0][1] == pytest.approx(float(logits.max()), abs=1e-5)


# ------------------------------------------------------------------------------------------------ misc
def test_latent_stats_and_bad_inputs():
    codes, dense, row_ctx, row_pos, ctx_tokens, _ = hand_example()
    st = latent_stats(codes, 5, chunk_rows=4)
    assert st.count.tolist() == (dense > 0).sum(0).tolist()
    assert st.max_act.tolist() == pytest.approx(dense.max(0).values.tolist())
    assert st.min_act.tolist() == pytest.approx([0.25, 0.1, 3.0, 0.7, 0.0])
    with pytest.raises(ValueError, match="outside context_tokens"):
        build(codes, row_ctx + 3, row_pos, ctx_tokens)
    with pytest.raises(ValueError, match="one entry per row"):
        build(codes, row_ctx[:3], row_pos[:3], ctx_tokens)
    with pytest.raises(ValueError, match="d_sae"):
        build(codes, row_ctx, row_pos, ctx_tokens, d_sae=2)
    with pytest.raises(ValueError, match="same d_model"):
        build(codes, row_ctx, row_pos, ctx_tokens, W_U=torch.randn(7, 50))
    with pytest.raises(ConfigError, match="n_examples"):
        DashboardConfig(n_examples=0)


def test_write_and_screenshot(tmp_path: Path):
    codes, _, row_ctx, row_pos, ctx_tokens, _ = hand_example()
    page = write_html(tmp_path / "d.html", render_html(build(codes, row_ctx, row_pos, ctx_tokens)))
    assert Page(page.read_text(encoding="utf-8")).sections
    if find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); HTML part checked")
    png = screenshot(page, tmp_path / "d.png", window_size=(640, 480))
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (640, 480)
