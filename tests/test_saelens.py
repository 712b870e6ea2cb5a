"""Our SAEs in SAELens' on-disk format: stock SAELens loads them and reconstructs identically."""

import json

import pytest
import torch
from sae_lens import SAE, TopKSAE

from gsae import arms, saelens
from gsae.arms.gsae import GTopKSAE
from gsae.config import SAEConfig
from gsae.sae import GSAE


def trained_like(beta: float) -> GSAE:
    sae = GSAE(SAEConfig(d_in=12, d_sae=48, k=5, beta=beta, grad_scale=0.5), seed=4)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    return sae


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
    assert meta["hook_name"] == "blocks.1.hook_resid_pre"


def test_gsae_round_trips_through_registered_architecture(tmp_path):
    import importlib

    importlib.reload(importlib.import_module("gsae.arms.gsae"))  # a notebook re-running the import must not raise
    sae = trained_like(2.5)
    saelens.save_sae(arms.get("gsae"), sae, tmp_path / "g")
    assert json.loads((tmp_path / "g" / "cfg.json").read_text())["architecture"] == "gtopk"
    loaded = SAE.load_from_disk(tmp_path / "g")
    assert type(loaded).__name__ == GTopKSAE.__name__ and loaded.cfg.beta == 2.5
    x, g = torch.randn(40, 12), torch.randn(40, 12)
    with torch.no_grad():
        assert torch.equal(loaded.encode_with_grad(x, g), sae.to_dense(sae.encode(x, g)))
        assert torch.allclose(loaded.encode(x), sae.to_dense(sae.encode(x)))  # SAELens encode = plain-encode
    back = saelens.load_sae(tmp_path / "g")
    assert back.cfg == sae.cfg
    for k, v in sae.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])


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
