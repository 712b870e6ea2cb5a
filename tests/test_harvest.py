"""Tests of gsae.harvest against independent references: central finite differences, TransformerLens backward
hooks, a hand-written cross-entropy, explicit per-row slicing, and an uninterrupted run (for resumption)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer, HookedTransformerConfig

import gsae.harvest as H
from gsae.config import HarvestConfig
from gsae.io import IntegrityError, load_tensors, read_json, sha256_file

HOOK = "blocks.1.hook_resid_pre"
TESTS_DIR = Path(__file__).resolve().parent


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> HookedTransformer:
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=100, n_ctx=32,
                                  act_fn="gelu", normalization_type="LN", dtype=dtype, seed=seed, device="cpu")
    return HookedTransformer(cfg)


def random_tokens(n: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return tiny_model()


@pytest.fixture(scope="module")
def model64() -> HookedTransformer:
    return tiny_model(torch.float64)


@pytest.fixture
def one_thread():
    """Pin the thread count (as the resume subprocess does) so in-process runs are bit-comparable with it."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------ capture


def _loss_sum_with_delta(model: HookedTransformer, tokens: torch.Tensor, delta: torch.Tensor) -> float:
    """Summed next-token CE after adding ``delta`` to the activation at HOOK (no autograd involved)."""
    with torch.no_grad(), model.hooks(fwd_hooks=[(HOOK, lambda act, hook: act + delta)]):
        logits = model(tokens, return_type="logits")
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                 reduction="sum"))


def test_capture_matches_central_finite_differences(model64):
    tokens = random_tokens(2, 12)
    cap = H.capture(model64, tokens, HOOK)
    assert cap.g.dtype == torch.float64 and cap.g.shape == (2, 12, 32)
    gen = torch.Generator().manual_seed(0)
    coords = [(b, t, int(torch.randint(0, 32, (1,), generator=gen))) for b in (0, 1) for t in (0, 3, 7, 10)]
    coords.append(tuple(int(i) for i in torch.nonzero(cap.g.abs() == cap.g.abs().max())[0]))  # largest entry
    h, rel_errors = 1e-5, []
    for b, t, i in coords:
        delta = torch.zeros_like(cap.x)
        delta[b, t, i] = h
        fd = (_loss_sum_with_delta(model64, tokens, delta) - _loss_sum_with_delta(model64, tokens, -delta)) / (2 * h)
        rel_errors.append(abs(fd - float(cap.g[b, t, i])) / abs(fd))
    print(f"FD max relative error: {max(rel_errors):.2e} over {len(coords)} coordinates")
    assert max(rel_errors) < 1e-5
    # the last position: finite differences see no effect either
    delta = torch.zeros_like(cap.x)
    delta[0, -1, 5] = h
    assert _loss_sum_with_delta(model64, tokens, delta) == _loss_sum_with_delta(model64, tokens, -delta)


def grad_by_backward_hook(tokens: torch.Tensor, mean: bool) -> torch.Tensor:
    """Gradient at HOOK by TransformerLens backward hooks and loss.backward() on a fresh copy of the ``model``
    fixture (same seed; its parameters require grad and receive .grad here). ``mean``: TL's mean loss."""
    got = {}
    ref = tiny_model()
    with ref.hooks(bwd_hooks=[(HOOK, lambda grad, hook: got.__setitem__("g", grad.detach().clone()))]):
        loss = ref(tokens, return_type="loss", loss_per_token=not mean)
        (loss if mean else loss.sum()).backward()
    return got["g"]


