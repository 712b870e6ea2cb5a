"""Generated blocks in hand-written Markdown: the text between a ``<!-- NAME:start -->`` / ``<!-- NAME:end -->``
pair is replaced by (or checked against) generated text, everything else is left as it is."""

from __future__ import annotations

import difflib
from pathlib import Path

from ..io import atomic_path


class MarkerError(ValueError):
    """The file lacks exactly one start marker followed by one end marker; the message says what to add."""


def markers(name: str) -> tuple[str, str]:
    """The marker pair of the block ``name``, e.g. ``("<!-- claims:start -->", "<!-- claims:end -->")``."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def _split(text: str, path: Path, name: str) -> tuple[str, str, str]:
    start, end = markers(name)
    n_start, n_end = text.count(start), text.count(end)
    if n_start != 1 or n_end != 1 or text.index(end) < text.index(start):
        raise MarkerError(f"{path} must contain exactly one '{start}' followed by one '{end}' (found {n_start} and "
                          f"{n_end}); put the pair on their own lines where the generated block belongs")
    i, j = text.index(start) + len(start), text.index(end)
    return text[:i], text[i:j], text[j:]


def _block(body: str) -> str:
    return "\n" + body.strip("\n") + "\n"


def _read(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; it needs a generated-block marker pair")
    return path.read_text()


def update(path: str | Path, name: str, body: str) -> None:
    """Replace block ``name`` of ``path`` with ``body`` (atomic write)."""
    path = Path(path)
    head, _, tail = _split(_read(path), path, name)
    with atomic_path(path) as tmp:
        tmp.write_text(head + _block(body) + tail)


def stale_diff(path: str | Path, name: str, body: str) -> str:
    """"" if block ``name`` of ``path`` is exactly what ``update`` would write, else a unified diff."""
    path = Path(path)
    current = _split(_read(path), path, name)[1]
    if current == _block(body):
        return ""
    return "".join(difflib.unified_diff(current.splitlines(True), _block(body).splitlines(True),
                                        f"{path.name} {name} (committed)", f"{path.name} {name} (generated)"))
