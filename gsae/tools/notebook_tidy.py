"""Make an executed notebook fit to commit: no progress widgets, no machine paths, no duplicated timestamps.

``python -m gsae.tools.notebook_tidy [--root DIR] [--verbose] NOTEBOOK...`` (run_all.sh runs it after each
notebook) rewrites each notebook in place, atomically, silently (``--verbose`` says what it changed; an error is
always reported); a second run changes nothing. Cell sources and image outputs are never touched.

- Widget outputs (tqdm.auto bars of libraries) and the notebook's saved widget state go: without a live kernel
  they render as "Loading widget..." or a frozen ``0%|          | 0/121`` (progress belongs on the terminal).
- Carriage-return redraws in stream text are collapsed to what a terminal would finally show.
- Absolute paths of the repository (made relative), of the Python environment (``<python-env>``) and of the
  home directory (``~``) in outputs and metadata are rewritten.
- The per-cell ``execution`` metadata (four iopub timestamps per cell, which papermill's per-cell metadata
  repeats) goes; papermill's per-cell duration and status and the notebook's total duration stay as provenance.
- papermill's ``output_path`` is set to where the notebook is (run_all.sh executes into a temporary name).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import nbformat

from ..io import atomic_path
from ..paths import ROOT

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE_KEY = "widgets"  # notebook metadata key holding application/vnd.jupyter.widget-state+json


class TidyStats(NamedTuple):
    widget_outputs: int
    """Widget outputs removed."""
    path_strings: int
    """Absolute machine paths rewritten (occurrences)."""
    redraws: int
    """Stream outputs whose carriage-return redraws were collapsed."""
    metadata_keys: int
    """Metadata entries removed or rewritten (widget state, per-cell execution timestamps, output_path)."""

    @property
    def changed(self) -> bool:
        return any(self)


def machine_prefixes(root: str | Path) -> list[tuple[str, str]]:
    """(absolute prefix, replacement) pairs, longest first: the repository (both as given and with symlinks
    resolved) becomes relative, a Python environment outside it ``<python-env>``, the home directory ``~``."""
    pairs: dict[str, str] = {}

    def add(path: str | Path, replacement: str) -> None:
        for p in {os.path.abspath(path), os.path.realpath(path)}:
            if p not in ("/", "") and p not in pairs:
                pairs[p] = replacement

    add(root, "")
    roots = tuple(pairs)
    for env in (sys.prefix, os.environ.get("VIRTUAL_ENV")):
        if env and not any(os.path.realpath(env).startswith(r + os.sep) for r in roots):
            add(env, "<python-env>")
    add(Path.home(), "~")
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))


def _path_pattern(prefixes: Sequence[tuple[str, str]]) -> tuple[re.Pattern[str], dict[str, str]]:
    # A prefix counts only as a whole path component: "/srv/clone" matches "/srv/clone/x" and "/srv/clone'"
    # but not "/srv/cloneline".
    alternatives = "|".join(re.escape(p) for p, _ in prefixes)
    return re.compile(rf"({alternatives})(/|(?![\w.\-]))"), dict(prefixes)


def _replace_paths(s: str, pattern: re.Pattern[str], repl: dict[str, str]) -> tuple[str, int]:
    def sub(m: re.Match[str]) -> str:
        new = repl[m.group(1)]
        if m.group(2) == "/":
            return f"{new}/" if new else ""
        return new or "."

    return pattern.subn(sub, s)


def collapse_redraws(text: str) -> str:
    """What a terminal shows for text with carriage returns: each ``\\r`` returns to the line start, and what
    follows overwrites the line character by character."""
    out = []
    for line in text.replace("\r\n", "\n").split("\n"):
        shown = ""
        for segment in line.split("\r"):
            shown = segment + shown[len(segment):]
        out.append(shown)
    return "\n".join(out)


def _walk(obj: Any, fix: Any, skip_keys: Any = lambda k: False) -> tuple[Any, int]:
    """Apply ``fix(str) -> (str, count)`` to every string inside ``obj`` (dicts, lists), in place for containers."""
    if isinstance(obj, str):
        return fix(obj)
    total = 0
    if isinstance(obj, dict):
        for k in list(obj):
            if not skip_keys(k):
                obj[k], n = _walk(obj[k], fix, skip_keys)
                total += n
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            obj[i], n = _walk(v, fix, skip_keys)
            total += n
    return obj, total


def _is_image(key: str) -> bool:
    return key.startswith("image/") or key == "application/pdf"


def tidy_notebook(nb: dict[str, Any], root: str | Path) -> TidyStats:
    """Tidy ``nb`` (an nbformat v4 notebook, e.g. from ``nbformat.read``) IN PLACE; see the module docstring."""
    pattern, repl = _path_pattern(machine_prefixes(root))

    def fix(s: str) -> tuple[str, int]:
        return _replace_paths(s, pattern, repl)

    widgets = paths = redraws = meta = 0
    if WIDGET_STATE_KEY in nb.get("metadata", {}):
        del nb["metadata"][WIDGET_STATE_KEY]
        meta += 1
    for cell in nb.get("cells", []):
        if "execution" in cell.get("metadata", {}):
            del cell["metadata"]["execution"]
            meta += 1
        outputs = cell.get("outputs")
        if outputs is None:
            continue
        kept = [o for o in outputs if WIDGET_VIEW not in o.get("data", {})]
        widgets += len(outputs) - len(kept)
        for o in kept:
            if o.get("output_type") == "stream":
                text = "".join(o["text"]) if isinstance(o["text"], list) else o["text"]
                if "\r" in text:
                    o["text"] = collapse_redraws(text)
                    redraws += 1
            _, n = _walk(o, fix, skip_keys=_is_image)
            paths += n
        cell["outputs"] = kept
        _, n = _walk(cell.get("metadata", {}), fix)
        paths += n
    _, n = _walk(nb.get("metadata", {}), fix)
    paths += n
    return TidyStats(widgets, paths, redraws, meta)


def tidy_file(path: str | Path, root: str | Path = ROOT) -> TidyStats:
    """Tidy the notebook at ``path`` and rewrite it atomically if anything changed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such notebook; give the path of an executed .ipynb")
    nb = nbformat.read(path, as_version=4)
    stats = tidy_notebook(nb, root)
    pm = nb.metadata.get("papermill")
    if pm is not None:
        try:
            where = path.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:  # the notebook lives outside the repository: record only its name
            where = path.name
        if pm.get("output_path") != where:
            pm["output_path"] = where
            stats = stats._replace(metadata_keys=stats.metadata_keys + 1)
    if stats.changed:
        mode = path.stat().st_mode & 0o777
        with atomic_path(path) as tmp:
            nbformat.write(nb, tmp)
            tmp.chmod(mode)  # keep the notebook's permissions (the temporary file is private, 0600)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gsae.tools.notebook_tidy", description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+", type=Path, help="executed .ipynb files, rewritten in place")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root whose absolute path is made relative")
    ap.add_argument("--verbose", action="store_true", help="say what was tidied in each notebook")
    args = ap.parse_args(argv)
    for nb_path in args.notebooks:
        s = tidy_file(nb_path, args.root)
        if args.verbose:
            print(f"tidied {nb_path}: {s.widget_outputs} widget outputs, {s.path_strings} machine paths, "
                  f"{s.redraws} redrawn streams, {s.metadata_keys} metadata entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
