"""Exploratory (no verdict reads it): is the seed-to-seed spread of C1's ΔCE gain at k = 32 mostly
evaluation noise on the scored predictions, or training noise? Splits the registered test evaluation (the same 50
test contexts, plain-encode, massive positions clean) into its two halves of 25 contexts and asks whether a seed's
paired gain on one half predicts its gain on the other. Run from the repository root after the default profile:
    python docs/checks/eval_noise_check.py > docs/checks/eval_noise_check.txt
"""
import json

import numpy as np
import torch

from gsae import evals
from gsae.config import load_profile
from gsae.specs import load_trained
from gsae.stages import load_lm
from gsae.stages.evaluate import eval_context
from gsae.stages.selection import all_specs

p = load_profile("default")
lm = load_lm(p, progress=False)
mh = lm.info["model_hash"]
specs = [s for s in all_specs(p, lm) if s.group == "primary" and s.k == 32]
tokens, base, _, cap = eval_context(p, lm, "test")
saes = {s.name: load_trained(p, s, mh) for s in specs}
res = evals.evaluate_saes(lm.model, saes, tokens, p.model.hook_name, baselines=base, encode_modes=("plain",),
                          batch_contexts=p.eval.batch_contexts, progress=False, per_token=True,
                          clean_above=cap if p.eval.massive == "clean" else None)
n_ctx, per_ctx = res[specs[0].name]["plain"].per_token.kl.shape


def delta(name: str, metric: str, half: slice) -> float:
    pt = res[name]["plain"].per_token
    if metric == "delta_ce":
        return float((pt.ce_spliced[half].double() - pt.ce_clean[half].double()).mean())
    return float(pt.kl[half].double().mean())


# The whole-set numbers must be the registered ones (metrics.jsonl), or this script measures something else.
with open("results/default/metrics.jsonl") as f:
    registered = {(r["sae"], r["encode_mode"]): r["metrics"] for r in map(json.loads, f)}
worst = max(abs(delta(s.name, "delta_ce", slice(0, n_ctx)) - registered[s.name, "plain"]["delta_ce"]) for s in specs)
print(f"max |ΔCE here - registered ΔCE| over the {len(specs)} SAEs: {worst:.2e}")


halves = {"first": slice(0, n_ctx // 2), "second": slice(n_ctx // 2, n_ctx), "all": slice(0, n_ctx)}
seeds = sorted({s.seed for s in specs})
for metric in ("delta_ce", "kl"):
    gains = {}
    for h, sl in halves.items():
        t = np.array([delta(f"primary/topk-k32-s{s}", metric, sl) for s in seeds])
        g = np.array([delta(f"primary/gsae-k32-s{s}", metric, sl) for s in seeds])
        gains[h] = (t - g) / t.mean()
    r = np.corrcoef(gains["first"], gains["second"])[0, 1]
    print(f"{metric}: paired-gain SD over {len(seeds)} seeds, % of TopK: all {100 * gains['all'].std(ddof=1):.2f}, "
          f"first half {100 * gains['first'].std(ddof=1):.2f}, second half {100 * gains['second'].std(ddof=1):.2f}; "
          f"correlation of a seed's gain between the halves r = {r:.2f}; "
          f"mean gain all {100 * gains['all'].mean():+.2f}")
print(f"({n_ctx} test contexts, {per_ctx} scored predictions each; torch {torch.__version__})")
