"""KL fine-tuning arms (``gsae.arms.kl_finetune``: topk_kl, gsae_kl) against independent references: their MSE phase
is the plain arm's training bit for bit (checkpoints compared byte for byte); the KL they train on equals a
hand-written TransformerLens splice hook + ``torch.nn.functional.kl_div``; a few KL steps lower the spliced KL of
the batch they see; a run killed in the KL phase resumes to the same bits; and the cost of a KL token against an
MSE token is measured and printed (not asserted)."""

from __future__ import annotations

import dataclasses
import math
import time
from types import SimpleNamespace

import pytest
import tiny_text
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer, HookedTransformerConfig

from gsae import arms
from gsae.arms.kl_finetune import ContextSampler, KLData, KLPhase, kl_steps
from gsae.config import SAEConfig, TrainConfig, config_hash
from gsae.io import load_tensors
from gsae.lm import capture
from gsae.sae import GSAE
from gsae.train import CKPT_TENSORS, Job, load_checkpoint, train_sae, train_saes

D, V, T, D_SAE, K, BATCH = 32, 100, 16, 128, 4, 64
HOOK = "blocks.1.hook_resid_pre"
PAIRS = [("topk", "topk_kl", 0.0), ("gsae", "gsae_kl", 1.0)]


def progressions(n: int, gen: torch.Generator) -> torch.Tensor:
    return tiny_text.progressions(n, gen, V, T)


