"""The repository speaks of the project alone: no tracked file mentions the work sessions that built it, hand-over
notes, helpers, issue-tracker numbers or paths outside the checkout. A planted example of each is caught."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "a work session": re.compile(r"\b(this|that|next|previous|earlier|later|each|every|a|one)\s+session\b"
                                 r"|\bsessions?\s+\d+\b|\bwork[- ]period", re.I),
    "a hand-over note": re.compile(r"\bhand-?over\b|\bNEXT\.md\b|\bHELPERS\.md\b|for the next (session|engineer)",
                                   re.I),
    "a helper or assistant brief": re.compile(r"\b(helper|assistant)s?\b\s+(brief|agent)|\bsubagents?\b", re.I),
    "an issue number": re.compile(r"\bissues?\s*#\s*\d+|\b(the|this) issue\b|\bissue \d+\b", re.I),
    "a path outside the checkout": re.compile(r"\.\./shared\b|/work/main\b|/work/shared\b|/tmp/pytest-of-"),
}
"""What must not appear, with what it is."""

SKIP_SUFFIXES = (".png", ".safetensors", ".pt", ".gguf")
SKIP = {"tests/test_repository_text.py"}
"""This file names every pattern; binary files hold no prose."""
QUOTED_CORPUS = ("latent_browser.md", "dashboards/")
"""Files that quote corpus text (State-of-the-Union addresses say "this session" of Congress)."""


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / f for f in out.splitlines()
            if f not in SKIP and not f.endswith(SKIP_SUFFIXES) and not any(q in f for q in QUOTED_CORPUS)]


def findings(text: str) -> list[str]:
    return [f"{what}: {m.group(0)!r}" for what, rx in FORBIDDEN.items() for m in rx.finditer(text)]


def test_no_tracked_file_talks_about_how_it_was_made():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    bad = []
    for path in tracked_files():
        if not path.exists():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        bad += [f"{path.relative_to(ROOT)}: {f}" for f in findings(text)]
    assert bad == []


@pytest.mark.parametrize("planted", [
    "As this session showed, the harvest is slow.", "Measured in session 9.", "See NEXT.md for the plan.",
    "A brief for the helper agents.", "Fixed in issue #13.", "as the issue states it", "see ../shared/research",
    "written under /work/main/runs"])
def test_each_kind_of_mention_is_caught(planted):
    assert findings(planted)


@pytest.mark.parametrize("fine", ['@pytest.fixture(scope="session")', "start_new_session=True",
                                  "in an interactive Jupyter session the progress shows",
                                  "the arms' shared helpers below", "known issues with MKL"])
def test_ordinary_words_are_not_flagged(fine):
    assert findings(fine) == []
