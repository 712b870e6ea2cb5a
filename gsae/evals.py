"""Downstream fidelity of an SAE: splice its reconstruction into the LM at the hook and score next-token CE / KL.

Splice rule (identical for the SAE splice and for the zero / mean ablations):

* The activation at ``hook_name`` is replaced at positions ``first..T-1``, where ``first = 1`` when
  ``exclude_pos0`` (position 0 keeps its clean activation: it is an attention-sink outlier that the harvest
  also drops) and ``first = 0`` otherwise. The replacement is computed from the clean activation.
* CE and KL are averaged over the predictions the harvest keeps: the logits at positions
  ``p = first..T-2``, each predicting token ``p+1`` (the last position has no target). Reconstruction
  statistics (FVU, MSE, L0, firing counts) use the activations at the same positions, so ``n_tokens`` is
  ``n_ctx * (T - 1 - first)`` for every number in a ``FidelityResult``.
* With ``exclude_pos0=False`` this is exactly SAELens' ``run_evals`` protocol for CE (every position spliced,
  CE averaged over positions 0..T-2); SAELens' KL also averages the (target-less) last position, ours does not.

Encoders: "plain" encodes x alone (TopK on z). "g" needs the clean gradient at every token, defined exactly
as in the harvest: g = d(sum of the next-token CEs of the context)/dx (sum, not mean). It comes from the same
clean forward that gives the clean logits (``gsae.lm.clean_pass``); the splice forward runs under ``no_grad``.
For an SAE whose arm ignores the gradient (TopK, or beta = 0) the two encoders are identical, so no gradient is
computed and the "g" result is the "plain" one.

The zero / mean ablation CEs depend only on (model, tokens), so ``ablation_baselines`` computes them once
and every evaluation takes them as an argument. ``evaluate_saes`` shares each batch's clean forward between
many SAEs and both encoders.

An "SAE" here is anything with ``uses_gradient`` (default True), ``cfg.d_sae``,
``encode(x, g=None) -> (top_acts, top_indices, ...)`` and ``decode(top_acts, top_indices) -> x_hat`` over
``[..., d_in]`` tensors, e.g. ``gsae.sae.GSAE``.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .data import data_hash
from .io import atomic_path
from .lm import ce_and_kl, clean_pass, per_token_ce, spliced_logits
from .progress import bar as tqdm  # tqdm-compatible; draws on the terminal, never in a notebook

ENCODE_MODES = ("g", "plain")
"""The default encoders: with the true-label gradient, and without any gradient."""
ALL_ENCODE_MODES = ENCODE_MODES + ("g_free",)
"""Also "g_free": with the label-free gradient (``gsae.lm.label_free_ce``)."""


class AblationBaselines(NamedTuple):
    """Model-only reference CEs on one token set (compute once, pass to every evaluation)."""

    ce_clean: float
    ce_zero: float
    """CE with the activation zeroed at the spliced positions."""
    ce_mean: float | None
    """CE with the activation replaced by ``mean_act`` at the spliced positions (None: no ``mean_act`` given)."""
    n_tokens: int
    hook_name: str
    exclude_pos0: bool
    tokens_hash: str
    """``gsae.data.data_hash`` of the tokens: an evaluation refuses baselines from other tokens."""


class PerTokenScores(NamedTuple):
    """Per-prediction scores, [n_ctx, T-1-first] (row = context, column = scored position), float32."""

    ce_clean: Tensor
    ce_spliced: Tensor
    kl: Tensor


class FidelityResult(NamedTuple):
    encode_mode: str
    ce_clean: float
    ce_spliced: float
    delta_ce: float
    """ce_spliced - ce_clean."""
    ce_zero: float
    ce_mean: float | None
    recovered_zero: float
    """(ce_zero - ce_spliced) / (ce_zero - ce_clean): 1 = as good as clean, 0 = as bad as zeroing."""
    recovered_mean: float | None
    """Same with the mean ablation as the floor (None without ``mean_act``)."""
    kl: float
    """Mean over scored predictions of KL(p_clean || p_spliced), nats."""
    fvu: float
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the scored positions (mean over those same tokens)."""
    mse: float
    """sum ||x - x_hat||^2 / (n_tokens * d_in): per element, as SAELens' ``mse``."""
    l0: float
    """Mean number of nonzero latents per token."""
    firing_counts: Tensor
    """[d_sae] int64: tokens on which each latent was nonzero."""
    dead_fraction: float
    """Fraction of latents that never fired on these ``n_tokens`` tokens."""
    n_tokens: int
    per_token: PerTokenScores | None = None

    def scalars(self) -> dict[str, Any]:
        """The JSON-ready numbers (everything but the tensors)."""
        return {k: v for k, v in self._asdict().items() if k not in ("firing_counts", "per_token")}