def test_capture_matches_backward_hook_and_scaled_mean_loss(model):
    tokens = random_tokens(4, 16)
    cap = H.capture(model, tokens, HOOK)
    assert all(p.grad is None for p in model.parameters()), "capture must not give parameters a .grad"
    assert all(p.requires_grad for p in model.parameters()), "capture must restore requires_grad"

    diff_sum = (cap.g - grad_by_backward_hook(tokens, mean=False)).abs().max().item()
    g_mean = grad_by_backward_hook(tokens, mean=True)
    n_pred = 4 * 15
    diff_mean = (cap.g - g_mean * n_pred).abs().max().item()
    print(f"bwd-hook max|diff| sum-loss {diff_sum:.2e}, mean-loss x B(T-1) {diff_mean:.2e}; "
          f"max|g| {cap.g.abs().max():.3f}")
    assert diff_sum < 1e-6 and diff_mean < 1e-5
    assert not torch.allclose(cap.g, g_mean, atol=1e-4)  # the mean-loss gradient is a different scale
    # loss_sum / n_pred against a hand-written next-token cross-entropy
    with torch.no_grad():
        logits = model(tokens, return_type="logits")
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 100), tokens[:, 1:].reshape(-1), reduction="sum")
    assert cap.n_pred == n_pred
    torch.testing.assert_close(cap.loss_sum, ce, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(cap.x, model.run_with_cache(tokens, names_filter=HOOK)[1][HOOK])


def test_gradient_is_batch_invariant(model):
    tokens = random_tokens(4, 20)
    g_batch = H.capture(model, tokens, HOOK).g
    for b in range(4):
        g_alone = H.capture(model, tokens[b:b + 1], HOOK).g[0]
        torch.testing.assert_close(g_alone, g_batch[b], rtol=1e-5, atol=1e-7)


def test_last_position_gradient_is_exactly_zero(model):
    g = H.capture(model, random_tokens(3, 10), HOOK).g
    assert torch.count_nonzero(g[:, -1]) == 0
    assert torch.count_nonzero(g[:, -2]) > 0  # the second-to-last position has its own loss


def test_gradient_scale_does_not_depend_on_context_length(model):
    long = random_tokens(8, 32)
    short = long[:, :16]

    def rms_first_positions(g: torch.Tensor) -> float:
        return float(g[:, 1:15].pow(2).mean().sqrt())  # positions 1..14 exist and are scored in both

    g_long, g_short = H.capture(model, long, HOOK).g, H.capture(model, short, HOOK).g
    ratio_sum = rms_first_positions(g_long) / rms_first_positions(g_short)
    ratio_mean = rms_first_positions(grad_by_backward_hook(long, mean=True)) / rms_first_positions(
        grad_by_backward_hook(short, mean=True))
    print(f"context-length RMS ratio T=32/T=16: sum-loss {ratio_sum:.3f}, mean-loss {ratio_mean:.3f}")
    assert 0.67 < ratio_sum < 1.5
    assert ratio_mean < 0.6  # TL's mean loss divides by B(T-1): about 15/31 of the sum-loss ratio


def test_capture_rejects_bad_input(model, tmp_path):
    with pytest.raises(ValueError, match="no hook point"):
        H.capture(model, random_tokens(2, 8), "blocks.9.hook_resid_pre")
    with pytest.raises(ValueError, match=r"\[batch, ctx_len\]"):
        H.capture(model, random_tokens(2, 8)[0], HOOK)
    with pytest.raises(ValueError, match="at least"):
        H.harvest(model, random_tokens(4, 2), HOOK, tmp_path, n_tokens=4, progress=False)


# ------------------------------------------------------------------ harvest

CTX = random_tokens(20, 10, seed=2)  # T=10: 8 kept rows per context with exclude_pos0
CFG = HarvestConfig(batch_contexts=3, shard_tokens=32, dtype="float32", exclude_pos0=True)  # 4 contexts/shard


@pytest.fixture(scope="module")
def harvested(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("harvest")
    manifest = H.harvest(model, CTX, HOOK, out, n_tokens=100, cfg=CFG, meta={"model": "tiny-0"}, progress=False)
    return out, manifest


def test_harvest_rows_match_capture(model, harvested):
    out, manifest = harvested
    assert manifest["n_tokens"] == 100 and manifest["d_model"] == 32 and manifest["meta"] == {"model": "tiny-0"}
    assert [s["n_rows"] for s in manifest["shards"]] == [32, 32, 32, 4]  # 13 contexts: 4+4+4+1, cut at 100
    rows = H.ActivationReader(out).load_all()
    cap = H.capture(model, CTX[:13], HOOK)
    expected_pos = [p for _ in range(13) for p in range(1, 9)][:100]
    assert rows.meta["pos"].tolist() == expected_pos
    assert rows.meta["ctx_index"].tolist() == [c for c in range(13) for _ in range(8)][:100]
    for r in range(100):
        c, p = int(rows.meta["ctx_index"][r]), int(rows.meta["pos"][r])
        assert rows.meta["tokens"][r] == CTX[c, p]
        torch.testing.assert_close(rows.x[r], cap.x[c, p], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rows.g[r], cap.g[c, p], rtol=1e-5, atol=1e-6)
    stats = manifest["grad_stats"]
    mean_sq_g = rows.g.double().pow(2).sum(1).mean().item()
    assert stats["mean_sq_norm_g"] == pytest.approx(mean_sq_g, rel=1e-9)
    assert stats["mean_sq_norm_x"] == pytest.approx(rows.x.double().pow(2).sum(1).mean().item(), rel=1e-9)
    assert stats["grad_scale"] == pytest.approx((32 / mean_sq_g) ** 0.5, rel=1e-9)
    assert stats["mean_loss"] == pytest.approx(float(cap.loss_sum) / cap.n_pred, rel=1e-5)
    for name, digest in manifest["files"].items():
        assert sha256_file(out / name) == digest == read_json(out / name.replace(".safetensors", ".json"))["sha256"]


def test_harvest_keeps_position0_and_stores_float16(model, tmp_path):
    cfg = HarvestConfig(batch_contexts=4, shard_tokens=64, dtype="float16", exclude_pos0=False)
    H.harvest(model, CTX, HOOK, tmp_path, n_tokens=45, cfg=cfg, progress=False)
    raw = load_tensors(tmp_path / "shard_00000.safetensors")
    assert raw["x"].dtype == torch.float16 and raw["g"].dtype == torch.float16
    rows = H.ActivationReader(tmp_path).load_all()
    assert rows.x.dtype == torch.float32 and rows.x.shape == (45, 32)
    assert rows.meta["pos"][:9].tolist() == list(range(9))  # positions 0..T-2
    cap = H.capture(model, CTX[:5], HOOK)
    torch.testing.assert_close(rows.g[:9], cap.g[0, :9].half().float())


def test_complete_harvest_is_returned_without_recomputing(model, harvested, monkeypatch):
    out, manifest = harvested
    monkeypatch.setattr(H, "capture", lambda *a, **k: pytest.fail("a complete harvest must not recompute"))
    again = H.harvest(model, CTX, HOOK, out, n_tokens=100, cfg=CFG, meta={"model": "tiny-0"}, progress=False)
    assert again == manifest
    with pytest.raises(ValueError, match="different inputs or settings"):
        H.harvest(model, CTX, HOOK, out, n_tokens=100, cfg=CFG, meta={"model": "other"}, progress=False)


def test_a_harvest_made_under_another_profiles_name_serves_when_all_else_is_equal(model, tmp_path, monkeypatch):
    """gsae.adopt links the default run's harvest into another profile: only the maker's name may differ."""
    made = {"model": "tiny-0", "profile": "default"}
    first = H.harvest(model, CTX, HOOK, tmp_path, n_tokens=100, cfg=CFG, meta=made, progress=False)
    monkeypatch.setattr(H, "capture", lambda *a, **k: pytest.fail("an adopted harvest must not recompute"))
    again = H.harvest(model, CTX, HOOK, tmp_path, n_tokens=100, cfg=CFG, meta={**made, "profile": "kl"},
                      progress=False)
    assert again == first and again["meta"]["profile"] == "default"  # it still says who made it
    for other in ({**made, "model": "tiny-1"}, {**made, "profile": "kl", "split": "val"}):
        with pytest.raises(ValueError, match="different inputs or settings"):
            H.harvest(model, CTX, HOOK, tmp_path, n_tokens=100, cfg=CFG, meta=other, progress=False)


def test_corrupted_shard_is_detected_and_rebuilt(model, harvested, tmp_path):
    out, manifest = harvested
    work = tmp_path / "h"
    shutil.copytree(out, work)
    path = work / "shard_00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x40  # flip one bit inside the tensor data
    path.write_bytes(bytes(data))
    reader = H.ActivationReader(work)
    with pytest.raises(IntegrityError, match=r"shard_00001\.safetensors.*re-run the harvest stage"):
        list(reader.batches(16, seed=0, epochs=1))
    rebuilt = H.harvest(model, CTX, HOOK, work, n_tokens=100, cfg=CFG, meta={"model": "tiny-0"}, progress=False)
    assert rebuilt["resumed_shards"] == 3  # only the bad shard was recomputed
    assert rebuilt["files"] == manifest["files"]


def test_harvest_checks_inputs_and_disk(model, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs 13 contexts"):
        H.harvest(model, CTX[:5], HOOK, tmp_path, n_tokens=100, cfg=CFG, progress=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000))
    with pytest.raises(OSError, match="not enough disk.*float16"):
        H.harvest(model, CTX, HOOK, tmp_path, n_tokens=100, cfg=CFG, progress=False)
    assert not list(tmp_path.glob("shard_*"))


# ------------------------------------------------------------------ resumption after SIGKILL

RESUME_CFG = HarvestConfig(batch_contexts=1, shard_tokens=60, dtype="float16", exclude_pos0=True)  # 2 ctx/shard


def run_resume_harvest(out_dir: str | Path) -> dict:
    """The harvest the resume test kills and resumes (imported by its subprocess, so both build the same)."""
    return H.harvest(tiny_model(seed=3), random_tokens(16, 32, seed=4), HOOK, out_dir, n_tokens=480,
                     cfg=RESUME_CFG, meta={"model": "tiny-3"}, progress=False)


CHILD = """
import sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
import gsae.harvest as H
import test_harvest
real_capture = H.capture
def slow_capture(*args, **kwargs):  # slow the child down so the kill lands mid-harvest
    time.sleep(0.3)
    return real_capture(*args, **kwargs)
H.capture = slow_capture
test_harvest.run_resume_harvest(sys.argv[2])
"""


def test_resume_after_sigkill_gives_identical_shards(tmp_path, one_thread):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(TESTS_DIR), str(killed)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "shard_00001.json").exists():
        if proc.poll() is not None:
            pytest.fail(f"the harvest subprocess exited before it was killed:\n{proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the harvest subprocess wrote no shard within 120 s")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    assert not (killed / "manifest.json").exists() and not (killed / "shard_00007.safetensors").exists()
    survivors = {p.name: p.stat().st_mtime_ns for p in killed.glob("shard_*.safetensors")}

    resumed = run_resume_harvest(killed)
    reference = run_resume_harvest(clean)
    assert resumed["resumed_shards"] >= 2 and reference["resumed_shards"] == 0
    assert all((killed / n).stat().st_mtime_ns == t for n, t in survivors.items()), "kept shards were rewritten"
    assert len(reference["files"]) == 8 and resumed["files"] == reference["files"]
    for name in reference["files"]:
        assert sha256_file(killed / name) == sha256_file(clean / name)
    assert resumed["grad_stats"] == reference["grad_stats"]
    assert not list(killed.glob(".*.tmp"))
    print(f"resume: {resumed['resumed_shards']} of 8 shards kept from the killed run; all 8 sha256 equal")


# ------------------------------------------------------------------ reader


def _stream(reader: H.ActivationReader, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(reader.batches(**kw))


def test_reader_stream_is_seeded_and_one_epoch_is_a_permutation(harvested):
    out, _ = harvested
    reader = H.ActivationReader(out)
    assert reader.n_tokens == 100 and reader.d == 32
    a, b = _stream(reader, batch_size=24, seed=7, epochs=1), _stream(reader, batch_size=24, seed=7, epochs=1)
    c = _stream(reader, batch_size=24, seed=8, epochs=1)
    assert [x.shape[0] for x, _ in a] == [24, 24, 24, 24, 4]
    assert all(torch.equal(x1, x2) and torch.equal(g1, g2) for (x1, g1), (x2, g2) in zip(a, b, strict=True))
    assert not torch.equal(torch.cat([x for x, _ in a]), torch.cat([x for x, _ in c]))
    assert all(x.dtype == torch.float32 and g.dtype == torch.float32 for x, g in a)
    # one epoch holds every (x, g) row exactly once: compare row multisets after a canonical sort
    rows = H.ActivationReader(out).load_all()
    ref = torch.cat([rows.x, rows.g], 1)
    got = torch.cat([torch.cat([x, g], 1) for x, g in a])
    assert not torch.equal(got, ref)  # shuffled
    assert torch.equal(got[got[:, 0].argsort()], ref[ref[:, 0].argsort()])


def test_reader_token_budget_and_bounded_window(harvested, monkeypatch):
    out, _ = harvested
    reader = H.ActivationReader(out)
    batches = _stream(reader, batch_size=32, seed=0, n_tokens=250)  # 2.5 epochs
    assert [x.shape[0] for x, _ in batches] == [32] * 7 + [26]
    loads = []
    real_load = reader._load
    monkeypatch.setattr(reader, "_load", lambda i: loads.append(i) or real_load(i))
    next(reader.batches(8, seed=0, epochs=1, window=2))
    assert len(loads) == 2  # the first batch needs only the first window of 2 shards
    with pytest.raises(ValueError, match="exactly one"):
        next(reader.batches(8, seed=0))


def test_reader_requires_complete_harvest(tmp_path):
    with pytest.raises(FileNotFoundError, match="run .*harvest"):
        H.ActivationReader(tmp_path)


# ------------------------------------------------------------------ throughput


def test_measure_throughput_reports_rates(model):
    res = H.measure_throughput(model, random_tokens(2, 32), HOOK, n_batches=2)
    print({k: round(v, 3) for k, v in res.items()})
    assert res["harvest_tok_per_s"] > 0 and res["fwd_bwd_tok_per_s"] > 0 and res["forward_tok_per_s"] > 0
    assert res["ratio_vs_fwd_bwd"] == pytest.approx(res["harvest_tok_per_s"] / res["fwd_bwd_tok_per_s"])


def test_label_free_gradient_matches_finite_differences_and_equals_g_where_the_model_is_right(model64):
    """g_free = d(sum of CE against the model's own argmax)/dx: central finite differences with the pseudo-labels
    held fixed (the argmax of the clean logits), and on tokens the model itself predicts greedily (every label is
    the argmax) it equals the true-label g; the true-label g is unchanged by asking for g_free."""
    tokens = random_tokens(2, 12)
    cap = H.capture(model64, tokens, HOOK, label_free=True)
    assert torch.equal(cap.g, H.capture(model64, tokens, HOOK).g)
    with torch.no_grad():
        pseudo = model64(tokens, return_type="logits")[:, :-1].argmax(-1)

    def pseudo_loss(delta):
        with torch.no_grad(), model64.hooks(fwd_hooks=[(HOOK, lambda act, hook: act + delta)]):
            logits = model64(tokens, return_type="logits")
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), pseudo.reshape(-1),
                                     reduction="sum"))

    h = 1e-5
    for b, t, i in ((0, 0, 3), (0, 5, 17), (1, 9, 30)):
        delta = torch.zeros_like(cap.x)
        delta[b, t, i] = h
        fd = (pseudo_loss(delta) - pseudo_loss(-delta)) / (2 * h)
        assert abs(fd - float(cap.g_free[b, t, i])) <= 1e-5 * abs(fd) + 1e-12
    # On greedily generated tokens every next token is the model's argmax, so the two losses coincide.
    greedy = tokens[:, :1]
    with torch.no_grad():
        for _ in range(11):
            greedy = torch.cat([greedy, model64(greedy, return_type="logits")[:, -1:].argmax(-1)], dim=1)
    both = H.capture(model64, greedy, HOOK, label_free=True)
    assert torch.allclose(both.g_free, both.g, rtol=1e-10, atol=1e-12)