@pytest.fixture(scope="module")
def lm():
    """A tiny LM trained for 60 Adam steps (a random one predicts almost uniformly), its train contexts, and the
    harvest-like rows (x, g at positions 1..T-2) the MSE phase streams."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=2, d_model=D, d_head=8, n_heads=4, d_mlp=64, d_vocab=V, n_ctx=T, act_fn="gelu",
        normalization_type="LN", seed=0, device="cpu"))
    tiny_text.fit(model, 60, gen, V, T)
    contexts = progressions(200, gen)
    cap = capture(model, contexts, HOOK)
    x, g = cap.x[:, 1:-1].reshape(-1, D), cap.g[:, 1:-1].reshape(-1, D)
    yield SimpleNamespace(model=model, contexts=contexts, x=x, g=g,
                          grad_scale=math.sqrt(D / g.pow(2).sum(-1).mean().item()))
    torch.set_num_threads(old)


def stream(lm, seed: int = 1):
    def batches():
        perm = torch.randperm(len(lm.x), generator=torch.Generator().manual_seed(seed))
        for i in range(0, len(perm) - BATCH + 1, BATCH):
            yield lm.x[perm[i:i + BATCH]], lm.g[perm[i:i + BATCH]]
    return batches


def configs(lm, beta: float, steps: int = 20, **train):
    sae = SAEConfig(d_in=D, d_sae=D_SAE, k=K, beta=beta, grad_scale=lm.grad_scale)
    kw = {"lr": 3e-3, "dead_tokens": BATCH * 5, "kl_frac": 0.25, **train}
    return sae, TrainConfig(tokens=BATCH * steps, batch_size=BATCH, **kw)


def trained_sae(lm, beta: float, seed: int = 0) -> GSAE:
    sae_cfg, cfg = configs(lm, beta, seed=seed)
    return train_sae("gsae" if beta else "topk", sae_cfg, dataclasses.replace(cfg, tokens=BATCH * 10), stream(lm),
                     progress=False).sae


# ------------------------------------------------------------------------------------------- independent reference
def reference_kl(model, tokens: torch.Tensor, sae: GSAE, *, use_grad: bool, clean_above: float | None = None,
                 hook: str = HOOK) -> float:
    """Mean over predictions 1..T-2 of KL(clean || spliced), with TransformerLens hooks and F.kl_div only: every
    position from 1 on is replaced by the SAE's reconstruction of it (g-encode with the gradient of the summed
    next-token CE when ``use_grad``); a position whose norm exceeds ``clean_above`` keeps its activation."""
    grad = None
    if use_grad:
        leaf = {}

        def store(act, hook):
            leaf["x"] = act.detach().requires_grad_(True)
            return leaf["x"]

        with torch.enable_grad():
            per_token = model.run_with_hooks(tokens, return_type="loss", loss_per_token=True,
                                             fwd_hooks=[(hook, store)])
            grad = torch.autograd.grad(per_token.sum(), leaf["x"])[0]

    def splice(act, hook):
        new = act.clone()
        with torch.no_grad():
            enc = sae.encode(act[:, 1:], None if grad is None else grad[:, 1:])
            rec = sae.decode(enc.top_acts, enc.top_indices)
        if clean_above is not None:
            rec = torch.where(act[:, 1:].norm(dim=-1, keepdim=True) > clean_above, act[:, 1:], rec)
        new[:, 1:] = rec
        return new

    with torch.no_grad():
        clean = model(tokens)
        spliced = model.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])
    logp = F.log_softmax(clean[:, 1:T - 1].double(), dim=-1).reshape(-1, V)
    logq = F.log_softmax(spliced[:, 1:T - 1].double(), dim=-1).reshape(-1, V)
    return float(F.kl_div(logq, logp, log_target=True, reduction="batchmean"))


# ------------------------------------------------------------------------------------------------------------ tests
def test_registered_and_scheduled():
    assert arms.get("topk_kl").architecture == arms.get("gsae_kl").architecture == "topk"
    assert arms.get("gsae_kl").has_gradient_encoder and not arms.get("topk_kl").has_gradient_encoder
    assert arms.by_architecture("topk", {"arm": "gsae_kl"}).name == "gsae_kl"
    assert arms.by_architecture("topk").name == "topk" and arms.by_architecture("gtopk").name == "gsae"
    t = TrainConfig(tokens=1000 * 64, batch_size=64)
    assert kl_steps(1000, t) == 50 and kl_steps(1000, dataclasses.replace(t, kl_frac=0.0)) == 0
    assert kl_steps(3, dataclasses.replace(t, kl_frac=0.9)) == 2  # step 0 stays an MSE step
    s = ContextSampler(7, 3, seed=0)
    drawn = torch.cat([s(j) for j in range(7)])  # 21 draws = 3 epochs, each a permutation
    assert all(sorted(drawn[e * 7:(e + 1) * 7].tolist()) == list(range(7)) for e in range(3))
    assert torch.equal(ContextSampler(7, 3, seed=0)(5), s(5)) and not torch.equal(ContextSampler(7, 3, 1)(0), s(0))


def test_added_settings_keep_existing_train_records():
    """kl_frac / kl_coef at their defaults change neither the config hash nor the recorded train config."""
    from gsae.stages._jobs import recorded_train_cfg

    t = TrainConfig()
    old = {k: v for k, v in dataclasses.asdict(t).items() if k not in ("kl_frac", "kl_coef")}
    assert config_hash(t) == config_hash(old) and recorded_train_cfg(t) == old
    assert recorded_train_cfg(dataclasses.replace(t, kl_frac=0.1))["kl_frac"] == 0.1
    with pytest.raises(ValueError, match="kl_frac"):
        TrainConfig(kl_frac=1.0)


@pytest.mark.parametrize("plain,tuned,beta", PAIRS)
def test_mse_phase_is_the_plain_arm_bit_for_bit(lm, tmp_path, plain, tuned, beta):
    """Both arms checkpoint at the first KL step (step 15 of 20): SAE, Adam state and dead-latent counters are the
    same bytes; the history up to it is the same; after it they part. Trained together on one stream
    (``train_saes``), each SAE is the one it is alone."""
    sae_cfg, cfg = configs(lm, beta, checkpoint_every=15)
    kl = KLData(lm.model, HOOK, lm.contexts)
    a = train_sae(plain, sae_cfg, cfg, stream(lm), ckpt_dir=tmp_path / "a", progress=False, kl=kl, log_every=1)
    b = train_sae(tuned, sae_cfg, cfg, stream(lm), ckpt_dir=tmp_path / "b", progress=False, kl=kl, log_every=1)
    ta, tb = load_tensors(tmp_path / "a" / CKPT_TENSORS), load_tensors(tmp_path / "b" / CKPT_TENSORS)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.history[:15] == b.history[:15]
    assert "kl" in b.history[15] and "kl" not in a.history[-1]
    assert not torch.equal(a.sae.W_dec, b.sae.W_dec)
    assert b.n_tokens == 15 * BATCH + 5 * 5 * (T - 2)  # 5 KL steps of round(64 / 14) = 5 contexts
    both = train_saes([Job(plain, sae_cfg, cfg), Job(tuned, sae_cfg, cfg)], stream(lm), progress=False, kl=kl)
    assert torch.equal(both[0].sae.W_dec, a.sae.W_dec) and torch.equal(both[1].sae.W_dec, b.sae.W_dec)


@pytest.mark.parametrize("hook", [HOOK, "blocks.1.hook_resid_mid"])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("caps", ["none", "clean_above", "max_norm"])
def test_kl_term_equals_a_hand_written_splice(lm, hook, beta, caps):
    """The KL term of the loss equals the TransformerLens splice + F.kl_div reference on the same contexts (a
    restart at the hook's block for resid_pre, a full forward with a hook for resid_mid), the FVU is the hand
    FVU of the reconstructed rows, the total weighs them as documented, and the backward reaches the SAE alone."""
    sae = trained_sae(lm, beta)
    x = capture(lm.model, lm.contexts, hook).x[:, 1:-1].reshape(-1, D)
    cap = float(x.norm(dim=-1).median())  # half the rows above it
    data = KLData(lm.model, hook, lm.contexts, max_norm=cap if caps == "max_norm" else None,
                  clean_above=cap if caps == "clean_above" else None)
    phase = KLPhase(data, BATCH, seed=3)
    arm = arms.get("gsae_kl" if beta else "topk_kl")
    batch = phase.batch(2, {"g"} if beta else set())
    train = TrainConfig(tokens=BATCH, batch_size=BATCH, kl_coef=0.7)
    out = arm.kl_loss(sae, batch, None, 0, train)
    tokens = lm.contexts[phase.sampler(2)]
    assert torch.equal(batch.tokens, tokens)
    ref = reference_kl(lm.model, tokens, sae, use_grad=beta > 0, clean_above=cap if caps != "none" else None,
                       hook=hook)
    assert out.terms["kl"].item() == pytest.approx(ref, rel=1e-4, abs=1e-7)
    rows = batch.clean.x[:, 1:T - 1].reshape(-1, D)
    if caps == "max_norm":
        rows = rows[rows.norm(dim=-1) <= cap]
    with torch.no_grad():
        grad = None if not beta else batch.clean.g[:, 1:T - 1].reshape(-1, D)
        if grad is not None and caps == "max_norm":
            grad = grad[batch.clean.x[:, 1:T - 1].reshape(-1, D).norm(dim=-1) <= cap]
        enc = sae.encode(rows, grad)
        rec = sae.decode(enc.top_acts, enc.top_indices)
    fvu = ((rec - rows).pow(2).sum() / (rows - rows.mean(0)).pow(2).sum()).item()
    assert out.terms["fvu"].item() == pytest.approx(fvu, rel=1e-5)
    assert out.total.item() == pytest.approx(out.terms["fvu"].item() + 0.7 * out.terms["kl"].item(), rel=1e-6)
    out.total.backward()
    assert all(p.grad is None for p in lm.model.parameters())
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0


@pytest.mark.parametrize("plain,tuned,beta", PAIRS)
def test_kl_steps_lower_the_spliced_kl_of_their_batch(lm, tmp_path, plain, tuned, beta):
    """With one batch of contexts for the whole KL phase, 8 KL steps lower its spliced KL (the reference's) from
    the SAE of the first KL step (its checkpoint) to the end."""
    sae_cfg, cfg = configs(lm, beta, steps=24, kl_frac=1 / 3, decay_frac=0.0, checkpoint_every=16)
    per_step = round(BATCH / (T - 2))
    kl = KLData(lm.model, HOOK, lm.contexts[:per_step])  # every KL step draws the same contexts
    res = train_sae(tuned, sae_cfg, cfg, stream(lm), ckpt_dir=tmp_path, progress=False, kl=kl)
    start = arms.get(tuned).build(sae_cfg)
    assert load_checkpoint(tmp_path, start, torch.optim.Adam(start.parameters()))[0] == 16
    before = reference_kl(lm.model, kl.tokens, start, use_grad=beta > 0)
    after = reference_kl(lm.model, kl.tokens, res.sae, use_grad=beta > 0)
    mse_only = reference_kl(lm.model, kl.tokens, train_sae(plain, sae_cfg, cfg, stream(lm), progress=False).sae,
                            use_grad=beta > 0)
    print(f"\n{tuned}: spliced KL on its batch {before:.4f} at the first KL step -> {after:.4f} after 8 KL steps "
          f"(8 more MSE steps instead: {mse_only:.4f})")
    assert after < 0.9 * before


def test_a_run_killed_in_the_kl_phase_resumes_to_the_same_bits(lm, tmp_path):
    sae_cfg, cfg = configs(lm, 1.0, checkpoint_every=4)
    kl = KLData(lm.model, HOOK, lm.contexts)
    full = train_sae("gsae_kl", sae_cfg, cfg, stream(lm), progress=False, kl=kl)

    class Crash(Exception):
        pass

    def crashing():
        for i, b in enumerate(stream(lm)()):
            if i == 18:  # in the KL phase (steps 15..19), after the checkpoint at step 16
                raise Crash
            yield b

    with pytest.raises(Crash):
        train_sae("gsae_kl", sae_cfg, cfg, crashing, ckpt_dir=tmp_path, progress=False, kl=kl)
    resumed = train_sae("gsae_kl", sae_cfg, cfg, stream(lm), ckpt_dir=tmp_path, progress=False, kl=kl)
    assert all(torch.equal(a, b) for a, b in zip(full.sae.state_dict().values(), resumed.sae.state_dict().values(),
                                                strict=True))
    assert torch.equal(full.tokens_since_fired, resumed.tokens_since_fired)
    with pytest.raises(ValueError, match="KL fine-tune"):
        train_sae("gsae_kl", sae_cfg, cfg, stream(lm), progress=False)


def test_cost_of_a_kl_token_against_an_mse_token(lm):
    """Printed, not asserted: seconds per token of the KL phase over the MSE phase on the tiny LM (the KL phase's
    time is that of a run with kl_frac 1/2 less half of the all-MSE run on the same stream); with it, the whole
    run's cost at kl_frac 0.05."""
    steps = 40
    kl = KLData(lm.model, HOOK, lm.contexts)
    for plain, tuned, beta in PAIRS:
        sae_cfg, cfg = configs(lm, beta, steps=steps, kl_frac=0.5)
        best = {}
        train_sae(tuned, sae_cfg, dataclasses.replace(cfg, tokens=4 * BATCH), stream(lm), progress=False, kl=kl)
        for arm in (plain, tuned) * 3:  # after a warm-up, the best of three: the CPU is shared
            t0 = time.perf_counter()
            res = train_sae(arm, sae_cfg, cfg, stream(lm), progress=False, kl=kl)
            best[arm] = min(best.get(arm, math.inf), time.perf_counter() - t0)
            tokens = res.n_tokens
        mse_per_token = best[plain] / (steps * BATCH)
        kl_time = best[tuned] - best[plain] * (steps // 2) / steps
        kl_per_token = kl_time / (tokens - steps // 2 * BATCH)
        ratio = kl_per_token / mse_per_token
        print(f"\n{tuned} on the tiny LM (d_model {D}, {T} tokens/context, 2 blocks, hook at block 1, CPU, "
              f"{torch.get_num_threads()} thread): {1e6 * mse_per_token:.2f} us/token MSE, "
              f"{1e6 * kl_per_token:.2f} us/token KL, ratio {ratio:.2f}; a run with kl_frac 0.05 costs "
              f"{0.95 + 0.05 * ratio:.3f} x the plain arm")


@pytest.mark.parametrize("massive", ["clean", "reconstruct"])
def test_the_train_stage_feeds_the_harvested_train_contexts_and_the_evaluations_caps(monkeypatch, massive):
    """``stages._jobs.kl_data``: the train split's harvested contexts (the first ``n_contexts`` of the contexts
    stage), the training cap for the MSE rows, and the evaluation's massive-activation cap in the splice."""
    import gsae.stages._jobs as jobs
    import gsae.stages.contexts as contexts_stage
    from gsae.stages.evaluate import MASSIVE_NORM_FACTOR

    tokens = torch.arange(50 * T).reshape(50, T)
    monkeypatch.setattr(contexts_stage, "contexts", lambda p, tok, mh: {"train": SimpleNamespace(tokens=tokens)})
    monkeypatch.setattr(jobs, "_median_norm", lambda d: 2.0)
    p = SimpleNamespace(eval=SimpleNamespace(massive=massive), model=SimpleNamespace(hook_name=HOOK),
                        harvest=SimpleNamespace(exclude_pos0=True))
    lm = SimpleNamespace(model="LM", tokenizer=None, info={"model_hash": "h"})
    reader = SimpleNamespace(manifest={"n_contexts": 40}, dir="harvest/train")
    data = jobs.kl_data(p, lm, reader, cap=20.0)
    assert data.model == "LM" and data.hook_name == HOOK and data.exclude_pos0
    assert torch.equal(data.tokens, tokens[:40]) and data.max_norm == 20.0
    assert data.clean_above == (MASSIVE_NORM_FACTOR * 2.0 if massive == "clean" else None)
    with pytest.raises(ValueError, match="needs the LM"):
        jobs.kl_data(p, None, reader, cap=None)


def test_the_train_stage_trains_saves_and_reloads_the_kl_arms_beside_their_plain_arms(lm, monkeypatch, tmp_path):
    """``stages._jobs.train_group`` on one stream: topk, topk_kl and gsae_kl train in one pass (the LM handed on),
    are saved in SAELens format with their arm in the metadata, reload as themselves with the trained weights, and
    their manifests record the train config without the kl settings left at their defaults."""
    import gsae.stages._jobs as jobs
    import gsae.stages.contexts as contexts_stage
    from gsae import io
    from gsae.arms.saelens import load_sae, saved_arm
    from gsae.config import ModelConfig, load_profile
    from gsae.specs import SAESpec

    p = dataclasses.replace(load_profile("smoke"), model=ModelConfig(name="tiny", layer=1, hook="resid_pre"))
    monkeypatch.setattr(jobs, "sae_dir", lambda p, s, mh: tmp_path / s.name)
    monkeypatch.setattr(jobs, "registry_append", lambda p, event: None)
    monkeypatch.setattr(jobs, "_median_norm", lambda d: float(lm.x.norm(dim=-1).median()))
    monkeypatch.setattr(contexts_stage, "contexts", lambda p, tok, mh: {"train": SimpleNamespace(tokens=lm.contexts)})

    class Reader:
        manifest = {"n_contexts": len(lm.contexts), "plan_hash": "x"}
        dir = tmp_path / "harvest"
        held_device = None  # read from "disk": the stream below

        def batches(self, batch_size, seed, n_tokens, device=None, gradient="g"):
            return iter(list(stream(lm, seed)())[:n_tokens // batch_size])

    fake_lm = SimpleNamespace(model=lm.model, tokenizer=None, info={"model_hash": "h"})
    specs = []
    for arm, beta in (("topk", 0.0), ("topk_kl", 0.0), ("gsae_kl", 1.0)):
        sae_cfg, cfg = configs(lm, beta, max_norm_factor=10.0, kl_frac=0.05 if arm == "topk_kl" else 0.25)
        specs.append(SAESpec("kl_check", arm, K, 0, sae_cfg, cfg))
    outs = jobs.train_group(p, specs, Reader(), "h", progress=False, lm=fake_lm)
    for spec, out in zip(specs, outs, strict=True):
        assert saved_arm(out / "sae").name == spec.arm
        assert isinstance(load_sae(out / "sae"), GSAE)
        recorded = io.read_manifest(out)["train_cfg"]
        assert ("kl_frac" in recorded) == (spec.train.kl_frac != 0.05) and "kl_coef" not in recorded
        history = io.read_json(out / "train.json")["history"]
        assert ("kl" in history[-1]) == spec.arm.endswith("_kl")
    with pytest.raises(ValueError, match="needs the LM"):
        jobs.train_group(p, [dataclasses.replace(specs[1], group="kl_check2")], Reader(), "h", progress=False)
