"""The SAE training loop (SAELens' trainer cannot feed a per-token gradient to the encoder, so gsae owns it).

One loop for every registered arm (``gsae.arms``): the arm builds the module and owns its named loss terms
(TopK and g-SAE: FVU + aux_coef * AuxK); every arm is fed the identical (x, g) stream.
Adam with linear warm-up and linear decay; decoder rows renormalised to
unit norm after every step, with the gradient component parallel to each row removed before it.
A latent's "tokens since fired" counter drives the dead mask (window counted in tokens, as Gao et al.).
An arm that KL fine-tunes (``gsae.arms.kl_finetune``: topk_kl, gsae_kl) takes the same steps as its plain arm on
the row stream until its last ``train.kl_frac`` of steps, which train on LM contexts (``kl=KLData(...)``) with
KL(clean || spliced) + its MSE loss; those steps checkpoint and resume like the others.

Crash safety: a checkpoint (safetensors + JSON, written atomically) every ``checkpoint_every`` steps;
``train_sae`` resumes from the latest one and, because the batch stream is a pure function of the seed,
reproduces the uninterrupted run exactly. A non-finite loss or gradient stops training with
``TrainingDiverged`` and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from . import arms, io
from .arms.kl_finetune import KLBatch, KLData, KLPhase, kl_steps
from .config import SAEConfig, TrainConfig
from .progress import bar as tqdm  # tqdm-compatible; draws on the terminal, never in a notebook
from .runtime import to_device

CKPT_TENSORS = "checkpoint.safetensors"
CKPT_STATE = "checkpoint.json"


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN/inf; the last good checkpoint is kept."""


class TrainResult(NamedTuple):
    sae: torch.nn.Module
    history: list[dict]
    """One row per logged step: step, tokens, lr, the arm's loss terms by name (e.g. fvu, auxk), l0,
    dead_fraction."""
    tokens_since_fired: torch.Tensor
    """[d_sae] training tokens since each latent last fired (dead if >= dead_tokens)."""
    n_tokens: int
    seconds: float


