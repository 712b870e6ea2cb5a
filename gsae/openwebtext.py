"""OpenWebText (the paper profile's corpus): its first N documents, streamed from the Hugging Face Hub or read from a
local copy (``DataConfig.source``), with errors that name the dataset and the real cause. The documents carry no POS
tags and one genre, so the probe stage records C4's metrics as not measured (``gsae.stages.probe``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

OPENWEBTEXT = "Skylion007/openwebtext"
OPENWEBTEXT_DEFAULT_DOCS = 20000
"""Documents read when ``data.documents`` is 0 (far too few for the paper profile: set data.documents)."""
OPENWEBTEXT_TOKENS_PER_DOC = 1040
"""GPT-2 tokens per OpenWebText document that fall into whole 128-token contexts, on average: ~163k contexts
from the first 20,000 documents (measured); the corpus mean is ~1,130 tokens (9.04B GPT-2 tokens over 8.01M
documents). ``--dry-run`` uses it to check ``data.documents`` against the harvest budget; the contexts stage
then counts the real contexts and refuses a budget they cannot meet."""


def _read_local_openwebtext(source: Path, n_docs: int) -> list[str]:
    """The first ``n_docs`` texts of a local OpenWebText copy (``DataConfig.source``)."""
    if not source.exists():
        raise FileNotFoundError(f"data.source={str(source)!r} (a local OpenWebText copy) does not exist")
    if source.is_dir():
        files = sorted(source.glob("*.txt"))
        if not files:
            raise ValueError(f"data.source={str(source)!r} is a directory without .txt files (one document each)")
        return [f.read_text(encoding="utf-8") for f in files[:n_docs]]
    if source.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [str(t) for t in pq.read_table(source, columns=["text"]).column("text").to_pylist()[:n_docs]]
    texts = []
    with open(source, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if len(texts) >= n_docs:
                break
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{source}:{line_no} is not a JSON object with a 'text' field ({e}); "
                                     f"data.source must be a .jsonl file, a .parquet file or a directory of "
                                     f".txt files") from e
    return texts


def _stream_openwebtext(n_docs: int) -> list[str]:
    """The first ``n_docs`` texts of OpenWebText streamed from the Hugging Face Hub."""
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "0") not in ("", "0")]
    if offline:
        raise RuntimeError(
            f"corpus 'openwebtext' streams {OPENWEBTEXT} from the Hugging Face Hub, but {offline} is set: unset it "
            "on a machine with hub access, point data.source at a local copy, or use corpus 'brown+sotu' (offline)")
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise RuntimeError(f"corpus 'openwebtext' ({OPENWEBTEXT}) is read with the `datasets` package, which is "
                           f"not installed ({e}); pip install datasets") from e
    texts: list[str] = []
    try:
        stream = load_dataset(OPENWEBTEXT, split="train", streaming=True)
        for row in stream:
            if len(texts) >= n_docs:
                break
            texts.append(row["text"])
    except (ConnectionError, TimeoutError) as e:
        raise RuntimeError(f"could not reach the Hugging Face Hub to stream {OPENWEBTEXT} after {len(texts)} "
                           f"documents ({type(e).__name__}: {e}); check network access or set data.source") from e
    except Exception as e:  # the datasets / hub / pyarrow stack raises many types; keep the real cause visible
        cause = f"{type(e).__name__}: {e}"
        hint = ("a network or hub error: check access to huggingface.co or set data.source to a local copy"
                if any(w in cause.lower() for w in ("connect", "timeout", "resolve", "http", "ssl", "offline"))
                else "see the error above; it is not a network problem")
        raise RuntimeError(f"reading {OPENWEBTEXT} failed after {len(texts)} documents ({cause}); {hint}") from e
    return texts


def openwebtext_texts(n_docs: int, source: str | Path = "") -> list[str]:
    """The texts of the first ``n_docs`` OpenWebText documents (``data.load_openwebtext`` makes them documents):
    from the local copy ``source`` when given (see ``DataConfig.source``), else streamed from the Hugging Face Hub
    (paper profile). Fails if fewer exist."""
    texts = _read_local_openwebtext(Path(source), n_docs) if source else _stream_openwebtext(n_docs)
    if len(texts) < n_docs:
        where = f"the local copy {source}" if source else OPENWEBTEXT
        raise ValueError(f"data.documents={n_docs} but {where} holds only {len(texts)} documents; lower it")
    return texts