class FrequencyHistogram(NamedTuple):
    """Latent firing frequencies, ready for ``seaborn.histplot(x=log10_freq)``."""

    log10_freq: np.ndarray
    """log10(count / n_tokens) of every latent that fired at least once."""
    alive_index: np.ndarray
    """Latent index of each entry of ``log10_freq``."""
    n_dead: int
    """Latents with count 0 (log10 undefined; report separately)."""
    dead_fraction: float
    n_tokens: int


class ReconstructionStats:
    """Streaming FVU / MSE / L0 / firing counts, in float64 so the sum over many batches stays exact enough.

    The total variance uses Chan et al.'s pairwise merge of (count, mean, M2), which avoids the
    cancellation of sum ||x||^2 - n ||mean||^2 when the activations have a large mean."""

    def __init__(self, d_sae: int):
        self.n = 0
        self.mean: Tensor | None = None
        self.m2 = 0.0
        self.sse = 0.0
        self.nonzero = 0
        self.d_in = 0
        self.counts = torch.zeros(d_sae, dtype=torch.int64)

    def add(self, x: Tensor, x_hat: Tensor, top_acts: Tensor, top_indices: Tensor) -> None:
        # Reduced where the tensors live (a GPU evaluation moves only scalars and the counts to the host).
        x64 = x.detach().reshape(-1, x.shape[-1]).double()
        xh64 = x_hat.detach().reshape(-1, x.shape[-1]).double()
        n_b = x64.shape[0]
        if n_b == 0:
            return
        mean_b = x64.mean(0)
        m2_b = (x64 - mean_b).pow(2).sum().item()
        if self.mean is None:
            self.mean, self.m2, self.d_in = mean_b, m2_b, x64.shape[1]
        else:
            delta = mean_b - self.mean
            n = self.n + n_b
            self.m2 += m2_b + delta.dot(delta).item() * self.n * n_b / n
            self.mean = self.mean + delta * (n_b / n)
        self.n += n_b
        self.sse += (x64 - xh64).pow(2).sum().item()
        fired = top_acts.detach().reshape(-1, top_acts.shape[-1]) != 0
        self.nonzero += int(fired.sum())
        idx = top_indices.detach().reshape(-1, top_indices.shape[-1])[fired]
        self.counts += torch.bincount(idx, minlength=self.counts.numel()).cpu()

    @property
    def fvu(self) -> float:
        return self.sse / self.m2 if self.m2 > 0 else math.nan

    @property
    def mse(self) -> float:
        return self.sse / (self.n * self.d_in) if self.n else math.nan

    @property
    def l0(self) -> float:
        return self.nonzero / self.n if self.n else math.nan


def _recovered(ce_floor: float | None, ce_spliced: float, ce_clean: float) -> float | None:
    if ce_floor is None:
        return None
    gap = ce_floor - ce_clean
    return (ce_floor - ce_spliced) / gap if gap != 0 else math.nan


def _check_inputs(model: Any, tokens: Tensor, hook_name: str, exclude_pos0: bool, batch_contexts: int) -> int:
    if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be an integer tensor [n_ctx, T], got {tuple(tokens.shape)} {tokens.dtype}")
    first = 1 if exclude_pos0 else 0
    if tokens.shape[1] - 1 - first < 1:
        raise ValueError(f"contexts of length {tokens.shape[1]} leave no scored prediction "
                         f"(exclude_pos0={exclude_pos0}); use contexts of at least {first + 2} tokens")
    if tokens.shape[0] == 0:
        raise ValueError("no contexts to evaluate (tokens has 0 rows)")
    if batch_contexts < 1:
        raise ValueError(f"batch_contexts must be >= 1, got {batch_contexts}")
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is not None and hook_name not in hook_dict:
        near = [h for h in hook_dict if "resid" in h][:6]
        raise ValueError(f"model has no hook {hook_name!r}; residual hooks include {near}")
    return first


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _batches(tokens: Tensor, batch_contexts: int, device: torch.device, desc: str, progress: bool):
    starts = range(0, tokens.shape[0], batch_contexts)
    for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield tokens[s:s + batch_contexts].to(device)


