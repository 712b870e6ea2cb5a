"""Our SAEs in SAELens' on-disk format: stock SAELens loads every built-in arm (a g-SAE too, as the TopK SAE its
plain-encode is) without gsae and encodes identically; gsae's loader reads the gradient settings back from the
metadata; directories written in the old "gtopk" format still load with the same numbers."""

import json
import subprocess
import sys

import pytest
import torch
from sae_lens import SAE, TopKSAE
from safetensors.torch import save_file

from gsae import arms
from gsae.arms import saelens
from gsae.arms.gsae import GRADIENT_FIELDS, GTopKSAE
from gsae.config import SAEConfig
from gsae.paths import ROOT
from gsae.sae import GSAE


def trained_like(beta: float, **kw) -> GSAE:
    sae = GSAE(SAEConfig(d_in=12, d_sae=48, k=5, beta=beta, grad_scale=0.5, **kw), seed=4)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    return sae


def hand_encode(sae: GSAE, x: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """The paper's encoder written out (value_mode "z", grad_norm "dataset"): z = (x - b_dec) W_enc + b_enc,
    s = z + beta z |grad_scale g W_dec^T|, keep ReLU(z) at the k largest s."""
    W_enc, W_dec, b_enc, b_dec = (t.detach().double() for t in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec))
    z = (x.double() - b_dec) @ W_enc + b_enc
    s = z if g is None else z + sae.cfg.beta * z * (sae.cfg.grad_scale * g.double() @ W_dec.T).abs()
    idx = s.topk(sae.cfg.k, dim=-1).indices
    return torch.zeros_like(z).scatter_(-1, idx, z.gather(-1, idx).clamp_min(0)).float()


