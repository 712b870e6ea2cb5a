"""Does the best learning rate move with beta? Validation split only (the selection's plain-encode delta_ce on its
contexts), default profile, k = 32, the selection seeds, the primary training length: each beta of the dose grid
above the registered 0.1 at the lr trials around the selected 0.004 (x0.5, x1, x2). The selection of study v5
chose 0.004 for TopK (beta 0) and for the g-SAE at beta 0.1 (results/default/selection.json). If every beta's
best lr is 0.004 too, the dose-response of study v6 trains every beta at 0.004 (PREREG v6 §3).

    PYTHONPATH=. python docs/checks/lr_by_beta.py > docs/checks/lr_by_beta.txt
"""

from __future__ import annotations

import dataclasses
import time

import torch

from gsae.config import load_profile
from gsae.stages._jobs import evaluate_on_main, train_specs
from gsae.stages._lm import load_lm
from gsae.stages.harvest import reader
from gsae.stages.selection import trial_spec

BETAS = (0.3, 1.0, 3.0)
LRS = (0.002, 0.004, 0.008)


def main() -> None:
    torch.set_num_threads(2)
    t0 = time.time()
    p = load_profile("default")
    lm = load_lm(p, progress=False)
    rd = reader(p, "train", lm.info["model_hash"])
    gs = rd.manifest["grad_stats"]["grad_scale"]
    specs = {}
    for beta in BETAS:
        for lr in LRS:
            for seed in p.selection.seeds:
                s = trial_spec(p, "gsae", rd.d, gs, lr, seed, label=f"lr{lr:.4g}-beta{beta:g}")
                specs[beta, lr, seed] = dataclasses.replace(s, sae=dataclasses.replace(s.sae, beta=beta))
    train_specs(p, lm, list(specs.values()), rd, progress=False)
    ev = evaluate_on_main(p, lm, list(specs.values()), progress=False)
    print(f"# plain-encode validation delta_ce (nats), mean over selection seeds {list(p.selection.seeds)}; "
          f"k = 32, {p.train.tokens} training tokens, grad_scale {gs!r}")
    print("| beta | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " | best lr |")
    print("|---|" + "---|" * (len(LRS) + 1))
    for beta in BETAS:
        mean = {lr: sum(ev[specs[beta, lr, s].name]["metrics"]["plain"]["delta_ce"] for s in p.selection.seeds)
                / len(p.selection.seeds) for lr in LRS}
        best = min(mean, key=mean.get)
        print(f"| {beta:g} | " + " | ".join(f"{mean[lr]:.4f}" for lr in LRS) + f" | {best:g} |")
    print(f"# wall time {time.time() - t0:.0f} s; torch {torch.__version__}")


if __name__ == "__main__":
    main()
