"""The arm registry: a new SAE architecture is one class plus one ``register`` call, and every layer of the
package (config, specs, training, SAELens save/load, evaluation, figures, claims) picks it up with no other file
changed. The dummy arm here is a TopK SAE with an extra L1 penalty on its kept activations, saved as its own
SAELens architecture."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import yaml
from sae_lens import SAE, TopKSAE, TopKSAEConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from transformer_lens import HookedTransformer, HookedTransformerConfig

from gsae import arms, evals, specs
from gsae.analysis import figures
from gsae.arms import saelens
from gsae.arms.topk import TopKArm
from gsae.config import TrainConfig, profile_from_dict
from gsae.lm import capture
from gsae.paths import ROOT
from gsae.stages.evaluate import activation_metrics
from gsae.train import train_sae

HOOK = "blocks.1.hook_resid_pre"


@dataclass
class L1TopKSAEConfig(TopKSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "l1topk_test"


class L1TopKSAE(TopKSAE):
    pass


class L1TopKArm(TopKArm):
    """TopK plus l1_coef x mean |kept activations|: a different loss, so different weights from TopK."""

    name = "l1topk"
    label = "L1-TopK"
    color = "#2ca02c"
    architecture = "l1topk_test"
    l1_coef = 0.05

    def loss(self, sae, x, g, dead_mask, k_aux, train):
        base = super().loss(sae, x, g, dead_mask, k_aux, train)
        l1 = base.top_acts.abs().sum(-1).mean() / x.norm(dim=-1).mean()
        return base._replace(total=base.total + self.l1_coef * l1, terms={**base.terms, "l1": l1})

    def to_saelens(self, sae, metadata=None):
        from gsae.arms.saelens import topk_saelens_fields

        out = L1TopKSAE(L1TopKSAEConfig(**topk_saelens_fields(sae.cfg, metadata)))
        out.load_state_dict({k: v.detach().clone() for k, v in sae.state_dict().items()})
        return out


@pytest.fixture()
def l1_arm():
    if "l1topk_test" not in SAE_CLASS_REGISTRY:
        register_sae_class("l1topk_test", L1TopKSAE, L1TopKSAEConfig)
    arm = arms.register(L1TopKArm())
    yield arm
    arms.unregister(arm.name)


def tiny_lm() -> HookedTransformer:
    torch.manual_seed(0)
    return HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32,
                                                     d_vocab=50, n_ctx=16, act_fn="gelu", normalization_type="LN",
                                                     device="cpu"))


def test_a_registered_arm_runs_train_save_saelens_load_evaluate(l1_arm, tmp_path):
    model = tiny_lm()
    tokens = torch.randint(0, 50, (24, 16), generator=torch.Generator().manual_seed(1))
    cap = capture(model, tokens, HOOK)
    x, g = cap.x[:, 1:-1].reshape(-1, 16), cap.g[:, 1:-1].reshape(-1, 16)

    # config and specs accept it by name; specs never need to know what it is
    raw = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    raw["experiment"]["arms"] = ["topk", "l1topk"]
    p = specs.check_profile(profile_from_dict("dummy", raw))
    grid = specs.experiment_specs(p, 16, 1.0, {}, 1e-3)
    assert {s.arm for s in grid} == {"topk", "l1topk"} and all(s.sae.beta == 0 for s in grid)

    # train with its own loss: the logged history names its extra term, and the weights differ from TopK's
    cfg = arms.get("l1topk").make_config(d_in=16, d_sae=32, k=4)
    train = TrainConfig(tokens=len(x) // 64 * 64 * 4, batch_size=64, lr=3e-3, dead_tokens=256)

    def stream():
        for _ in range(4):
            for i in range(0, len(x) // 64 * 64, 64):
                yield x[i:i + 64], g[i:i + 64]

    res = train_sae("l1topk", cfg, train, stream, progress=False)
    ref = train_sae("topk", cfg, train, stream, progress=False)
    assert "l1" in res.history[-1] and "l1" not in ref.history[-1]
    assert not torch.equal(res.sae.W_dec, ref.sae.W_dec)

    # SAELens format under its own architecture; stock SAELens loads it and reconstructs like our module
    saelens.save_sae(arms.get("l1topk"), res.sae, tmp_path / "sae")
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["architecture"] == "l1topk_test"
    sl = SAE.load_from_disk(tmp_path / "sae")
    assert type(sl) is L1TopKSAE
    back = saelens.load_sae(tmp_path / "sae")
    with torch.no_grad():
        enc = back.encode(x)
        assert torch.allclose(sl.decode(sl.encode(x)), back.decode(enc.top_acts, enc.top_indices), atol=1e-5)

    # evaluation: the spliced CE and activation metrics run on it like on any arm
    base = evals.ablation_baselines(model, tokens[:8], HOOK, progress=False)
    out = evals.evaluate_saes(model, {"l1": back}, tokens[:8], HOOK, baselines=base, progress=False)
    assert out["l1"]["g"].delta_ce == out["l1"]["plain"].delta_ce  # its code ignores the gradient
    def splice(act, hook):  # an independent splice: TransformerLens hook, positions 1.. reconstructed
        e = back.encode(act[:, 1:])
        return torch.cat([act[:, :1], back.decode(e.top_acts, e.top_indices)], dim=1)

    with torch.no_grad():
        per_token = model.run_with_hooks(tokens[:8], return_type="loss", loss_per_token=True,
                                         fwd_hooks=[(HOOK, splice)])
    assert out["l1"]["plain"].ce_spliced == pytest.approx(per_token[:, 1:].mean().item(), rel=1e-5)
    assert 0 < activation_metrics(back, x, g, "plain")["fvu"] < 2

    # figures and claims label it from the registry
    assert figures.palette()["L1-TopK"] == "#2ca02c"
    assert l1_arm.label_for("g") == "L1-TopK" and l1_arm.encode_modes() == ("plain",)


def test_unknown_arm_is_a_clear_error():
    with pytest.raises(KeyError, match="registered arms"):
        arms.get("jumprelu")
    with pytest.raises(KeyError, match="no registered arm saves"):
        arms.by_architecture("jumprelu")


def test_the_saved_arm_comes_from_the_metadata_when_several_arms_save_one_architecture():
    """The g-SAE and the TopK arm both save SAELens' "topk": the metadata's ``arm`` tells them apart; without one
    (a SAELens SAE made elsewhere) "topk" is the TopK arm; the old "gtopk" is the g-SAE's."""
    assert arms.get("gsae").architecture == arms.get("topk").architecture == "topk"
    assert arms.by_architecture("topk").name == "topk"
    assert arms.by_architecture("topk", {"hook_name": "h"}).name == "topk"
    assert arms.by_architecture("topk", {"arm": "gsae"}).name == "gsae"
    assert arms.by_architecture("topk", {"arm": "gsae_free"}).name == "gsae_free"
    assert arms.by_architecture("gtopk").name == "gsae"
    assert arms.by_architecture("gtopk", {"arm": "gsae_free"}).name == "gsae_free"
    with pytest.raises(KeyError, match="metadata names arm 'l1topk'.*import the module that registers it"):
        arms.by_architecture("topk", {"arm": "l1topk"})
    with pytest.raises(KeyError, match="metadata names arm 'topk'"):
        arms.by_architecture("gtopk", {"arm": "topk"})  # the TopK arm never wrote "gtopk"


def test_the_arm_modules_import_the_registry_not_the_package():
    """gsae/arms/__init__.py imports its arm modules (registration); they import gsae.arms.registry, so the static
    import graph of the package has no cycle."""
    import ast

    for name in ("gsae", "topk", "saelens", "registry"):
        tree = ast.parse((ROOT / "gsae" / "arms" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module is not None, f"gsae/arms/{name}.py imports the package gsae.arms itself"
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("gsae.arms"), name
    assert arms.Arm is arms.registry.Arm and arms.get is arms.registry.get
