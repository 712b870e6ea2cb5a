"""What a profile will cost, stage by stage, before it runs: disk, host memory, GPU memory and time, projected from
per-step costs measured here and now on the profile's device (``python -m gsae.pipeline check --dry-run``; the GPU
check ``python -m gsae.tools.gpu_check`` prints the same table).

Measured (``measure_costs``), each on the resolved device with the profile's shapes:

* LM: a stand-in with the profile model's width, depth, heads, MLP width and vocabulary and random weights
  (``gsae.standins.random_gpt2``; for GPT-2 small it IS the shape): seconds per token of the harvest step
  (forward + backward to the hook) and of a forward from the hook's block to the logits (splices, steering).
* SAE: ``gsae.train.train_sae`` steps of each arm at the profile's d_in, d_sae and k on synthetic batches, and an
  encode of one batch. On CUDA at the profile's batch size; on the CPU at a smaller batch, scaled linearly. A KL
  fine-tune arm's step is modelled, not measured: its base arm's step plus, for ``train.kl_frac`` of the steps, a
  KL step over ``batch_size`` tokens at one harvest step (the clean pass) and three forwards from the hook (the
  spliced forward and its backward) per token.

Projected (``project``): every stage's work counted from the profile (harvest tokens, SAEs and their steps,
evaluation contexts and runs, steering rows, probed rows) times those costs. Not included: downloading and
tokenising the corpus, the label-free gradient's second backward on ``harvest.label_free_splits``, reading
shards from disk (the reader prefetches on GPU runs), Python overheads between
steps. Memory: disk from the harvest format exactly; host and GPU from the buffers each stage holds (GPU peaks
are measured on CUDA).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from ..config import Profile, SAEConfig, TrainConfig

MODEL_SHAPES = {
    "gpt2": {"n_layers": 12, "d_model": 768, "n_heads": 12, "d_mlp": 3072, "d_vocab": 50257},
    "smollm2-135m": {"n_layers": 30, "d_model": 576, "n_heads": 9, "d_mlp": 1536, "d_vocab": 49152},
    "tiny": {"n_layers": 2, "d_model": 128, "n_heads": 4, "d_mlp": 512, "d_vocab": 4096},
}
"""Shapes of the profile models, for the stand-in whose per-token cost is measured."""
CPU_SAE_BATCH = 256
"""SAE batch measured on the CPU (the cost is scaled linearly to the profile's batch)."""


@dataclass(frozen=True)
class StepCosts:
    device: str
    harvest_s_per_token: float
    """LM forward + backward to the hook, per input token."""
    forward_s_per_token: float
    """LM forward from the hook's block to the logits, per input token."""
    sae_step_s: dict[str, float]
    """One training step of each arm at the profile's batch size."""
    encode_s_per_row: float
    """One g-encode + decode per row (evaluation, probing)."""
    gpu_peak_bytes: dict[str, int]
    """Peak CUDA memory of the harvest batch and of one SAE step of each arm (empty on the CPU)."""


def _timed(fn, device: torch.device, reps: int = 2) -> float:
    """Seconds per call of ``fn`` after one warm-up call (allocator, kernels, lazy inits)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / reps


def _peak(fn, device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return int(torch.cuda.max_memory_allocated(device))


def measure_costs(p: Profile, device: torch.device, lm_contexts: int | None = None) -> StepCosts:
    """Per-step costs of profile ``p`` on ``device`` (see the module docstring)."""
    from .. import arms
    from ..lm import capture
    from ..train import train_sae
    from .bench import BenchConfig, synthetic_batches
    from .standins import random_gpt2

    shape = MODEL_SHAPES[p.model.name]
    model = random_gpt2(seed=0, device=device, d_head=shape["d_model"] // shape["n_heads"],
                        n_ctx=max(p.data.ctx_len, 32), **shape)
    B = lm_contexts or (p.harvest.batch_contexts if device.type == "cuda" else 1)
    tokens = torch.randint(0, shape["d_vocab"], (B, p.data.ctx_len), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    reps = 3 if device.type == "cuda" else 1
    harvest = _timed(lambda: capture(model, tokens, p.model.hook_name), device, reps)
    gpu = {"harvest_batch": _peak(lambda: capture(model, tokens, p.model.hook_name), device)}
    start = p.model.layer + (1 if p.model.hook == "resid_post" else 0)
    resid = torch.randn(B, p.data.ctx_len, shape["d_model"], device=device)
    with torch.no_grad():
        forward = _timed(lambda: model(resid, start_at_layer=start, return_type="logits"), device, reps)

    d_in, d_sae, k = shape["d_model"], p.experiment.expansion * shape["d_model"], p.experiment.beta_select_k
    batch = p.train.batch_size if device.type == "cuda" else min(p.train.batch_size, CPU_SAE_BATCH)
    data = synthetic_batches(BenchConfig(d_in=d_in, d_sae=min(d_sae, 4096), k=k, batch=batch, steps=3))
    steps: dict[str, float] = {}
    kl_token = harvest / tokens.numel() + 3 * forward / tokens.numel()  # clean pass; spliced forward + backward
    for name in sorted(p.experiment.arms, key=lambda a: getattr(arms.get(a), "kl_finetune", False)):
        arm = arms.get(name)
        if getattr(arm, "kl_finetune", False):  # its MSE steps are its base arm's; kl_frac of them are KL steps
            base = next(c.name for c in type(arm).__mro__[1:] if getattr(c, "name", None) in steps)
            steps[name] = steps[base] + p.train.kl_frac * p.train.batch_size * kl_token
            continue
        cfg = arm.make_config(d_in=d_in, d_sae=d_sae, k=k, **({"beta": 1.0} if arm.hyperparameters else {}))
        tcfg = TrainConfig(tokens=batch, batch_size=batch, checkpoint_every=10**9, lr=p.train.lr)
        one = train_sae(arm, cfg, tcfg, data, progress=False, device=device).seconds  # warm-up and fixed costs
        three = train_sae(arm, cfg, replace(tcfg, tokens=3 * batch), data, progress=False, device=device).seconds
        steps[name] = max((three - one) / 2, three / 6) * p.train.batch_size / batch
        gpu[f"sae_step_{name}"] = _peak(lambda a=arm, c=cfg, t=tcfg: train_sae(a, c, t, data, progress=False,
                                                                                 device=device), device)
    sae = arms.get(p.experiment.arms[-1]).build(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, beta=1.0)).to(device)
    x, g = (t.to(device) for t in data[0])
    with torch.no_grad():
        encode = _timed(lambda: sae.decode(*sae.encode(x, g)[:2]), device, reps) / batch
    return StepCosts(str(device), harvest / tokens.numel(), forward / tokens.numel(), steps, encode,
                     {k_: v for k_, v in gpu.items() if v})


class StageProjection:
    def __init__(self, name: str, seconds: float, disk: float, host: float, gpu: float, what: str, ranks: int = 1):
        self.name, self.seconds, self.disk, self.host, self.gpu, self.what = name, seconds, disk, host, gpu, what
        self.ranks = ranks
        """The most torchrun ranks that can share this stage's work (1: it runs in one process)."""


def _specs(p: Profile) -> tuple[list, list]:
    """The validation trials and the grid the train stage will train, at a placeholder lr / beta: the lr grid per
    arm and selection seed plus the per-arm length curve, and with a dose-response each other beta's lr trials and
    group (edge extensions, at most ``selection.max_extensions`` per arm or beta, are not counted)."""
    from .. import arms
    from ..specs import dose_specs, experiment_specs
    from ..stages.selection import beta_arms, length_curve_specs, lr_trial_specs

    d = MODEL_SHAPES[p.model.name]["d_model"]
    chosen = {a: {hp: grid[0] for hp, grid in arms.get(a).hyperparameter_grid(p.experiment).items()}
              for a in p.experiment.arms}
    lrs = [p.train.lr * m for m in p.selection.lr_multipliers]
    trials = [s for a in p.experiment.arms for ss in lr_trial_specs(p, a, lrs, d, 1.0).values() for s in ss]
    trials += [s for a in p.experiment.arms for m, s in length_curve_specs(
        p, a, p.train.lr, p.selection.seeds[0], d, 1.0, p.selection.length_multipliers).items() if m != 1.0]
    grid = experiment_specs(p, d, 1.0, chosen, p.train.lr)
    if p.experiment.dose_seeds:  # the dose-response: every beta but one (which is chosen is not known yet)
        for a in beta_arms(p):
            grid += dose_specs(p, a, d, 1.0, {b: p.train.lr for b in sorted(p.experiment.beta_grid)[1:]})
            if p.experiment.beta_select_encode != "none":
                trials += [s for b in p.experiment.beta_grid[1:] for ss in lr_trial_specs(p, a, lrs, d, 1.0).values()
                           for s in ss]  # each other beta's lr trials (the first beta's are the arm's own)
    return trials, grid


def steps_of(spec) -> int:
    """Adam steps of one SAE (whole batches of its own token budget)."""
    return spec.train.tokens // spec.train.batch_size


def count_saes(p: Profile) -> tuple[dict[str, int], int, int]:
    """SAEs the train stage trains: per arm, and how many are validation trials and how many make the grid
    (primary and variants)."""
    trials, grid = _specs(p)
    per_arm: dict[str, int] = {}
    for s in trials + grid:
        per_arm[s.arm] = per_arm.get(s.arm, 0) + 1
    return per_arm, len(trials), len(grid)


def largest_stream_group(p: Profile) -> int:
    """The most grid SAEs that share one batch stream (``stages._jobs.stream_key``): how many the train stage holds
    at once."""
    from collections import Counter

    from ..stages._jobs import stream_key

    return max(Counter(stream_key(s) for s in _specs(p)[1]).values(), default=1)


def harvest_row_bytes(p: Profile) -> int:
    """Bytes per harvested row on disk: x and g in the storage dtype plus three int64 row-index entries."""
    item = {"float32": 4, "float16": 2, "bfloat16": 2}[p.harvest.dtype]
    return 2 * MODEL_SHAPES[p.model.name]["d_model"] * item + 3 * 8


def harvest_disk_bytes(p: Profile) -> int:
    """The harvest's size on disk (every split; safetensors headers and sidecars are a few KB per shard)."""
    n_shards = sum(math.ceil(n / p.harvest.shard_tokens) for n in p.harvest.tokens.values())
    return sum(p.harvest.tokens.values()) * harvest_row_bytes(p) + 8192 * n_shards


def openwebtext_budget(p: Profile) -> list[str]:
    """Check ``data.documents`` against the harvest budget (OpenWebText only): the expected contexts of each split
    (documents x split fraction x ``OPENWEBTEXT_TOKENS_PER_DOC`` / ctx_len) must cover what the harvest needs."""
    from ..config import ConfigError
    from ..openwebtext import OPENWEBTEXT_DEFAULT_DOCS, OPENWEBTEXT_TOKENS_PER_DOC

    if p.data.corpus != "openwebtext" or p.data.source:
        return []
    docs = p.data.documents or OPENWEBTEXT_DEFAULT_DOCS
    rows_per_ctx = p.data.ctx_len - 1 - int(p.harvest.exclude_pos0)
    per_doc = OPENWEBTEXT_TOKENS_PER_DOC / p.data.ctx_len
    notes, short = [], []
    for frac, split in zip(p.data.split_fracs, ("train", "val", "test"), strict=True):
        need = math.ceil(p.harvest.tokens.get(split, 0) / rows_per_ctx)
        expect = docs * frac * per_doc
        notes.append(f"{split} {expect:,.0f} expected vs {need:,} needed ({expect / max(need, 1):.2f}x)")
        if expect < need:
            short.append((split, math.ceil(need / (frac * per_doc))))
    if short:
        split, docs_needed = max(short, key=lambda t: t[1])
        raise ConfigError(f"data.documents={docs:,} OpenWebText documents give about {docs * per_doc:,.0f} contexts "
                          f"of {p.data.ctx_len} tokens, too few for harvest.tokens ({'; '.join(notes)}); raise "
                          f"data.documents to at least {docs_needed:,} (the {split} split binds)")
    return [f"openwebtext: {docs:,} documents, contexts per split: " + "; ".join(notes)]


def project(p: Profile, costs: StepCosts) -> list[StageProjection]:
    """Stage-by-stage projection of profile ``p`` from measured ``costs`` (GPU memory: measured peaks on CUDA,
    else estimated from the buffers each stage holds)."""
    shape = MODEL_SHAPES[p.model.name]
    d, T = shape["d_model"], p.data.ctx_len
    rows_per_ctx = T - 1 - int(p.harvest.exclude_pos0)
    row_bytes = harvest_row_bytes(p)
    ctx = {s: math.ceil(n / rows_per_ctx) for s, n in p.harvest.tokens.items()}
    rows = dict(p.harvest.tokens)
    shard_bytes = p.harvest.shard_tokens * row_bytes
    d_sae = p.experiment.expansion * d
    sae_bytes = 2 * d * d_sae * 4 * 4  # W_enc + W_dec, with their gradients and Adam's two moments
    n_saes, n_trials, n_grid = count_saes(p)
    n_total = n_trials + n_grid
    steps = p.train.tokens // p.train.batch_size  # the primary length; trials and variants may differ (steps_of)
    gpu_peak = costs.gpu_peak_bytes

    n_params = shape["d_vocab"] * d * 2 + shape["n_layers"] * (4 * d * d + 2 * d * shape["d_mlp"])
    logits = p.harvest.batch_contexts * T * shape["d_vocab"] * 4 * 3  # logits, log-softmax, their gradient
    lm_gpu = gpu_peak.get("harvest_batch") or (
        n_params * 4 + logits + p.harvest.batch_contexts * T * d * 4 * 12 * shape["n_layers"])
    # The SAEs of one seed train together (gsae.train.train_saes): all of them resident, one step's buffers at a time.
    group = max(largest_stream_group(p) - 1, 0) * sae_bytes
    sae_gpu = group + (max((v for k, v in gpu_peak.items() if k.startswith("sae_step")), default=0) or (
        sae_bytes + p.train.batch_size * d_sae * 4 * 4))

    trials, grid = _specs(p)
    round_size = len(p.experiment.arms) * len(p.selection.lr_multipliers) * len(p.selection.seeds)
    out = [StageProjection(
        "harvest", sum(ctx.values()) * T * costs.harvest_s_per_token, harvest_disk_bytes(p),
        2 * shard_bytes + sum(ctx.values()) * T * 8 * 2, lm_gpu,
        f"{sum(ctx.values()):,} contexts x {T} tokens, forward + backward to {p.model.hook_name}",
        ranks=math.ceil(p.harvest.tokens["train"] / p.harvest.shard_tokens))]
    out.append(StageProjection(
        "select", sum(steps_of(sp) * costs.sae_step_s[sp.arm] for sp in trials), n_trials * 2 * d * d_sae * 4,
        2 * 2 * shard_bytes, sae_gpu - group, f"{n_trials} validation trials in rounds of up to {round_size} "
        f"x {steps:,} steps of {p.train.batch_size:,} (length-curve trials: their own)",
        ranks=round_size))
    out.append(StageProjection(
        "train", sum(steps_of(sp) * costs.sae_step_s[sp.arm] for sp in grid), n_grid * 2 * d * d_sae * 4,
        2 * 2 * shard_bytes + p.train.batch_size * d * 4 * 4, sae_gpu,
        f"{n_total} SAEs in all ({', '.join(f'{n} {a}' for a, n in n_saes.items())}); the grid's {n_grid} in "
        f"{len({sp.train.seed for sp in grid})} seed groups of up to {largest_stream_group(p)}",
        ranks=len({sp.train.seed for sp in grid})))
    lm_ctx = {s: min(ctx[s], p.eval.lm_contexts) for s in ("val", "test")}

    def evaluation(split: str, n: int) -> float:
        lm = lm_ctx[split] * T * (costs.harvest_s_per_token + 2 * n * costs.forward_s_per_token)
        return lm + 2 * n * rows[split] * costs.encode_s_per_row

    out.append(StageProjection(
        "evaluate", evaluation("val", n_trials) + evaluation("test", n_grid), 0,
        p.eval.batch_contexts * T * shape["d_vocab"] * 4 * 3 + 4096 * d * 8 * 4,
        n_grid * sae_bytes // 4 + p.eval.batch_contexts * T * shape["d_vocab"] * 4 * 3,
        f"spliced CE/KL on {lm_ctx['test']:,} test contexts ({lm_ctx['val']:,} val) x 2 encoders per SAE; "
        f"FVU/L0 on every row"))
    from .. import arms

    c1 = [sp for sp in grid if sp.k in p.experiment.primary_k] if p.eval.full_test else []
    n_c1 = sum(len(p.eval.full_test_encoders) if arms.get(sp.arm).has_gradient_encoder else 1 for sp in c1)
    out.append(StageProjection(
        "full_test", ctx["test"] * T * (costs.harvest_s_per_token + n_c1 * costs.forward_s_per_token) if n_c1 else 0.0,
        0, p.eval.batch_contexts * T * shape["d_vocab"] * 4 * 3,
        n_c1 * sae_bytes // 4 + p.eval.batch_contexts * T * shape["d_vocab"] * 4 * 3,
        f"CE/KL of {len(c1)} SAEs at the primary k ({n_c1} splices: {', '.join(p.eval.full_test_encoders)} for a "
        f"gradient arm) on all {ctx['test']:,} test contexts"))
    steer_rows = p.steering.n_latents * len(p.steering.alphas) * p.steering.n_contexts
    n_steered = sum(not p.steering.k_values or sp.k in p.steering.k_values for sp in grid)
    out.append(StageProjection(
        "steer", n_steered * steer_rows * T * costs.forward_s_per_token, 0,
        rows["test"] * 8, p.steering.n_contexts * (T - 2) * shape["d_vocab"] * 4 * 2,
        f"{steer_rows:,} steered contexts per SAE, {n_steered} SAEs"))
    out.append(StageProjection(
        "probe", 2 * n_grid * rows["test"] * costs.encode_s_per_row, 0,
        rows["test"] * p.experiment.k_grid[-1] * 12 * 2, min(1 << 28, rows["test"] * d_sae) * 4 * 2,
        f"{rows['test']:,} test rows x 2 encoders per SAE"))
    return out


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n else "-"


def _hours(s: float) -> str:
    return f"{s / 3600:,.1f} h" if s >= 360 else f"{s / 60:,.1f} min"


def format_projection(p: Profile, costs: StepCosts, stages: list[StageProjection]) -> list[str]:
    steps = ", ".join(f"{a} {s * 1e3:,.1f} ms" for a, s in costs.sae_step_s.items())
    lines = [f"projection for profile {p.name} on {costs.device}, from costs measured now: harvest "
             f"{costs.harvest_s_per_token * 1e6:,.1f} us/token, forward from the hook "
             f"{costs.forward_s_per_token * 1e6:,.1f} us/token, SAE step {steps} at batch {p.train.batch_size:,}, "
             f"encode {costs.encode_s_per_row * 1e6:,.2f} us/row",
             f"{'stage':9s} {'time (1 process)':>17s} {'disk':>10s} {'host mem':>10s} {'GPU mem':>10s}  work"]
    for s in stages:
        lines.append(f"{s.name:9s} {_hours(s.seconds):>17s} {_gb(s.disk):>10s} {_gb(s.host):>10s} "
                     f"{_gb(s.gpu):>10s}  {s.what}")
    total = sum(s.seconds for s in stages)
    on = {n: sum(s.seconds / min(n, s.ranks) for s in stages) for n in (2, 4, 8)}
    lines.append(f"{'total':9s} {_hours(total):>17s}; with torchrun over N GPUs (harvest by shard, selection by "
                 f"round, grid by seed group): " + ", ".join(f"{_hours(t)} on {n}" for n, t in on.items()))
    return lines


def held_train_split(p: Profile, device: torch.device) -> tuple[int, int | None, bool]:
    """The train split's stored bytes, the device's free bytes (None on the CPU) and whether SAE training will hold
    the split in the device's memory (``runtime.train_data``, ``stages.harvest.holds``)."""
    from ..stages.harvest import holds

    need = p.harvest.tokens["train"] * harvest_row_bytes(p)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return need, free, holds(p.runtime.train_data, need, free)


def train_data_line(p: Profile, device: torch.device) -> str:
    """Where SAE training will read the train split from, in words."""
    need, free, held = held_train_split(p, device)
    where = "held in the device's memory" if held else "read from the disk cache"
    return (f"train split for SAE training: {_gb(need)} as stored; runtime.train_data {p.runtime.train_data}: "
            f"{where}" + (f" ({_gb(free)} free on {device} now)" if free is not None else ""))


def dry_run(p: Profile) -> list[str]:
    """The projection table for ``p``, from costs measured on its resolved device (a held train split counted in
    the GPU memory of selection and training), and where training reads."""
    from ..runtime import resolve_device

    device = resolve_device(p.runtime.device)
    costs = measure_costs(p, device)
    stages = project(p, costs)
    need, _, held = held_train_split(p, device)
    for s in stages:
        if held and s.name in ("select", "train"):
            s.gpu += need
    return [*format_projection(p, costs, stages), train_data_line(p, device)]
