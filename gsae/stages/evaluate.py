"""Stage ``evaluate``: every SAE in both encode modes on the test split (the selection stage calls it on the
validation split): spliced CE / KL from the LM (``gsae.evals``) and FVU / L0 / firing counts from the harvest.
Per SAE it writes ``eval_<split>-<key>.json`` (``{"metrics": {mode: {...}}}``) and the firing counts."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch

from .. import evals, io
from .. import lm as lm_passes
from ..config import Profile, config_hash
from ..paths import run_dir
from ..progress import bar
from ..runtime import module_device, to_device
from ..sae import changed_count
from ..specs import SAESpec, load_trained, sae_dir, source_version, stage_file
from .contexts import contexts
from .harvest import reader

MASSIVE_NORM_FACTOR = 10.0
"""A token is "massive" when its activation norm exceeds this multiple of the train split's median norm.

SmolLM2 carries a handful of massive activations at layer 17 (norms ~25,000 against a median of ~184; Sun et
al. 2024, "Massive activations in LLMs"). Seven such tokens out of 12,400 in the default test split dominate
an SAE's squared error (the ten worst tokens hold 78-99% of it), so the pooled FVU mostly measures how those
few are reconstructed. ``fvu_typical`` excludes them (DEVIATIONS.md, 2026-11-25 18:30); the registered ``fvu``
is kept beside it. The gap between the typical tail (~255) and the massive tokens (>= 2,470) is wide, so any
factor from ~2 to ~10 selects the same tokens; the threshold is SAE-independent (train split only)."""


def code_version() -> str:
    """Keys the cached per-SAE evaluation files to the code that computes them (``lm`` runs every LM pass)."""
    return source_version(evals, lm_passes, sys.modules[__name__])


def eval_file(p: Profile, split: str, kind: str = "eval") -> str:
    return stage_file(p, kind, split, code_version())


def splice_sums_dir(p: Profile, split: str) -> Path:
    """Where ``evaluate_specs`` keeps the running sums of its splice evaluations (``evals.evaluate_saes``'s
    checkpoints), one file per group of SAEs: they resume a killed evaluation, and ``full_test`` starts each of its
    SAEs after the contexts summed here (its first ``eval.lm_contexts``) instead of splicing them again."""
    return run_dir(p) / "splice_sums" / Path(eval_file(p, split)).stem


def eval_tokens(p: Profile, lm, split: str, every_context: bool = False):
    """Tokens for the LM-based metrics (the first ``eval.lm_contexts`` harvested contexts of the split, or all of
    them with ``every_context``) and the split's harvest reader (for the activation-based metrics)."""
    mh = lm.info["model_hash"]
    ctx = contexts(p, lm.tokenizer, mh)[split]
    rd = reader(p, split, mh)
    n = rd.manifest["n_contexts"]
    return ctx.tokens[:n if every_context else min(n, p.eval.lm_contexts)], rd


def eval_context(p: Profile, lm, split: str, every_context: bool = False, progress: bool = False):
    """``eval_tokens`` plus what the splice evaluation alone needs from the train split: the ablation baselines
    on those tokens (mean ablation uses the train mean) and the massive-activation norm cap. The train split is
    streamed when it is large (``ActivationReader.statistics``), never loaded whole."""
    mh = lm.info["model_hash"]
    tokens, rd = eval_tokens(p, lm, split, every_context)
    train = train_statistics(p, mh)
    base = evals.ablation_baselines(lm.model, tokens, p.model.hook_name, mean_act=train.mean,
                                    exclude_pos0=p.harvest.exclude_pos0, batch_contexts=p.eval.batch_contexts,
                                    progress=progress)
    return tokens, base, rd, MASSIVE_NORM_FACTOR * train.median_norm


_STATS: dict[tuple[str, str], Any] = {}


def train_statistics(p: Profile, model_hash: str):
    """The train split's mean activation and median norm (``ActivationReader.statistics``), computed once per
    process and harvest: the selection rounds and the test evaluation all need them, and at paper scale each pass
    streams the whole 154 GB train split."""
    rd = reader(p, "train", model_hash)
    key = (str(rd.dir), str(rd.manifest.get("plan_hash")))
    if key not in _STATS:
        _STATS[key] = rd.statistics()
    return _STATS[key]


