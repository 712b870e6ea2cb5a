"""Two evaluation shortcuts give the same numbers, bit for bit, as the slower computations they replace, on real
data, in one process.

    PYTHONPATH=. python docs/checks/prefix_splice_check.py > docs/checks/prefix_splice_check.txt

- ``full_test`` starts each SAE after the first contexts ``evaluate`` already spliced it into (their kept sums,
  ``evals.evaluate_saes(resume_from=...)``); the reference splices all 400 test contexts from the first batch.
- The zero and mean ablation baselines restart the forward at the hook's block; the reference reruns the blocks
  below it with a patching hook (the code before the change, copied here).

On the default profile's primary k = 32 pair of seed 0 (the TopK SAE and the g-SAE, trained here if not cached,
≈ 1 min), it runs the ``evaluate`` and ``full_test`` stages' own functions, counts full_test's clean passes, and
compares their numbers with the references. Needs the default profile's harvest and selection record.
"""

from __future__ import annotations

import time

import torch

import gsae.evals as evals
from gsae.config import load_profile
from gsae.lm import patched_logits, per_token_ce
from gsae.specs import load_trained
from gsae.stages import evaluate, load_lm
from gsae.stages.full_test import run_full_test
from gsae.stages.harvest import reader
from gsae.stages._jobs import train_specs
from gsae.stages.selection import all_specs


def patched_baselines(model, tokens, hook_name: str, mean_act, batch_contexts: int) -> tuple[float, float, float]:
    """(clean, zero-ablated, mean-ablated) CE as ``evals.ablation_baselines`` computed them before the change:
    every ablation a full forward with a patching hook."""
    sums, n, first = {"clean": 0.0, "zero": 0.0, "mean": 0.0}, 0, 1
    for s in range(0, tokens.shape[0], batch_contexts):
        tok = tokens[s:s + batch_contexts]
        with torch.no_grad():
            logits = model(tok, return_type="logits", padding_side="right")
        sums["clean"] += per_token_ce(logits, tok, first).double().sum().item()
        for name, replace in (("zero", torch.zeros_like), ("mean", lambda act: mean_act)):
            logits = patched_logits(model, tok, hook_name, first, replace)
            sums[name] += per_token_ce(logits, tok, first).double().sum().item()
        n += tok.shape[0] * (tok.shape[1] - 1 - first)
    return sums["clean"] / n, sums["zero"] / n, sums["mean"] / n


def main() -> int:
    p = load_profile("default")
    lm = load_lm(p, progress=False)
    mh = lm.info["model_hash"]
    specs = [s for s in all_specs(p, lm) if s.group == "primary" and s.k == 32 and s.seed == 0]
    train_specs(p, lm, specs, reader(p, "train", mh), progress=False)
    real, calls = evals.clean_pass, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    evals.clean_pass = counted
    t0 = time.perf_counter()
    ev = evaluate.evaluate_specs(p, lm, specs, "test", progress=False)
    t_eval, n_eval = time.perf_counter() - t0, len(calls)
    calls.clear()
    t0 = time.perf_counter()
    ft = run_full_test(p, lm, specs, progress=False)
    t_full, n_full = time.perf_counter() - t0, len(calls)
    evals.clean_pass = real

    checks: list[tuple[str, float, float]] = []
    tokens, base, _, cap = evaluate.eval_context(p, lm, "test", every_context=True)
    mean_act = evaluate.train_statistics(p, mh).mean
    t0 = time.perf_counter()
    ref_clean, ref_zero, ref_mean = patched_baselines(lm.model, tokens, p.model.hook_name, mean_act,
                                                      p.eval.batch_contexts)
    t_patched = time.perf_counter() - t0
    checks += [("baseline ce_clean (400 contexts)", base.ce_clean, ref_clean),
               ("baseline ce_zero (400 contexts)", base.ce_zero, ref_zero),
               ("baseline ce_mean (400 contexts)", base.ce_mean, ref_mean)]
    first50 = patched_baselines(lm.model, tokens[:p.eval.lm_contexts], p.model.hook_name, mean_act,
                                p.eval.batch_contexts)
    for s in specs:
        stored = ev[s.name]["metrics"]["plain"]
        checks += [(f"{s.name} evaluate ce_clean", stored["ce_clean"], first50[0]),
                   (f"{s.name} evaluate ce_zero", stored["ce_zero"], first50[1]),
                   (f"{s.name} evaluate ce_mean", stored["ce_mean"], first50[2])]
    saes = {s.name: load_trained(p, s, mh) for s in specs}
    whole = evals.evaluate_saes(lm.model, saes, tokens, p.model.hook_name, baselines=base, encode_modes=("plain",),
                                batch_contexts=p.eval.batch_contexts, progress=False, clean_above=cap)
    for s in specs:
        stored, r = ft[s.name]["metrics"]["plain"], whole[s.name]["plain"]
        checks += [(f"{s.name} full_test {k}_all", stored[f"{k}_all"], getattr(r, attr))
                   for k, attr in (("delta_ce", "delta_ce"), ("kl", "kl"), ("ce_loss_score", "recovered_zero"),
                                   ("ce_clean", "ce_clean"))]
    print(f"SAEs: {', '.join(s.name for s in specs)}")
    print(f"evaluate: {n_eval} clean passes ({t_eval:.0f} s, with its ablation baselines and C2's window)")
    print(f"full_test: {n_full} clean passes for {ft[specs[0].name]['n_contexts'] // p.eval.batch_contexts} batches "
          f"of contexts ({t_full:.0f} s, with its ablation baselines)")
    print(f"patched full-forward baselines on 400 contexts (the reference): {t_patched:.0f} s")
    same = 0
    for what, got, want in checks:
        same += got == want
        verdict = "identical" if got == want else f"DIFFERS from {want!r}"
        print(f"{what}: {got!r}  {verdict}")
    print(f"{same} of {len(checks)} numbers identical to their reference")
    return 0 if same == len(checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
