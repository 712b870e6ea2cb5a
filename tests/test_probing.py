"""gsae.probing against independent references: brute-force pairwise AUC (every positive against every
negative), hand-made labels and latents with known AUC, and hand-built Markdown for the latent cards."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import gsae.probing as P
from gsae.probing import ProbeResult, best_latent_auc, escape_markdown, frequent_classes, latent_cards


def brute_force_auc(scores: np.ndarray, labels: np.ndarray, cls: int) -> np.ndarray:
    """[d_sae] AUC of every column: fraction of (positive, negative) pairs ordered right, ties 1/2."""
    keep = labels >= 0
    s, y = scores[keep], labels[keep] == cls
    pos, neg = s[y], s[~y]
    out = np.empty(scores.shape[1])
    for j in range(scores.shape[1]):
        diff = pos[:, j][:, None] - neg[:, j][None, :]
        out[j] = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    return out


def tied_data(n: int = 300, d_sae: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    # Few distinct values and mostly zeros: many ties, inside and outside the zero block.
    acts = rng.choice([0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 2.0, 3.5], size=(n, d_sae))
    acts[:, 3] = 0.0  # a dead latent
    labels = rng.choice([-1, 0, 1, 2, 5], size=n)
    return torch.tensor(acts, dtype=torch.float32), torch.tensor(labels)


def test_auc_matches_brute_force_with_ties():
    acts, labels = tied_data()
    classes = [0, 1, 2, 5]
    res = best_latent_auc(acts, labels, classes)
    assert isinstance(res, ProbeResult) and res.all_auc.shape == (4, 24)
    for ci, c in enumerate(classes):
        ref = brute_force_auc(acts.double().numpy(), labels.numpy(), c)
        np.testing.assert_allclose(res.all_auc[ci].numpy(), ref, atol=1e-12)
        assert res.auc[ci].item() == pytest.approx(ref.max(), abs=1e-12)
        assert res.best_latent[ci].item() == int(np.argmax(ref))
        assert res.n_pos[ci].item() == int((labels == c).sum())
    assert res.n_tokens == int((labels >= 0).sum())
    assert res.mean_auc == pytest.approx(float(res.auc.mean()))
    assert (res.all_auc[:, 3] == 0.5).all()  # dead latent


def test_auc_continuous_values_match_brute_force():
    rng = np.random.default_rng(1)
    acts = np.maximum(rng.normal(size=(200, 10)), 0)  # half zeros, continuous positives
    labels = rng.integers(0, 3, size=200)
    res = best_latent_auc(torch.tensor(acts), torch.tensor(labels), [2, 0])
    for ci, c in enumerate([2, 0]):
        np.testing.assert_allclose(res.all_auc[ci].numpy(), brute_force_auc(acts, labels, c), atol=1e-12)


def test_sparse_code_and_dense_blocks_agree(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    n, d_sae, k = 250, 40, 5
    top_indices = torch.stack([torch.randperm(d_sae, generator=gen)[:k] for _ in range(n)])
    top_acts = torch.randint(0, 4, (n, k), generator=gen).float() / 2  # ties and explicit zeros in the code
    dense = torch.zeros(n, d_sae).scatter_(1, top_indices, top_acts)
    labels = torch.randint(-1, 4, (n,), generator=gen)
    classes = [0, 1, 2, 3]
    ref = np.stack([brute_force_auc(dense.double().numpy(), labels.numpy(), c) for c in classes])
    from_dense = best_latent_auc(dense, labels, classes)
    from_sparse = best_latent_auc((top_acts, top_indices, d_sae), labels, classes)
    monkeypatch.setattr(P, "DENSE_BLOCK_ELEMENTS", n * 7)  # 7 latents per block: several blocks
    from_blocks = best_latent_auc(dense, labels, classes)
    for res in (from_dense, from_sparse, from_blocks):
        np.testing.assert_allclose(res.all_auc.numpy(), ref, atol=1e-12)
    assert torch.equal(from_sparse.best_latent, from_dense.best_latent)


def test_indicator_constant_and_dead_latents():
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (120,), generator=gen)
    labels[:10] = -1
    acts = torch.zeros(120, 4)
    acts[:, 0] = (labels == 1).float() * 2.5  # fires exactly on class 1
    acts[:, 1] = 1.0  # constant
    acts[:, 2] = (labels == 2).float()  # fires exactly on class 2
    acts[:10, 0] = 7.0  # huge activations on ignored tokens must not matter
    res = best_latent_auc(acts, labels, [1, 2, 0])
    assert res.auc[0].item() == 1.0 and res.best_latent[0].item() == 0
    assert res.auc[1].item() == 1.0 and res.best_latent[1].item() == 2
    assert (res.all_auc[:, 1] == 0.5).all() and (res.all_auc[:, 3] == 0.5).all()
    # Class 0: the indicators of classes 1 and 2 fire on its negatives only, so AUC < 0.5 (not flipped);
    # the best for class 0 is the constant / dead latent at 0.5, and the lowest such index wins.
    assert res.all_auc[2, 0].item() < 0.5 and res.auc[2].item() == 0.5 and res.best_latent[2].item() == 1


def test_ignored_labels_equal_filtering():
    acts, labels = tied_data(seed=4)
    keep = labels >= 0
    a = best_latent_auc(acts, labels, [0, 1])
    b = best_latent_auc(acts[keep], labels[keep], [0, 1])
    assert torch.equal(a.all_auc, b.all_auc) and a.n_tokens == b.n_tokens == int(keep.sum())


def test_probe_bad_inputs():
    acts, labels = tied_data()
    with pytest.raises(ValueError, match="undefined"):
        best_latent_auc(acts, labels, [0, 7])  # class 7 absent
    with pytest.raises(ValueError, match=">= 0"):
        best_latent_auc(acts - 1, labels, [0])
    with pytest.raises(ValueError, match="rows"):
        best_latent_auc((acts[:5, :2], torch.arange(2).repeat(5, 1), 24), labels, [0])
    with pytest.raises(ValueError, match="twice"):
        best_latent_auc((torch.ones(300, 2), torch.zeros(300, 2, dtype=torch.long), 24), labels, [0])
    with pytest.raises(ValueError, match=r"\[N=300, d_sae\]"):
        best_latent_auc(acts[:10], labels, [0])
    with pytest.raises(ValueError, match="distinct"):
        best_latent_auc(acts, labels, [0, 0])


def test_frequent_classes():
    labels = torch.tensor([3] * 5 + [1] * 7 + [0] * 5 + [2] * 2 + [-1] * 9)
    assert frequent_classes(labels, min_count=3, max_n=10) == [1, 0, 3]  # ties: lower id first
    assert frequent_classes(labels, min_count=3, max_n=2) == [1, 0]
    assert frequent_classes(labels, min_count=6, max_n=10) == [1]
    assert frequent_classes(labels, min_count=0, max_n=10) == [1, 0, 3, 2]
    assert frequent_classes(torch.full((4,), -1), 1, 5) == []


# ------------------------------------------------------------------------------------------------ cards
class ToyTokenizer:
    """decode(ids) = the concatenation of a fixed per-id string (some with Markdown/HTML specials)."""

    special = {5: " *star*", 6: " a|b", 7: " <b>", 8: "\n", 9: " $x$", 10: " [link](u)"}

    def decode(self, ids):
        return "".join(self.special.get(i, f" w{i}") for i in ids)


def card_inputs():
    n_ctx, T = 3, 10
    ctx_tokens = torch.arange(100, 100 + n_ctx * T).view(n_ctx, T)
    ctx_tokens[1, 4] = 5  # " *star*"
    ctx_tokens[1, 3] = 6
    ctx_tokens[1, 5] = 8
    row_ctx = torch.arange(n_ctx).repeat_interleave(T - 2)
    row_pos = torch.arange(1, T - 1).repeat(n_ctx)
    acts = torch.zeros(row_ctx.numel(), 3)
    acts[(row_ctx == 1) & (row_pos == 4), 0] = 2.0  # top example: the " *star*" token
    acts[(row_ctx == 0) & (row_pos == 1), 0] = 1.5
    acts[(row_ctx == 2) & (row_pos == 8), 0] = 1.5  # tie with the row above: earlier row first
    acts[(row_ctx == 2) & (row_pos == 2), 2] = 0.25
    return acts, row_ctx, row_pos, ctx_tokens


def test_latent_cards_content_and_order():
    acts, row_ctx, row_pos, ctx_tokens = card_inputs()
    md = latent_cards([0, 1, 2], acts, row_ctx, row_pos, ctx_tokens, ToyTokenizer(), n_examples=8, window=2, after=1)
    card0, card1, card2 = md.split("### ")[1:]
    assert card0.startswith("Latent 0\n") and "fires on 3 of 24 tokens (12.500%)" in card0
    rows = [line for line in card0.splitlines() if line.startswith("| ") and line[2].isdigit()]
    # Window: 2 tokens before, the marked token, 1 after; ellipses where the context goes on.
    assert rows[0] == r"| 2.000 | … w112 a\|b **[[\*star\*]]**⏎… |"
    assert rows[1] == "| 1.500 | w100 **[[w101]]** w102… |"
    assert rows[2] == "| 1.500 | … w126 w127 **[[w128]]** w129 |"
    assert "never fires on these 24 tokens" in card1
    assert "**[[w122]]**" in card2 and "0.250" in card2
    # Every table row has exactly its 3 structural pipes; the token's pipe is escaped.
    for line in md.splitlines():
        if line.startswith("| "):
            assert len(re.findall(r"(?<!\\)\|", line)) == 3, line
    assert latent_cards([0, 1, 2], acts, row_ctx, row_pos, ctx_tokens, ToyTokenizer(), window=2, after=1) == md


def test_latent_cards_input_forms_agree_and_limit_examples():
    acts, row_ctx, row_pos, ctx_tokens = card_inputs()
    top_acts, top_indices = acts.topk(2, dim=1)
    args = (row_ctx, row_pos, ctx_tokens, ToyTokenizer())
    dense = latent_cards([0, 2], acts, *args, n_examples=2)
    assert dense == latent_cards([0, 2], (top_acts, top_indices, 3), *args, n_examples=2)
    assert dense == latent_cards([0, 2], lambda j: acts[:, j], *args, n_examples=2)
    assert dense.count("**[[") == 3  # 2 examples for latent 0 (of 3), 1 for latent 2


def test_escape_markdown():
    assert escape_markdown("a*b_c|d<e>&$f$\n[g]`h`#") == r"a\*b\_c\|d&lt;e&gt;&amp;\$f\$⏎\[g\]\`h\`\#"


def test_latent_cards_bad_inputs():
    acts, row_ctx, row_pos, ctx_tokens = card_inputs()
    with pytest.raises(ValueError, match="outside context_tokens"):
        latent_cards([0], acts, row_ctx + 5, row_pos, ctx_tokens, ToyTokenizer())
    with pytest.raises(ValueError, match="out of range"):
        latent_cards([9], acts, row_ctx, row_pos, ctx_tokens, ToyTokenizer())
    with pytest.raises(ValueError, match="equal length"):
        latent_cards([0], acts, row_ctx[:3], row_pos, ctx_tokens, ToyTokenizer())


def test_held_out_auc_scores_the_latent_chosen_on_the_other_split():
    """Latent 0 fires on class 1 in the choosing split, latent 1 in the scoring split: the held-out AUC is latent
    0's AUC on the scoring split (0.5: it never fires there), not the scoring split's own best (1.0)."""
    from gsae.probing import held_out_auc

    labels = torch.tensor([1, 1, 0, 0])
    choose = best_latent_auc(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]), labels, [1])
    score = best_latent_auc(torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]), labels, [1])
    assert int(choose.best_latent[0]) == 0 and float(score.auc[0]) == 1.0
    assert held_out_auc(choose, score) == 0.5
    assert held_out_auc(score, score) == 1.0