def massive_norm_cap(train_x: torch.Tensor, factor: float = MASSIVE_NORM_FACTOR) -> float:
    """The norm above which a token counts as massive: ``factor`` x the median row norm of ``train_x``."""
    from ..steering import median_activation_norm

    return factor * median_activation_norm(train_x)


ACT_CHUNK = 4096
"""Rows per encode in the activation metrics (the split is streamed in chunks of this size)."""


class ActivationMetrics:
    """FVU, MSE, L0 and per-latent firing counts of one encoder, accumulated over chunks of harvested rows.

    With ``norm_cap`` also ``fvu_typical``: the pooled FVU over the rows whose norm is at most ``norm_cap``
    (see ``MASSIVE_NORM_FACTOR``), and ``n_massive``, the number of rows left out of it. Given the plain-encode's
    selection of the same rows (``add(..., reference=)``), also ``selection_changed_share``: the mean over rows of
    the share of this encoder's k latents that plain TopK(z) does not select (``gsae.sae.selection_changed_share``)."""

    def __init__(self, sae, mode: str, norm_cap: float | None = None):
        self.sae, self.mode, self.norm_cap = sae, mode, norm_cap
        self.stats, self.typical = evals.ReconstructionStats(sae.cfg.d_sae), evals.ReconstructionStats(sae.cfg.d_sae)
        self.n_massive = 0
        self.n_changed = self.n_compared = 0

    @torch.no_grad()
    def add(self, xb: torch.Tensor, gb: torch.Tensor | None, reference: torch.Tensor | None = None) -> torch.Tensor:
        """One chunk of rows (on the SAE's device, or moved there) and the gradient this encoder uses (ignored
        for ``mode="plain"``); ``reference``: the plain-encode's [n, k] selection of these rows. Returns this
        encoder's [n, k] selection."""
        device = module_device(self.sae)
        xb = to_device(xb, device)
        enc = self.sae.encode(xb, to_device(gb, device) if self.mode != "plain" and gb is not None else None)
        x_hat = self.sae.decode(enc.top_acts, enc.top_indices)
        self.stats.add(xb, x_hat, enc.top_acts, enc.top_indices)
        if self.norm_cap is not None:
            keep = xb.norm(dim=-1) <= self.norm_cap
            self.n_massive += int((~keep).sum())
            self.typical.add(xb[keep], x_hat[keep], enc.top_acts[keep], enc.top_indices[keep])
        if reference is not None:
            self.n_changed += int(changed_count(enc.top_indices, to_device(reference, device)).sum())
            self.n_compared += enc.top_indices.numel()
        return enc.top_indices

    def result(self) -> dict[str, Any]:
        stats = self.stats
        out = {"fvu": stats.fvu, "mse": stats.mse, "l0": stats.l0, "counts": stats.counts, "n_act_tokens": stats.n,
               "dead_fraction": float((stats.counts == 0).double().mean())}
        if self.norm_cap is not None:
            out.update(fvu_typical=self.typical.fvu, n_massive=self.n_massive, massive_norm_cap=self.norm_cap)
        if self.n_compared:
            out["selection_changed_share"] = self.n_changed / self.n_compared
        return out


def activation_metrics(sae, x: torch.Tensor, g: torch.Tensor | None, mode: str, chunk: int = ACT_CHUNK,
                       norm_cap: float | None = None) -> dict[str, Any]:
    """``ActivationMetrics`` of one encoder over the rows ``x`` and its gradient ``g`` (no LM forward needed); a
    gradient encoder given ``g`` also reports ``selection_changed_share`` against the plain-encode."""
    acc = ActivationMetrics(sae, mode, norm_cap)
    plain = ActivationMetrics(sae, "plain") if mode != "plain" and g is not None else None
    for i in range(0, len(x), chunk):
        ref = None if plain is None else plain.add(x[i:i + chunk], None)
        acc.add(x[i:i + chunk], None if g is None else g[i:i + chunk], reference=ref)
    return acc.result()


