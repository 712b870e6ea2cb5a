"""Atomic writes, checksummed manifests and provenance.

Every stage writes to a temporary file in the destination directory and renames it into place
(``os.replace`` is atomic on POSIX), so a crash leaves either the old file or the new one, never half
of one. A stage is complete only when its ``manifest.json`` exists; the manifest lists the sha256 of
every file the stage produced, and ``verify_manifest`` checks them on read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .distributed import locked_append
from .paths import ROOT, results_dir

if TYPE_CHECKING:  # torch is imported where tensors are read or written, so light tools (notebook_tidy) start fast
    import torch

    from .config import Profile


MANIFEST = "manifest.json"


class IntegrityError(RuntimeError):
    """A file does not match the checksum its manifest recorded."""


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is fsynced and renamed onto ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(dest: str | Path, obj: Any) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def save_tensors(dest: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save tensors as safetensors atomically; return the file's sha256."""
    with atomic_path(dest) as tmp:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return sha256_file(dest)


def load_tensors(path: str | Path, sha256: str | None = None, rebuild_hint: str = "") -> dict[str, torch.Tensor]:
    """Load a safetensors file, first checking its sha256 when one is given."""
    if sha256 is not None:
        check_sha256(path, sha256, rebuild_hint)
    from safetensors.torch import load_file

    return load_file(str(path))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: str | Path, expected: str, rebuild_hint: str = "") -> None:
    got = sha256_file(path)
    if got != expected:
        hint = rebuild_hint or "delete the stage directory and run the stage again to rebuild it"
        raise IntegrityError(f"{path} is corrupted: sha256 {got[:16]}… != recorded {expected[:16]}…; {hint}")


def write_manifest(stage_dir: str | Path, meta: dict[str, Any], files: list[str] | None = None) -> dict[str, Any]:
    """Mark ``stage_dir`` complete: record ``meta``, provenance and the sha256 of ``files`` (relative names)."""
    stage_dir = Path(stage_dir)
    manifest = dict(meta)
    manifest["files"] = {name: sha256_file(stage_dir / name) for name in (files or [])}
    manifest.setdefault("provenance", provenance())
    manifest["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(stage_dir / MANIFEST, manifest)
    return manifest


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    """The stage's manifest, or None if the stage never completed."""
    p = Path(stage_dir) / MANIFEST
    return read_json(p) if p.exists() else None


def verify_manifest(stage_dir: str | Path, rebuild_hint: str = "") -> dict[str, Any]:
    """Read the manifest and check every file it lists; raise a clear error naming the first bad file."""
    stage_dir = Path(stage_dir)
    m = read_manifest(stage_dir)
    if m is None:
        raise FileNotFoundError(f"{stage_dir} has no {MANIFEST}: the stage did not complete; run it (again)")
    for name, digest in m.get("files", {}).items():
        p = stage_dir / name
        if not p.exists():
            raise IntegrityError(f"{p} listed in the manifest is missing; {rebuild_hint or 'rebuild the stage'}")
        check_sha256(p, digest, rebuild_hint)
    return m


RESULT_INPUTS = ("gsae", "profiles", "prereg.yaml", "prereg_v3.yaml", "prereg_v4.yaml", "prereg_v5.yaml",
                 "requirements.lock", "pyproject.toml", "run_all.sh")
"""The tracked paths whose uncommitted changes make a result "dirty". The run's own outputs (executed
notebooks, results/, figures/, README's generated table) are left out: the default run rewrites them, so
counting them would mark every default result dirty and the flag would say nothing."""


def git_commit(repo: str | Path | None = None) -> dict[str, Any]:
    """HEAD's sha and whether the code / configuration that produce results (``RESULT_INPUTS``) differ from it."""
    repo = Path(repo) if repo else ROOT
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *RESULT_INPUTS],
                                    cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", False
    return {"commit": sha or "unknown", "dirty": dirty}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformer-lens", "transformers", "sae-lens", "safetensors", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def provenance(**extra: Any) -> dict[str, Any]:
    """Who/what/where made a result: git commit, package versions, platform, plus ``extra`` (config, seed,
    data hashes)."""
    import torch

    return {
        "git": git_commit(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        # The kernel ISA torch dispatches to (AVX2, AVX512, ...): SAEs and harvests reproduce bit for bit only
        # within one (README, "Determinism").
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **extra,
    }


def registry_append(p: Profile, event: dict[str, Any]) -> None:
    """Append one line to the runs registry (every launch, failed ones included); one locked write per line,
    so processes of a torchrun launch never interleave."""
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "profile": p.name,
           "git": git_commit()["commit"], **event}
    path = results_dir(p) / "runs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    locked_append(path, json.dumps(row, sort_keys=True, default=str))
