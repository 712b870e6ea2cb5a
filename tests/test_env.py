"""The pin set is exact, pip-check clean, and its two spellings (lock file, conda environment) agree."""

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, ver = line.partition("==")
            assert ver, f"requirements.lock line {line!r} is not an exact == pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = ver
    return pins


def test_environment_yml_matches_lock():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict))
    conda_pins = {re.sub(r"[-_.]+", "-", p.split("==")[0]).lower(): p.split("==")[1] for p in pip_section}
    assert conda_pins == lock_pins()


def test_lock_pins_required_versions_and_satisfies_pyproject():
    pins = lock_pins()
    assert pins["torch"] == "2.13.0"
    assert pins["transformer-lens"].startswith("3.")
    assert Requirement("sae-lens>=6.54,<7").specifier.contains(pins["sae-lens"])
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        req = Requirement(dep)
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        assert key in pins, f"{req.name} from pyproject.toml is not pinned in requirements.lock"
        assert req.specifier.contains(pins[key]), f"{req.name}=={pins[key]} violates pyproject's {req.specifier}"


def test_installed_environment_is_the_lock():
    pins = lock_pins()
    for name in ("torch", "transformer-lens", "sae-lens", "transformers", "papermill", "seaborn"):
        assert version(name).split("+")[0] == pins[name], name
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_committed_file_holds_a_machine_path():
    """Committed text (results, provenance, notebooks, notes) names paths relative to the repository: a reader's
    clone has no /work, /tmp or home directory of ours. (git ls-files: what a fresh clone gets.)"""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    pattern = re.compile(r"(?<![\w.])/(?:work|tmp|root|home|Users)/[\w.-]+")
    hits = []
    for name in filter(None, files.split("\0")):
        path = ROOT / name
        if path.suffix in {".png", ".safetensors", ".gz", ".pt"} or not path.is_file() or name.startswith("tests/"):
            continue
        text = path.read_text(errors="replace")
        hits += [f"{name}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not hits, "machine paths in committed files (make them relative): " + "; ".join(hits[:10])