def standard_names(lm_part: dict[str, Any], act: dict[str, Any]) -> dict[str, float]:
    """The quality figures under the names SAELens' run_evals / SAEBench use: ce_loss_score (CE recovered against
    zero ablation), explained_variance (1 - FVU; also over typical tokens) and kl_div (KL(clean || spliced))."""
    out = {"explained_variance": 1 - act["fvu"]}
    if "recovered_zero" in lm_part:  # spliced into the LM
        out.update(ce_loss_score=lm_part["recovered_zero"], kl_div=lm_part["kl"])
    if "fvu_typical" in act:
        out["explained_variance_typical"] = 1 - act["fvu_typical"]
    return out


def dead_fractions_over(encoders: dict[str, tuple[Any, str]], rd, batch: int = 8192, progress: bool = False
                        ) -> dict[str, float]:
    """For each ``{name: (sae, encoder mode)}``, the fraction of latents that never fire on any row of a harvested
    split (``rd``): C2's window in v2 (the whole training split, far larger than the test split).

    The split is streamed once per gradient kind and every batch is encoded by every SAE that reads it: the same
    batches in the same order as a pass per SAE, so the same numbers, for one read of the split instead of one per
    SAE."""
    def kind(mode: str) -> str:
        return "g_free" if mode == "g_free" else "g"

    fired = {name: torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=module_device(sae))
             for name, (sae, _) in encoders.items()}
    with torch.no_grad():
        for gradient in sorted({kind(mode) for _, mode in encoders.values()}):
            readers = {name: sm for name, sm in encoders.items() if kind(sm[1]) == gradient}
            device = module_device(next(iter(readers.values()))[0])
            stream = rd.batches(batch, seed=0, epochs=1, device=device, gradient=gradient)
            for x, g in bar(stream, total=math.ceil(rd.n_tokens / batch), disable=not progress, leave=False,
                            desc=f"dead latents over {rd.n_tokens:,} harvested rows ({len(readers)} SAEs, {gradient})"):
                for name, (sae, mode) in readers.items():
                    enc = sae.encode(x, None if mode == "plain" else g)
                    fired[name][enc.top_indices[enc.top_acts > 0]] = True
    return {name: float((~f).double().mean()) for name, f in fired.items()}