def test_label_free_harvest_stores_g_free_and_the_reader_serves_it(model, tmp_path):
    H.harvest(model, CTX, HOOK, tmp_path, n_tokens=40, cfg=CFG, progress=False, label_free=True)
    rows = H.ActivationReader(tmp_path).load_all()
    cap = H.capture(model, CTX[:1], HOOK, label_free=True)
    torch.testing.assert_close(rows.g_free[:8], cap.g_free[0, 1:-1].float())
    torch.testing.assert_close(rows.g[:8], cap.g[0, 1:-1].float())
    (x, g), = list(H.ActivationReader(tmp_path).batches(40, seed=0, epochs=1, gradient="g_free"))
    order = [int(torch.nonzero((rows.x == r).all(1))[0]) for r in x]  # rows come shuffled
    assert torch.equal(g, rows.g_free[order])
    with pytest.raises(KeyError, match="label_free_splits"):
        next(H.ActivationReader(tmp_path).batches(8, seed=0, epochs=1, gradient="g_nonexistent"))


# ------------------------------------------------------------------ storage dtypes


def test_bfloat16_storage_and_the_float16_underflow_and_overflow_checks(model, tmp_path, monkeypatch):
    cfg = HarvestConfig(batch_contexts=4, shard_tokens=64, dtype="bfloat16", exclude_pos0=True)
    H.harvest(model, CTX, HOOK, tmp_path / "bf16", n_tokens=40, cfg=cfg, progress=False)
    assert load_tensors(tmp_path / "bf16" / "shard_00000.safetensors")["g"].dtype == torch.bfloat16
    rows = H.ActivationReader(tmp_path / "bf16").load_all()
    cap = H.capture(model, CTX[:5], HOOK)
    assert rows.g.dtype == torch.float32 and torch.equal(rows.g[:8], cap.g[0, 1:9].bfloat16().float())

    real = H.capture

    def scaled(gx: float, gg: float):
        def capture(*a, **k):
            c = real(*a, **k)
            return c._replace(x=c.x * gx, g=c.g * gg)
        return capture

    # |g| ~ 1e-3 x 1e-6: most entries fall below float16's smallest subnormal (6e-8) and round to 0.
    monkeypatch.setattr(H, "capture", scaled(1.0, 1e-6))
    fp16 = HarvestConfig(batch_contexts=4, shard_tokens=64, dtype="float16", exclude_pos0=True)
    with pytest.raises(FloatingPointError, match=r"round to zero in harvest.dtype=float16.*bfloat16"):
        H.harvest(model, CTX, HOOK, tmp_path / "under", n_tokens=40, cfg=fp16, progress=False)
    H.harvest(model, CTX, HOOK, tmp_path / "under_bf16", n_tokens=40, cfg=cfg, progress=False)  # float32's range
    monkeypatch.setattr(H, "capture", scaled(1e5, 1.0))  # |x| ~ 1e5 > 65,504
    with pytest.raises(FloatingPointError, match="x overflows"):
        H.harvest(model, CTX, HOOK, tmp_path / "over", n_tokens=40, cfg=fp16, progress=False)
    assert not list((tmp_path / "under").glob("shard_*")) and not list((tmp_path / "over").glob("shard_*"))