def lr_multiplier(step: int, n_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up over the first warmup_frac of steps, flat, then linear decay to 0 over the last decay_frac."""
    warm = max(1, round(cfg.warmup_frac * n_steps)) if cfg.warmup_frac > 0 else 0
    decay = round(cfg.decay_frac * n_steps)
    if warm and step < warm:
        return (step + 1) / warm
    if decay and step >= n_steps - decay:
        return max(0.0, (n_steps - step) / decay)
    return 1.0


def _adam_tensors(opt: torch.optim.Adam, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in params.items():
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                out[f"adam.{name}.{key}"] = st[key]
        if "step" in st:
            out[f"adam.{name}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    return out


def save_checkpoint(ckpt_dir: Path, sae: torch.nn.Module, opt: torch.optim.Adam, tsf: torch.Tensor, step: int,
                    history: list[dict]) -> None:
    params = dict(sae.named_parameters())
    tensors = {f"sae.{k}": v.detach() for k, v in params.items()}
    tensors.update(_adam_tensors(opt, params))
    tensors["tokens_since_fired"] = tsf
    tensors = {k: v.cpu() for k, v in tensors.items()}  # a checkpoint resumes on any device
    # Tensors first, then the JSON that names their hash: a crash between the two leaves the previous
    # JSON pointing at a hash that no longer matches, so the checkpoint is ignored, never half-trusted.
    digest = io.save_tensors(ckpt_dir / CKPT_TENSORS, tensors)
    io.write_json(ckpt_dir / CKPT_STATE, {"step": step, "sha256": digest, "history": history})


def load_checkpoint(ckpt_dir: Path, sae: torch.nn.Module,
                    opt: torch.optim.Adam) -> tuple[int, torch.Tensor, list[dict]] | None:
    state_p, tens_p = ckpt_dir / CKPT_STATE, ckpt_dir / CKPT_TENSORS
    if not (state_p.exists() and tens_p.exists()):
        return None
    state = io.read_json(state_p)
    if io.sha256_file(tens_p) != state["sha256"]:
        return None  # torn write: start from scratch rather than trust it
    t = io.load_tensors(tens_p)
    params = dict(sae.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(t[f"sae.{name}"])
            if f"adam.{name}.exp_avg" in t:  # fused Adam keeps its step counter on the parameter's device
                opt.state[p] = {"step": t[f"adam.{name}.step"].reshape(()).to(p.device, copy=True),
                                "exp_avg": t[f"adam.{name}.exp_avg"].to(p.device, copy=True),
                                "exp_avg_sq": t[f"adam.{name}.exp_avg_sq"].to(p.device, copy=True)}
    return state["step"], t["tokens_since_fired"].to(params["W_dec"].device, copy=True), state["history"]


def _all_finite(sae: torch.nn.Module, loss: torch.Tensor) -> bool:
    if not torch.isfinite(loss):
        return False
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in sae.parameters())


class Job(NamedTuple):
    """One SAE to train with ``train_saes``."""

    arm: arms.Arm | str
    sae_cfg: SAEConfig
    cfg: TrainConfig
    ckpt_dir: str | Path | None = None


class _Run:
    """One SAE in training: module, optimiser, dead-latent counters, history and checkpoints. The step is the
    same whether it is driven alone (``train_sae``) or beside others on one stream (``train_saes``)."""

    def __init__(self, job: Job, device: torch.device, log_every: int):
        self.arm = arms.get(job.arm) if isinstance(job.arm, str) else job.arm
        self.sae_cfg, self.cfg, self.device, self.log_every = job.sae_cfg, job.cfg, device, log_every
        self.n_steps = job.cfg.tokens // job.cfg.batch_size
        # Arms that KL fine-tune (gsae.arms.kl_finetune) take their last steps on LM contexts instead of rows.
        self.kl_start = (self.n_steps - kl_steps(self.n_steps, job.cfg) if getattr(self.arm, "kl_finetune", False)
                         else self.n_steps)
        self.sae = self.arm.build(job.sae_cfg, seed=job.cfg.seed).to(device)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=job.cfg.lr, eps=job.cfg.adam_eps, fused=True)
        self.k_aux = job.cfg.k_aux or job.sae_cfg.d_in // 2
        self.tsf = torch.zeros(job.sae_cfg.d_sae, dtype=torch.long, device=device)
        self.history: list[dict] = []
        self.start = 0
        self.ckpt_dir = Path(job.ckpt_dir) if job.ckpt_dir else None
        if self.ckpt_dir is not None:
            resumed = load_checkpoint(self.ckpt_dir, self.sae, self.opt)
            if resumed is not None:
                self.start, self.tsf, self.history = resumed

    def step(self, step: int, x: torch.Tensor, g: torch.Tensor | None) -> dict | None:
        """One optimiser step on batch (x, g); returns the history row when this step is logged."""
        sae, cfg = self.sae, self.cfg
        if step == 0:
            sae.init_b_dec(x)
        dead = self.tsf >= cfg.dead_tokens
        out = self.arm.loss(sae, x, g, dead if cfg.aux_coef > 0 else None, self.k_aux, cfg)
        return self._update(step, out, x.shape[0], (step + 1) * x.shape[0])

    def kl_step(self, step: int, batch: KLBatch, tokens_per_step: int) -> dict | None:
        """One optimiser step of the KL phase on the contexts of ``batch`` (``gsae.arms.kl_finetune``)."""
        dead = self.tsf >= self.cfg.dead_tokens
        out = self.arm.kl_loss(self.sae, batch, dead if self.cfg.aux_coef > 0 else None, self.k_aux, self.cfg)
        return self._update(step, out, out.top_acts.shape[0],
                            self.kl_start * self.cfg.batch_size + (step + 1 - self.kl_start) * tokens_per_step)

    def _update(self, step: int, out: arms.LossTerms, n_rows: int, tokens: int) -> dict | None:
        """Backward, checks, optimiser step, dead-latent counters, history and checkpoint of one step."""
        sae, cfg, opt = self.sae, self.cfg, self.opt
        loss = out.total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not _all_finite(sae, loss):
            where = f"; the last good checkpoint in {self.ckpt_dir} is kept" if self.ckpt_dir else ""
            raise TrainingDiverged(f"non-finite loss or gradient at step {step} (loss={loss.item()}){where}. "
                                   f"Lower train.lr or check the harvested data for inf/NaN.")
        sae.remove_gradient_parallel_to_decoder()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_multiplier(step, self.n_steps, cfg)
        opt.step()
        sae.set_decoder_norm_to_unit()

        with torch.no_grad():
            fired = torch.zeros(self.sae_cfg.d_sae, dtype=torch.bool, device=self.device)
            fired[out.top_indices[out.top_acts > 0]] = True
            self.tsf += n_rows
            self.tsf[fired] = 0
        row = None
        if step % self.log_every == 0 or step == self.n_steps - 1:
            row = {"step": step, "tokens": tokens, "lr": opt.param_groups[0]["lr"],
                   **{name: term.item() for name, term in out.terms.items()},
                   "l0": (out.top_acts > 0).sum(-1).float().mean().item(),
                   "dead_fraction": (self.tsf >= cfg.dead_tokens).float().mean().item()}
            self.history.append(row)
        if self.ckpt_dir is not None and ((step + 1) % cfg.checkpoint_every == 0) and step + 1 < self.n_steps:
            save_checkpoint(self.ckpt_dir, sae, opt, self.tsf, step + 1, self.history)
        return row


def train_saes(
    jobs: list[Job],
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]] | Iterable,
    *,
    progress: bool = True,
    desc: str = "train",
    log_every: int = 10,
    device: torch.device | str | None = None,
    kl: KLData | None = None,
) -> list[TrainResult]:
    """Train several SAEs on ONE pass over ``batches`` (each batch read and moved once, stepped by every SAE).
    The jobs must share the stream: the same ``tokens``, ``batch_size`` and ``seed``. Each SAE does exactly the
    steps it would do alone (``train_sae``), so its bytes do not depend on its companions; each resumes from its
    own checkpoint. ``seconds`` of every result is the wall time of the shared loop.

    ``kl``: the LM and train contexts of the KL phase, needed when an arm KL fine-tunes
    (``gsae.arms.kl_finetune``): its last steps skip their row batch and train on LM contexts instead, one clean
    pass per step shared by every SAE in that phase."""
    device = torch.device(device or "cpu")
    stream_keys = {(j.cfg.tokens, j.cfg.batch_size, j.cfg.seed) for j in jobs}
    if len(stream_keys) != 1:
        raise ValueError(f"train_saes needs jobs that share one stream (tokens, batch_size, seed); got {stream_keys}")
    runs = [_Run(j, device, log_every) for j in jobs]
    n_steps, start = runs[0].n_steps, min(r.start for r in runs)
    phase = None
    if any(r.kl_start < r.n_steps for r in runs):
        if kl is None:
            raise ValueError(f"arm(s) {sorted({r.arm.name for r in runs if r.kl_start < r.n_steps})} KL fine-tune: "
                             f"pass kl=KLData(model, hook_name, train contexts, ...)")
        phase = KLPhase(kl, jobs[0].cfg.batch_size, jobs[0].cfg.seed)
    stream = iter(batches() if callable(batches) else batches)
    t0 = time.perf_counter()
    bar = tqdm(total=n_steps, initial=start, desc=desc, unit="tok", unit_scale=jobs[0].cfg.batch_size,
               disable=not progress, leave=False)
    with bar:
        for step in range(n_steps):
            try:
                batch = next(stream)
            except StopIteration:
                raise ValueError(f"the batch stream ended after {step} of {n_steps} steps; "
                                 f"give more data or lower train.tokens") from None
            if step < start:
                continue  # replaying the deterministic stream up to the earliest checkpoint
            x, g = (batch if isinstance(batch, (tuple, list)) else (batch, None))
            on_rows = [run for run in runs if run.start <= step < run.kl_start]
            if on_rows:
                x, g = to_device(x, device), None if g is None else to_device(g, device)
            for run in on_rows:
                row = run.step(step, x, g)
                if row is not None:
                    bar.set_postfix(l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.2%}")
            on_contexts = [run for run in runs if run.start <= step and run.kl_start <= step]
            if on_contexts:
                _kl_steps(step, on_contexts, phase, bar, desc)
            bar.update(1)
    seconds = time.perf_counter() - t0
    return [TrainResult(r.sae, r.history, r.tsf, _tokens(r, phase), seconds) for r in runs]


def _kl_steps(step: int, runs: list[_Run], phase: KLPhase, bar, desc: str) -> None:
    """Step ``runs`` (in their KL phase) on their KL batch: one clean pass per KL-step index, shared."""
    bar.set_description(f"{desc} [KL fine-tune]")
    for j in sorted({step - r.kl_start for r in runs}):
        group = [r for r in runs if step - r.kl_start == j]
        need = {r.arm.gradient for r in group if getattr(r.sae, "uses_gradient", False)}
        kb = phase.batch(j, need)
        for run in group:
            row = run.kl_step(step, kb, phase.tokens_per_step)
            if row is not None:
                bar.set_postfix(kl=f"{row['kl']:.4f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.2%}")


def _tokens(run: _Run, phase: KLPhase | None) -> int:
    """Training tokens of ``run``: its row batches, then its KL steps' scored predictions."""
    if phase is None or run.kl_start >= run.n_steps:
        return run.n_steps * run.cfg.batch_size
    return run.kl_start * run.cfg.batch_size + (run.n_steps - run.kl_start) * phase.tokens_per_step


def train_sae(
    arm: arms.Arm | str,
    sae_cfg: SAEConfig,
    cfg: TrainConfig,
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]] | Iterable,
    *,
    ckpt_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "train",
    log_every: int = 10,
    device: torch.device | str | None = None,
    kl: KLData | None = None,
) -> TrainResult:
    """Train one SAE of ``arm`` (an ``Arm`` or its registered name) on ``batches`` (an iterable, or a
    zero-argument callable returning an iterator, of (x [N, d_in], g [N, d_in]) float32 batches of
    ``cfg.batch_size`` rows; x alone is accepted when the arm ignores g).

    The number of steps is ``cfg.tokens // cfg.batch_size``. With ``ckpt_dir``, training resumes from
    the latest valid checkpoint there (skipping the batches already consumed). ``device`` (default CPU): where
    the SAE, its optimiser state and counters live; the weights are initialised on the CPU with the seed and
    then moved, so every device starts from the same bits; batches are moved there as they arrive. ``kl``: the
    LM and train contexts of the KL phase of an arm that KL fine-tunes (``train_saes``)."""
    return train_saes([Job(arm, sae_cfg, cfg, ckpt_dir)], batches, progress=progress, desc=desc,
                      log_every=log_every, device=device, kl=kl)[0]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (0: leave torch's setting alone), restoring the old value."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def dead_fraction(tokens_since_fired: torch.Tensor, dead_tokens: int) -> float:
    return float((tokens_since_fired >= dead_tokens).float().mean())


def n_steps_for(cfg: TrainConfig) -> int:
    return cfg.tokens // cfg.batch_size


def epochs_needed(cfg: TrainConfig, n_available: int) -> int:
    return max(1, math.ceil(cfg.tokens / max(1, n_available)))