def ablation_baselines(model: Any, tokens: Tensor, hook_name: str, *, mean_act: Tensor | None = None,
                       exclude_pos0: bool = True, batch_contexts: int = 8, progress: bool = True) -> AblationBaselines:
    """Clean, zero-ablated and (with ``mean_act``, the train-split mean activation [d_model]) mean-ablated CE."""
    first = _check_inputs(model, tokens, hook_name, exclude_pos0, batch_contexts)
    d_model = model.cfg.d_model
    if mean_act is not None and tuple(mean_act.shape) != (d_model,):
        raise ValueError(f"mean_act must be the [d_model={d_model}] train-split mean activation, "
                         f"got shape {tuple(mean_act.shape)}")
    device = _model_device(model)
    floors: dict[str, Callable[[Tensor], Tensor]] = {"zero": torch.zeros_like}
    if mean_act is not None:
        mu = mean_act.detach().to(device)
        floors["mean"] = lambda act: mu
    sums = {"clean": 0.0, "zero": 0.0, "mean": 0.0}
    n = 0
    store: dict[str, Tensor] = {}

    def grab(act: Tensor, hook: Any) -> Tensor:
        store["x"] = act
        return act

    for tok in _batches(tokens, batch_contexts, device, "ablation baselines", progress):
        with torch.no_grad():
            logits = model.run_with_hooks(tok, return_type="logits", fwd_hooks=[(hook_name, grab)],
                                          padding_side="right")
            sums["clean"] += per_token_ce(logits, tok, first).double().sum().item()
            x = store.pop("x")
            for name, replace in floors.items():
                # An ablation is a splice of a constant: it restarts at the hook's block like an SAE's splice (the
                # blocks below would recompute x), the same operations on the same inputs as a patched full forward.
                logits = spliced_logits(model, tok, hook_name, first, x, replace(x).expand_as(x))
                sums[name] += per_token_ce(logits, tok, first).double().sum().item()
        n += tok.shape[0] * (tok.shape[1] - 1 - first)
    return AblationBaselines(sums["clean"] / n, sums["zero"] / n, sums["mean"] / n if mean_act is not None else None,
                             n, hook_name, exclude_pos0, data_hash(tokens))


