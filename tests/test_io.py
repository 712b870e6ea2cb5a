"""gsae.io: provenance's dirty flag counts code and configuration, not the run's own outputs."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from gsae import io


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_dirty_flag_ignores_run_outputs_but_not_code(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "gsae").mkdir()
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "gsae" / "x.py").write_text("a = 1\n")
    (tmp_path / "notebooks" / "00.ipynb").write_text("{}\n")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "p.yaml").write_text("k: 1\n")
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = io.git_commit(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "notebooks" / "00.ipynb").write_text('{"outputs": 1}\n')  # the run rewrote its notebook
    (tmp_path / "untracked.txt").write_text("x")
    assert io.git_commit(tmp_path)["dirty"] is False
    (tmp_path / "profiles" / "p.yaml").write_text("k: 2\n")
    assert io.git_commit(tmp_path)["dirty"] is True
    git("checkout", "--", "profiles")
    (tmp_path / "gsae" / "x.py").write_text("a = 2\n")
    assert io.git_commit(tmp_path)["dirty"] is True
