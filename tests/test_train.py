"""Training loop: it learns, it is exactly reproducible, it resumes, it stops on NaN, and the arms share data."""

import dataclasses
import hashlib

import pytest
import torch

from gsae.config import SAEConfig, TrainConfig
from gsae.train import TrainingDiverged, lr_multiplier, train_sae

D_IN, D_SAE, K = 16, 64, 4


def synthetic_stream(seed: int, n_batches: int, batch: int = 128):
    """Sparse ground truth: each x is a sum of K of D_SAE random unit directions; g is a fixed random map of x."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(D_SAE, D_IN, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    mix = torch.randn(D_IN, D_IN, generator=gen) / D_IN**0.5
    for _ in range(n_batches):
        idx = torch.rand(batch, D_SAE, generator=gen).topk(K, dim=-1).indices
        coef = torch.rand(batch, K, generator=gen) * 2 + 0.5
        x = (coef[..., None] * dirs[idx]).sum(1)
        yield x, x @ mix


def cfgs(beta=0.0, tokens=128 * 40, **kw):
    """(arm, SAEConfig, TrainConfig): beta = 0 is the TopK arm, beta > 0 the g-SAE."""
    return ("gsae" if beta > 0 else "topk", SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, beta=beta),
            TrainConfig(tokens=tokens, batch_size=128, lr=3e-3, dead_tokens=128 * 5, checkpoint_every=7, **kw))


def weights_hash(sae) -> str:
    h = hashlib.sha256()
    for k, v in sorted(sae.state_dict().items()):
        h.update(k.encode() + v.numpy().tobytes())
    return h.hexdigest()


def test_loss_falls_and_history_is_logged():
    arm, s, t = cfgs()
    res = train_sae(arm, s, t, lambda: synthetic_stream(0, 100), progress=False)
    assert res.history[-1]["fvu"] < 0.5 * res.history[0]["fvu"]
    assert res.history[-1]["l0"] <= K
    assert torch.allclose(res.sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_same_seed_identical_weights_other_seed_differs(beta):
    arm, s, t = cfgs(beta)
    a = train_sae(arm, s, t, lambda: synthetic_stream(0, 100), progress=False)
    b = train_sae(arm, s, t, lambda: synthetic_stream(0, 100), progress=False)
    assert weights_hash(a.sae) == weights_hash(b.sae)
    arm2, s2, t2 = cfgs(beta, seed=1)
    c = train_sae(arm2, s2, t2, lambda: synthetic_stream(0, 100), progress=False)
    assert weights_hash(a.sae) != weights_hash(c.sae)


def test_beta_changes_training_when_fed_the_same_stream():
    a = train_sae(*cfgs(0.0), lambda: synthetic_stream(0, 100), progress=False)
    b = train_sae(*cfgs(2.0), lambda: synthetic_stream(0, 100), progress=False)
    assert weights_hash(a.sae) != weights_hash(b.sae)


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    arm, s, t = cfgs(1.0)
    full = train_sae(arm, s, t, lambda: synthetic_stream(0, 100), progress=False)

    class Crash(Exception):
        pass

    def crashing_stream():
        for i, b in enumerate(synthetic_stream(0, 100)):
            if i == 23:  # die mid-run, after checkpoints at steps 7, 14, 21
                raise Crash
            yield b

    with pytest.raises(Crash):
        train_sae(arm, s, t, crashing_stream, ckpt_dir=tmp_path, progress=False)
    assert (tmp_path / "checkpoint.json").exists()
    resumed = train_sae(arm, s, t, lambda: synthetic_stream(0, 100), ckpt_dir=tmp_path, progress=False)
    assert weights_hash(resumed.sae) == weights_hash(full.sae)
    assert torch.equal(resumed.tokens_since_fired, full.tokens_since_fired)


def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path):
    arm, s, t = cfgs(0.0)

    def poisoned():
        for i, (x, g) in enumerate(synthetic_stream(0, 100)):
            if i == 10:
                x = x.clone()
                x[0, 0] = float("nan")
            yield x, g

    with pytest.raises(TrainingDiverged, match="step 10"):
        train_sae(arm, s, t, poisoned, ckpt_dir=tmp_path, progress=False)
    from gsae.io import read_json

    assert read_json(tmp_path / "checkpoint.json")["step"] == 7  # the last good one, untouched


def test_auxk_gradient_reaches_only_dead_latents():
    """AuxK trains dead latents on the live latents' residual and leaves live latents' parameters alone."""
    from gsae.sae import GSAE

    sae = GSAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K), seed=0)
    x, _ = next(synthetic_stream(0, 1))
    with torch.no_grad():
        sae.b_enc.fill_(1.0)  # all pre-activations of the aux candidates positive, so gradients flow
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, dead_mask=dead, k_aux=D_IN // 2)
    assert out.auxk_loss > 0
    g_enc, g_dec, g_benc = torch.autograd.grad(out.auxk_loss, [sae.W_enc, sae.W_dec, sae.b_enc])
    assert g_dec[~dead].abs().max() == 0 and g_dec[dead].abs().max() > 0
    assert g_enc[:, ~dead].abs().max() == 0 and g_benc[~dead].abs().max() == 0


def test_lr_schedule_shape():
    t = TrainConfig(tokens=1000, batch_size=10, warmup_frac=0.1, decay_frac=0.2)
    m = [lr_multiplier(i, 100, t) for i in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == 1.0 and m[50] == 1.0
    assert m[80] == 1.0 and m[99] == pytest.approx(0.05) and all(0 <= v <= 1 for v in m)


def test_stream_too_short_is_a_clear_error():
    arm, s, t = cfgs()
    with pytest.raises(ValueError, match="stream ended"):
        train_sae(arm, s, t, lambda: synthetic_stream(0, 3), progress=False)


KILL_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_train import cfgs, synthetic_stream, weights_hash
from gsae.train import train_sae

def slow_stream():
    for b in synthetic_stream(0, 100):
        time.sleep(float(sys.argv[2]))
        yield b

arm, s, t = cfgs(1.0)
res = train_sae(arm, s, t, slow_stream, ckpt_dir=sys.argv[1], progress=False)
print(weights_hash(res.sae))
"""