def test_topk_saves_as_stock_saelens_topk_and_reconstructs_identically(tmp_path):
    sae = trained_like(0.0)
    saelens.save_sae(arms.get("topk"), sae, tmp_path / "topk", metadata={"hook_name": "blocks.1.hook_resid_pre"})
    assert {p.name for p in (tmp_path / "topk").iterdir()} == {"cfg.json", "sae_weights.safetensors"}
    loaded = SAE.load_from_disk(tmp_path / "topk")
    assert type(loaded) is TopKSAE
    x = torch.randn(50, 12)
    enc = sae.encode(x)
    ours = sae.decode(enc.top_acts, enc.top_indices)
    with torch.no_grad():
        theirs = loaded.decode(loaded.encode(x))
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-6, diff
    meta = json.loads((tmp_path / "topk" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.1.hook_resid_pre" and meta["arm"] == "topk"
    assert saelens.saved_arm(tmp_path / "topk").name == "topk"


def test_gsae_saves_as_stock_topk_that_saelens_loads_without_gsae(tmp_path):
    """A fresh interpreter that never imports gsae loads the g-SAE with stock SAELens: a TopKSAE whose encode is
    bit for bit gsae's plain-encode, with the gradient settings in its metadata."""
    sae = trained_like(2.5)
    saelens.save_sae(arms.get("gsae"), sae, tmp_path / "g", metadata={"arm": "whatever the caller says"})
    cfg = json.loads((tmp_path / "g" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and not set(GRADIENT_FIELDS) & set(cfg)
    assert {k: cfg["metadata"][k] for k in ("arm", *GRADIENT_FIELDS)} == {
        "arm": "gsae", "beta": 2.5, "value_mode": "z", "grad_norm": "dataset", "grad_scale": 0.5}
    x = torch.randn(200, 12)
    with torch.no_grad():
        plain = sae.to_dense(sae.encode(x))
    assert torch.allclose(plain, hand_encode(sae, x, None), atol=1e-5)
    save_file({"x": x, "plain": plain}, tmp_path / "io.safetensors")
    code = f"""
import sys, torch
from safetensors.torch import load_file
from sae_lens import SAE, TopKSAE
sl = SAE.load_from_disk({str(tmp_path / "g")!r})
t = load_file({str(tmp_path / "io.safetensors")!r})
with torch.no_grad():
    same = torch.equal(sl.encode(t["x"]), t["plain"])
gsae_imported = any(m.startswith("gsae") for m in sys.modules)
print(type(sl) is TopKSAE, sl.cfg.metadata.arm, sl.cfg.metadata.beta, same, gsae_imported)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "gsae", "2.5", "True", "False"]


@pytest.mark.parametrize("value_mode,grad_norm", [("z", "dataset"), ("score", "token")])
def test_gsae_loads_back_with_its_gradient_settings(tmp_path, value_mode, grad_norm):
    sae = trained_like(2.5, value_mode=value_mode, grad_norm=grad_norm)
    saelens.save_sae(arms.get("gsae"), sae, tmp_path / "g")
    back = saelens.load_sae(tmp_path / "g")
    assert back.cfg == sae.cfg
    for k, v in sae.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    arm, view = saelens.load_saelens(tmp_path / "g")
    assert arm.name == "gsae" and type(view) is GTopKSAE and isinstance(view, TopKSAE)
    x, g = torch.randn(40, 12), torch.randn(40, 12)
    with torch.no_grad():
        assert torch.equal(view.encode_with_grad(x, g), sae.to_dense(sae.encode(x, g)))
        assert torch.equal(view.encode(x), sae.to_dense(sae.encode(x)))  # SAELens encode = plain-encode
        if (value_mode, grad_norm) == ("z", "dataset"):
            assert torch.allclose(view.encode_with_grad(x, g), hand_encode(sae, x, g), atol=1e-5)
            assert not torch.equal(view.encode_with_grad(x, g), view.encode(x))  # beta = 2.5 changes the choice


def legacy_gtopk(new_dir, out_dir) -> None:
    """The directory the previous gsae wrote for the same g-SAE, built by hand: architecture "gtopk" and the
    gradient fields at the top level of cfg.json (no "arm" in the metadata)."""
    cfg = json.loads((new_dir / "cfg.json").read_text())
    meta = cfg.pop("metadata")
    out_dir.mkdir()
    legacy = {**cfg, "architecture": "gtopk", **{f: meta.pop(f) for f in GRADIENT_FIELDS}, "metadata": meta}
    del meta["arm"]
    (out_dir / "cfg.json").write_text(json.dumps(legacy))
    (out_dir / "sae_weights.safetensors").write_bytes((new_dir / "sae_weights.safetensors").read_bytes())


def test_an_old_gtopk_directory_still_loads_with_the_same_numbers_and_upgrades_in_place(tmp_path):
    sae = trained_like(1.5, value_mode="score")
    saelens.save_sae(arms.get("gsae"), sae, tmp_path / "new")
    legacy_gtopk(tmp_path / "new", tmp_path / "old")
    with pytest.raises(KeyError, match="gtopk"):  # stock SAELens never knew the old architecture
        SAE.load_from_disk(tmp_path / "old")
    assert saelens.saved_arm(tmp_path / "old").name == "gsae"
    back = saelens.load_sae(tmp_path / "old")
    assert back.cfg == sae.cfg
    x, g = torch.randn(60, 12), torch.randn(60, 12)
    with torch.no_grad():
        assert torch.equal(back.to_dense(back.encode(x, g)), sae.to_dense(sae.encode(x, g)))
        assert torch.equal(saelens.load_saelens(tmp_path / "old")[1].encode_with_grad(x, g),
                           sae.to_dense(sae.encode(x, g)))
    weights = (tmp_path / "old" / "sae_weights.safetensors").read_bytes()
    assert saelens.upgrade_saved(tmp_path / "old") is True
    assert saelens.read_cfg(tmp_path / "old") == saelens.read_cfg(tmp_path / "new")  # what save_sae writes today
    assert (tmp_path / "old" / "sae_weights.safetensors").read_bytes() == weights
    assert type(SAE.load_from_disk(tmp_path / "old")) is TopKSAE
    assert saelens.upgrade_saved(tmp_path / "old") is False


def test_a_label_free_gsae_keeps_its_arm():
    """The label-free arm saves the same format; its metadata's arm decides which arm loads it."""
    sae = trained_like(0.5)
    sl = arms.get("gsae_free").to_saelens(sae, {"hook_name": "h"})
    assert sl.cfg.metadata.arm == "gsae_free" and sl.cfg.architecture() == "topk"
    assert arms.by_architecture("topk", sl.cfg.metadata.to_dict()).name == "gsae_free"


def test_a_topk_made_by_saelens_itself_loads_as_the_topk_arm(tmp_path):
    """No gsae metadata at all: SAELens' "topk" is the TopK arm, and it reconstructs like SAELens computes."""
    from sae_lens import TopKSAEConfig

    sl = TopKSAE(TopKSAEConfig(d_in=12, d_sae=48, k=5, apply_b_dec_to_input=True, normalize_activations="none"))
    with torch.no_grad():
        sl.b_dec.normal_()
    sl.save_model(tmp_path / "sl")
    back = saelens.load_sae(tmp_path / "sl")
    assert back.cfg.beta == 0.0
    x = torch.randn(30, 12)
    with torch.no_grad():
        assert torch.equal(back.to_dense(back.encode(x)), sl.encode(x))
    with pytest.raises(ValueError, match="lacks the g-SAE setting"):
        arms.get("gsae").from_saelens(sl)


def test_the_topk_arm_refuses_a_beta_and_the_gsae_arm_needs_one():
    with pytest.raises(ValueError, match="TopK arm has no beta"):
        arms.get("topk").make_config(d_in=4, d_sae=8, k=2, beta=0.5)
    with pytest.raises(ValueError, match="needs beta > 0"):
        arms.get("gsae").make_config(d_in=4, d_sae=8, k=2)


def test_overwrite_is_atomic_and_bad_dir_is_clear(tmp_path):
    saelens.save_sae(arms.get("topk"), trained_like(0.0), tmp_path / "s")
    saelens.save_sae(arms.get("gsae"), trained_like(1.0), tmp_path / "s")
    assert saelens.load_sae(tmp_path / "s").cfg.beta == 1.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        saelens.load_sae(tmp_path / "missing")


def test_saelens_interop_lives_in_the_arms_package():
    assert not (ROOT / "gsae" / "saelens.py").exists()