def evaluate_specs(p: Profile, lm, specs: list[SAESpec], split: str, progress: bool = True
                   ) -> dict[str, dict[str, Any]]:
    """Metrics of each SAE in both encode modes on ``split``, cached per SAE (``eval_file``).

    LM-based metrics (spliced CE, KL, CE recovered) come from one pass over the split's first
    ``eval.lm_contexts`` contexts shared by every SAE; activation-based metrics (FVU, MSE, L0, firing counts,
    dead fraction) from every harvested token of the split, streamed once in chunks for all SAEs. Everything
    runs on the LM's device."""
    mh = lm.info["model_hash"]
    name = eval_file(p, split)
    todo = [s for s in specs if not (sae_dir(p, s, mh) / name).exists()]
    if todo:
        device = module_device(lm.model)
        tokens, base, rd, cap = eval_context(p, lm, split)
        saes = {s.name: load_trained(p, s, mh, device) for s in todo}
        modes = evals.ENCODE_MODES + (("g_free",) if split in p.harvest.label_free_splits else ())

        def encoders(s: SAESpec) -> tuple[str, ...]:  # an arm whose code ignores g: every encoder is plain-encode
            return modes if s.arm_impl.has_gradient_encoder else ("plain",)

        def measured(s: SAESpec) -> tuple[str, ...]:  # the encoders spliced into the LM
            if split != "test":  # the selection's split: the encoders its objectives read (lr: plain; beta: g too)
                return tuple(m for m in encoders(s) if m in ("plain", "g"))
            secondary = s.group == "primary" and s.k in (p.experiment.primary_k or (s.k,))
            return encoders(s) if p.eval.gradient_splices == "all" or secondary else ("plain",)

        res: dict[str, Any] = {}
        for group_modes in dict.fromkeys(measured(s) for s in todo):
            group = {s.name: saes[s.name] for s in todo if measured(s) == group_modes}
            sums = splice_sums_dir(p, split) / f"{config_hash(sorted(group), n=8)}.pt"
            res.update(evals.evaluate_saes(lm.model, group, tokens, p.model.hook_name, baselines=base,
                                           encode_modes=group_modes, batch_contexts=p.eval.batch_contexts,
                                           progress=progress, clean_above=cap if p.eval.massive == "clean" else None,
                                           checkpoint=sums))
        acc = {(s.name, mode): ActivationMetrics(saes[s.name], mode, cap) for s in todo for mode in encoders(s)}
        for rows in rd.chunks(ACT_CHUNK):
            x = to_device(rows.x, device)  # moved once, shared by every SAE
            grads = {m: to_device(rows.gradient(m), device) for m in modes if m != "plain"}
            for s in todo:  # plain-encode first: its selection is what the gradient encoders are compared with
                ref = acc[s.name, "plain"].add(x, None)
                for mode in encoders(s):
                    if mode != "plain":
                        acc[s.name, mode].add(x, grads.get(mode), reference=ref)
        dead_train = {}  # C2's window: the whole training split, with the encoder each SAE trained with
        if split == "test":
            trained_with = {s.name: (saes[s.name], s.primary_encode) for s in todo}
            dead_train = dead_fractions_over(trained_with, reader(p, "train", mh), progress=progress)
        for s in todo:
            d = sae_dir(p, s, mh)
            out, counts = {}, {}
            for mode in encoders(s):
                act = acc[s.name, mode].result()
                counts[mode] = act.pop("counts")
                r = res[s.name].get(mode)
                if r is None:  # not spliced (eval.gradient_splices): activation metrics only
                    out[mode] = {"encode_mode": mode, **act, **standard_names({}, act)}
                    continue
                lm_part = {f"{k}_lm_subset" if k in ("fvu", "mse", "l0", "dead_fraction") else k: v
                           for k, v in r.scalars().items()}
                out[mode] = {**lm_part, **act, "n_lm_tokens": r.n_tokens, **standard_names(lm_part, act)}
            for mode in modes:  # the unmeasured encoders of a gradient-free arm: the same code, so the same numbers
                same = {**out["plain"], **({"encode_mode": mode} if "encode_mode" in out["plain"] else {})}
                out.setdefault(mode, same)
                counts.setdefault(mode, counts["plain"].clone())
            if s.name in dead_train:
                out[s.primary_encode]["dead_fraction_trainsplit"] = dead_train[s.name]
            io.save_tensors(d / eval_file(p, split, "firing"), counts)
            io.write_json(d / name, {"metrics": out})
    return {s.name: io.read_json(sae_dir(p, s, mh) / name) for s in specs}


def firing_counts(p: Profile, lm, spec: SAESpec, split: str = "test") -> dict[str, torch.Tensor]:
    """Per-latent firing counts of ``spec`` on ``split`` under each encoder ({"g": [d_sae], "plain": [d_sae]})."""
    return io.load_tensors(sae_dir(p, spec, lm.info["model_hash"]) / eval_file(p, split, "firing"))


def firing_frequencies(p: Profile, lm, specs: list[SAESpec], k: int, seed: int) -> dict[str, Any]:
    """Test-split firing frequency of every latent of each arm (both encoders where the arm has two) at (k, seed)."""
    mh = lm.info["model_hash"]
    out = {}
    for s in specs:
        if s.group == "primary" and s.k == k and s.seed == seed:
            counts = firing_counts(p, lm, s)
            n = io.read_json(sae_dir(p, s, mh) / eval_file(p, "test"))["metrics"]["plain"]["n_act_tokens"]
            for mode in (("g", "plain") if s.arm_impl.has_gradient_encoder else ("plain",)):
                out[s.arm_impl.label_for(mode)] = (counts[mode].double() / n).numpy()
    return out


def run(p: Profile, lm, specs: list[SAESpec], progress: bool = True) -> dict[str, Any]:
    """Evaluate every SAE of the grid on the test split."""
    return evaluate_specs(p, lm, specs, "test", progress)