def _encode_decode(sae: Any, x: Tensor, g: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(x_hat, top_acts, top_indices) with the SAE's dtype; x_hat comes back in x's dtype."""
    param = next(iter(sae.parameters()), None) if hasattr(sae, "parameters") else None
    dtype = param.dtype if param is not None else x.dtype
    with torch.no_grad():
        enc = sae.encode(x.to(dtype), None if g is None else g.to(dtype))
        top_acts, top_indices = enc[0], enc[1]
        x_hat = sae.decode(top_acts, top_indices).to(x.dtype)
    return x_hat, top_acts, top_indices


class _Accumulator:
    def __init__(self, d_sae: int, keep_per_token: bool):
        self.ce = 0.0
        self.kl = 0.0
        self.recon = ReconstructionStats(d_sae)
        self.per_token: list[tuple[Tensor, Tensor]] | None = [] if keep_per_token else None


_RECON_FIELDS = ("n", "mean", "m2", "sse", "nonzero", "d_in", "counts")


def _sae_digest(sae: Any) -> str:
    """sha256 of an SAE's config (k, beta, ...) and parameters (names, shapes, dtypes and bytes): a checkpoint
    belongs to this SAE."""
    h = hashlib.sha256(repr(getattr(sae, "cfg", None)).encode())
    for name, t in sorted(sae.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save_checkpoint(path: Path, key: dict[str, Any], done: int, ce_clean_sum: float, n: int,
                     acc: dict[tuple[str, str], _Accumulator]) -> None:
    state = {"key": key, "batches_done": done, "ce_clean_sum": ce_clean_sum, "n": n,
             "acc": {f"{name}|{mode}": {"ce": a.ce, "kl": a.kl,
                                        **{f: getattr(a.recon, f) for f in _RECON_FIELDS}}
                     for (name, mode), a in acc.items()}}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _restore(a: _Accumulator, saved: dict[str, Any]) -> None:
    a.ce, a.kl = saved["ce"], saved["kl"]
    for f in _RECON_FIELDS:
        setattr(a.recon, f, saved[f])


def _load_checkpoint(path: Path, key: dict[str, Any], acc: dict[tuple[str, str], _Accumulator]
                     ) -> tuple[int, float, int]:
    """Restore the running sums of an interrupted evaluation into ``acc``; (batches done, CE sum, predictions)."""
    state = torch.load(path, weights_only=True)
    if state.get("key") != key:
        raise ValueError(f"{path} holds the running sums of another evaluation (other SAEs, encoders, tokens or "
                         f"settings); delete it to start this evaluation from its first batch")
    for (name, mode), a in acc.items():
        _restore(a, state["acc"][f"{name}|{mode}"])
    return state["batches_done"], state["ce_clean_sum"], state["n"]


_PREFIX_SETTINGS = ("hook", "exclude_pos0", "batch_contexts", "clean_above")
"""What another evaluation's sums must share with this one to stand for its first batches (not the baselines:
they enter only the final ratios)."""


def _load_prefix(paths: Sequence[Path], key: dict[str, Any], tokens: Tensor, batch_contexts: int,
                 acc: dict[tuple[str, str], _Accumulator]) -> tuple[int, float, int]:
    """Start ``acc`` from the checkpoints of other evaluations of the first contexts of ``tokens``: each of
    ``paths`` counts if it has the same settings, SAE weights and first contexts, and the latest number of whole
    batches that every run of ``acc`` has, with one clean CE sum, is taken. (0, 0.0, 0): none covers every run."""
    usable: dict[int, list[dict[str, Any]]] = {}
    for path in paths:
        state = torch.load(path, weights_only=True)
        k, done = state["key"], state["batches_done"]
        n_ctx = k.get("n_contexts", 0)
        if (any(k.get(s) != key[s] for s in _PREFIX_SETTINGS) or not 0 < done * batch_contexts <= n_ctx
                or n_ctx > tokens.shape[0] or k["tokens"] != data_hash(tokens[:n_ctx])):
            continue
        usable.setdefault(done, []).append(state)
    for done in sorted(usable, reverse=True):
        found: dict[tuple[str, str], tuple[dict[str, Any], tuple[float, int]]] = {}
        for state in usable[done]:
            for name, mode in acc:
                saved = state["acc"].get(f"{name}|{mode}")
                if saved is not None and state["key"]["sae_weights"].get(name) == key["sae_weights"][name]:
                    found[name, mode] = saved, (state["ce_clean_sum"], state["n"])
        if len(found) < len(acc):
            continue
        clean = {c for _, c in found.values()}
        if len(clean) != 1:  # the same contexts gave two clean CE sums: a clean pass differs; never mix them
            warnings.warn(f"prefix checkpoints disagree on the clean CE of their first {done} batches; "
                          f"they are passed over", stacklevel=3)
            continue
        for r, a in acc.items():
            _restore(a, found[r][0])
        (ce_clean_sum, n), = clean
        return done, ce_clean_sum, n
    return 0, 0.0, 0


def evaluate_saes(model: Any, saes: Mapping[str, Any], tokens: Tensor, hook_name: str, *,
                  baselines: AblationBaselines, encode_modes: Sequence[str] = ENCODE_MODES,
                  batch_contexts: int = 8, per_token: bool = False, clean_above: float | None = None,
                  progress: bool = True, checkpoint: str | Path | None = None,
                  resume_from: Sequence[str | Path] = ()) -> dict[str, dict[str, FidelityResult]]:
    """Evaluate several SAEs x encoders on the same contexts, sharing each batch's clean forward.

    ``clean_above``: positions whose clean activation norm exceeds it keep the clean activation in the splice
    (massive activations, PREREG §2); their reconstruction still counts in the FVU / L0 statistics.

    ``baselines`` must come from ``ablation_baselines`` on the same tokens, hook and ``exclude_pos0``
    (the splice rule follows ``baselines.exclude_pos0``). Returns ``{sae_name: {encode_mode: FidelityResult}}``.

    ``checkpoint``: a file that keeps the running sums after every batch, so that an evaluation killed part-way
    resumes at its next batch with the same sums in the same order (the same numbers, bit for bit). It is refused
    when it was written for other SAE weights, encoders, tokens or settings. Once the results are stored the caller
    deletes it, or keeps it for a longer evaluation to start from (``resume_from``). Not with ``per_token`` (the
    per-token scores are not kept).

    ``resume_from``: checkpoints of other evaluations whose contexts are the first contexts of ``tokens`` (e.g. a
    subset evaluation of the same SAEs): when ``checkpoint`` does not exist yet, the evaluation starts after the
    batches they already summed for every one of its runs (same SAE weights and settings; files that do not fit
    are passed over). The sums are the ones a run from the first batch would have reached, so the results are the
    same bits. Needs ``checkpoint``.
    """
    exclude_pos0 = baselines.exclude_pos0
    first = _check_inputs(model, tokens, hook_name, exclude_pos0, batch_contexts)
    bad_modes = set(encode_modes) - set(ALL_ENCODE_MODES)
    if bad_modes or not encode_modes:
        raise ValueError(f"encode_modes must be a non-empty subset of {ALL_ENCODE_MODES}, got {tuple(encode_modes)}")
    if baselines.hook_name != hook_name or baselines.tokens_hash != data_hash(tokens):
        raise ValueError("baselines were computed on other tokens or another hook; rerun ablation_baselines(model, "
                         "tokens, hook_name, ...) on exactly these tokens")
    if not saes:
        raise ValueError("no SAEs given")

    # A gradient only changes the code of an SAE that uses it; for the others "g" is "plain".
    def effective(sae: Any, mode: str) -> str:
        return mode if mode != "plain" and getattr(sae, "uses_gradient", True) else "plain"

    runs = sorted({(name, effective(sae, m)) for name, sae in saes.items() for m in encode_modes})
    need_grad = any(mode != "plain" for _, mode in runs)
    label_free = any(mode == "g_free" for _, mode in runs)
    acc = {r: _Accumulator(int(saes[r[0]].cfg.d_sae), per_token) for r in runs}
    ce_clean_sum, n, done = 0.0, 0, 0
    clean_rows: list[Tensor] = []
    if checkpoint is not None:
        if per_token:
            raise ValueError("checkpoint does not keep per-token scores; evaluate with per_token=False")
        checkpoint = Path(checkpoint)
        key = {"runs": [list(r) for r in runs], "sae_weights": {name: _sae_digest(saes[name]) for name in sorted(saes)},
               "tokens": data_hash(tokens), "n_contexts": int(tokens.shape[0]), "hook": hook_name,
               "exclude_pos0": exclude_pos0, "batch_contexts": batch_contexts, "clean_above": clean_above,
               "baselines": list(baselines)}
        if checkpoint.exists():
            done, ce_clean_sum, n = _load_checkpoint(checkpoint, key, acc)
        else:
            done, ce_clean_sum, n = _load_prefix([Path(f) for f in resume_from], key, tokens, batch_contexts, acc)
            if done:
                _save_checkpoint(checkpoint, key, done, ce_clean_sum, n, acc)
    elif resume_from:
        raise ValueError("resume_from needs a checkpoint file for this evaluation's own running sums")

    device = _model_device(model)
    for tok in _batches(tokens[done * batch_contexts:], batch_contexts, device, f"splice eval ({len(runs)} runs)",
                        progress):
        clean = clean_pass(model, tok, hook_name, first, need_grad, label_free)
        ce_clean_sum += clean.ce.double().sum().item()
        n += clean.ce.numel()
        if per_token:
            clean_rows.append(clean.ce.float().cpu())
        T = tok.shape[1]
        for name, mode in runs:
            grad = {"g": clean.g, "g_free": clean.g_free}.get(mode)
            x_hat, top_acts, top_indices = _encode_decode(saes[name], clean.x, grad)
            spliced = x_hat
            if clean_above is not None:
                spliced = torch.where(clean.x.norm(dim=-1, keepdim=True) > clean_above, clean.x, x_hat)
            logits = spliced_logits(model, tok, hook_name, first, clean.x, spliced)
            ce, kl = ce_and_kl(logits, tok, first, clean.logp)
            a = acc[name, mode]
            a.ce += ce.double().sum().item()
            a.kl += kl.double().sum().item()
            scored = slice(first, T - 1)
            a.recon.add(clean.x[:, scored], x_hat[:, scored], top_acts[:, scored], top_indices[:, scored])
            if a.per_token is not None:
                a.per_token.append((ce.float().cpu(), kl.float().cpu()))
        done += 1
        if checkpoint is not None:
            _save_checkpoint(checkpoint, key, done, ce_clean_sum, n, acc)

    if n != baselines.n_tokens:
        raise ValueError(f"baselines cover {baselines.n_tokens} predictions, this evaluation {n}")
    ce_clean = ce_clean_sum / n
    out: dict[str, dict[str, FidelityResult]] = {}
    for name, sae in saes.items():
        for mode in encode_modes:
            a = acc[name, effective(sae, mode)]
            ce_spliced = a.ce / n
            pt = None
            if a.per_token is not None:
                pt = PerTokenScores(torch.cat(clean_rows), torch.cat([c for c, _ in a.per_token]),
                                    torch.cat([k for _, k in a.per_token]))
            counts = a.recon.counts.clone()
            out.setdefault(name, {})[mode] = FidelityResult(
                encode_mode=mode, ce_clean=ce_clean, ce_spliced=ce_spliced, delta_ce=ce_spliced - ce_clean,
                ce_zero=baselines.ce_zero, ce_mean=baselines.ce_mean,
                recovered_zero=_recovered(baselines.ce_zero, ce_spliced, ce_clean),
                recovered_mean=_recovered(baselines.ce_mean, ce_spliced, ce_clean),
                kl=a.kl / n, fvu=a.recon.fvu, mse=a.recon.mse, l0=a.recon.l0, firing_counts=counts,
                dead_fraction=float((counts == 0).double().mean()), n_tokens=n, per_token=pt)
    return out


def evaluate_sae(model: Any, sae: Any, tokens: Tensor, hook_name: str, *, encode_mode: str,
                 baselines: AblationBaselines, batch_contexts: int = 8, per_token: bool = False,
                 progress: bool = True) -> FidelityResult:
    """One SAE, one encoder (see ``evaluate_saes``; pass precomputed ``baselines``)."""
    if encode_mode not in ALL_ENCODE_MODES:
        raise ValueError(f"encode_mode must be one of {ALL_ENCODE_MODES}, got {encode_mode!r}")
    return evaluate_saes(model, {"sae": sae}, tokens, hook_name, baselines=baselines, encode_modes=(encode_mode,),
                         batch_contexts=batch_contexts, per_token=per_token, progress=progress)["sae"][encode_mode]


def splice_ce(model: Any, sae: Any, tokens: Tensor, hook_name: str, *, encode_mode: str, exclude_pos0: bool = True,
              batch_contexts: int = 8, mean_act: Tensor | None = None, baselines: AblationBaselines | None = None,
              per_token: bool = False, progress: bool = True) -> FidelityResult:
    """Everything in one call: computes the ablation baselines unless given (then ``exclude_pos0`` must match)."""
    if baselines is None:
        baselines = ablation_baselines(model, tokens, hook_name, mean_act=mean_act, exclude_pos0=exclude_pos0,
                                       batch_contexts=batch_contexts, progress=progress)
    elif baselines.exclude_pos0 != exclude_pos0:
        raise ValueError(f"baselines were computed with exclude_pos0={baselines.exclude_pos0}, "
                         f"but exclude_pos0={exclude_pos0} was asked for")
    return evaluate_sae(model, sae, tokens, hook_name, encode_mode=encode_mode, baselines=baselines,
                        batch_contexts=batch_contexts, per_token=per_token, progress=progress)


def latent_frequency_histogram(counts: Tensor, n_tokens: int) -> FrequencyHistogram:
    """log10 firing frequency of each alive latent; dead latents are counted, not plotted."""
    c = torch.as_tensor(counts).detach().cpu().to(torch.int64)
    if c.ndim != 1:
        raise ValueError(f"counts must be a [d_sae] vector, got shape {tuple(c.shape)}")
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be > 0, got {n_tokens}")
    if int(c.max()) > n_tokens or int(c.min()) < 0:
        raise ValueError(f"counts must lie in [0, n_tokens={n_tokens}]; were they summed over other tokens?")
    alive = (c > 0).nonzero().squeeze(1)
    freq = c[alive].double() / n_tokens
    n_dead = int(c.numel() - alive.numel())
    return FrequencyHistogram(freq.log10().numpy(), alive.numpy(), n_dead, n_dead / c.numel(), n_tokens)