def test_sigkill_mid_training_then_rerun_equals_uninterrupted(tmp_path):
    """A training process killed with SIGKILL at a random point resumes from its checkpoint to the same weights."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run([sys.executable, str(script), str(tmp_path / "ref"), "0"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert ref.returncode == 0, ref.stderr
    ckpt = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), "0.05"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (ckpt / "checkpoint.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.0, 0.5))  # somewhere after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    again = subprocess.run([sys.executable, str(script), str(ckpt), "0"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == ref.stdout.strip()


def test_torch_threads_sets_and_restores_the_thread_count():
    from gsae.train import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(0):  # 0 leaves torch's setting alone
        assert torch.get_num_threads() == before


def test_saes_sharing_one_stream_train_as_they_would_alone(tmp_path):
    """train_saes steps several SAEs on one pass over the batches; each ends with the bytes it gets alone, also when
    one of them resumes from a checkpoint and the others start from scratch."""
    from gsae.train import Job, train_saes

    jobs = [Job(*cfgs(0.0)), Job(*cfgs(1.0)), Job(*cfgs(1.0, aux_coef=0.0))]
    alone = [train_sae(j.arm, j.sae_cfg, j.cfg, lambda: synthetic_stream(0, 100), progress=False) for j in jobs]
    reads = []

    def counted():
        for batch in synthetic_stream(0, 100):
            reads.append(1)
            yield batch

    together = train_saes(jobs, counted, progress=False)
    assert [weights_hash(r.sae) for r in together] == [weights_hash(r.sae) for r in alone]
    assert len(reads) == 40  # one pass for the three SAEs
    assert all(a.history == b.history for a, b in zip(alone, together, strict=True))

    # The g-SAE was checkpointed at step 21 before a crash; its companions start from scratch.
    ckpt = tmp_path / "ckpt"
    arm, s, t = cfgs(1.0)
    half = (arm, s, dataclasses.replace(t, checkpoint_every=21))

    def crash_after_22():
        for i, batch in enumerate(synthetic_stream(0, 100)):
            if i == 22:
                raise RuntimeError("crash")
            yield batch

    with pytest.raises(RuntimeError, match="crash"):
        train_sae(*half, crash_after_22, ckpt_dir=ckpt, progress=False)
    resumed = train_saes([jobs[0], Job(*half, ckpt), jobs[2]], lambda: synthetic_stream(0, 100), progress=False)
    assert weights_hash(resumed[1].sae) == weights_hash(alone[1].sae)
    assert weights_hash(resumed[0].sae) == weights_hash(alone[0].sae)
    with pytest.raises(ValueError, match="share one stream"):
        train_saes([jobs[0], Job(*cfgs(0.0, seed=1))], lambda: synthetic_stream(0, 100), progress=False)
