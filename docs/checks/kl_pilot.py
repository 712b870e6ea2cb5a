"""KL fine-tuning beside the g-SAE, a pilot on the validation split (PREREG v6 §7 registers the comparison itself as
profile kl, 8 seeds, on the test split; this is not it). Default profile, k = 32, seeds 0 and 1: TopK + KL and
g-SAE + KL (beta 0.1) trained like the study's primary SAEs of the same seeds (lr 4e-3, the same batches, MSE for
95 % of the tokens, then KL(clean || spliced) + MSE), against those primary SAEs; validation delta_ce and KL on the
selection's 50 validation contexts, plain-encode and, for the gradient arms, g-encode. Needs the default run's
harvest and primary SAEs of seeds 0 and 1 under runs/default on this machine.

    PYTHONPATH=. python docs/checks/kl_pilot.py > docs/checks/kl_pilot.txt
"""

from __future__ import annotations

import time

import numpy as np
import torch
from kl_test import ARMS, trained_pairs  # docs/checks/kl_test.py: the same SAEs

from gsae import io
from gsae.specs import sae_dir
from gsae.stages.evaluate import evaluate_specs

SEEDS = (0, 1)


def main() -> None:
    torch.set_num_threads(2)
    t0 = time.time()
    p, lm, sel, beta, specs = trained_pairs(SEEDS)
    ev = evaluate_specs(p, lm, list(specs.values()), "val", progress=False)
    mh = lm.info["model_hash"]
    secs = {key: io.read_json(sae_dir(p, s, mh) / "train.json")["seconds"] for key, s in specs.items()}
    print(f"# validation split, first {p.eval.lm_contexts} contexts; k = 32, beta {beta}, lr {sel['lr']['topk']}, "
          f"kl_frac {p.train.kl_frac}, kl_coef {p.train.kl_coef}; seeds {list(SEEDS)}")
    print("| arm | encoder | delta_ce per seed | kl per seed | share of TopK's delta_ce closed (mean) | "
          "training s per seed |")
    print("|---|---|---|---|---|---|")
    topk = np.array([ev[specs["topk", s].name]["metrics"]["plain"]["delta_ce"] for s in SEEDS])
    for arm in ARMS:
        for mode in (("plain", "g") if arm.startswith("gsae") else ("plain",)):
            ce = np.array([ev[specs[arm, s].name]["metrics"][mode]["delta_ce"] for s in SEEDS])
            kl = [ev[specs[arm, s].name]["metrics"][mode]["kl"] for s in SEEDS]
            closed = float(np.mean((topk - ce) / topk))
            print(f"| {arm} | {mode} | {', '.join(f'{v:.4f}' for v in ce)} | {', '.join(f'{v:.4f}' for v in kl)} "
                  f"| {100 * closed:+.1f}% | {', '.join(f'{secs[arm, s]:.0f}' for s in SEEDS)} |")
    print(f"# training seconds: the primary SAEs of a seed trained together with the study's other SAEs of that seed "
          f"(a shared loop), so only the KL arms' times are their own; wall time {time.time() - t0:.0f} s; "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
