"""PREREG v6 §7's KL fine-tuning comparison computed from the default run's caches (DEVIATIONS 2026-12-06): TopK +
KL and g-SAE + KL (the chosen beta) at seeds 0-7, specified exactly as profile kl specifies them (the study's lr,
batches and seeds; MSE for 95 % of the tokens, then KL(clean || spliced) + MSE), scored like the study on every test
context (stage full_test: plain-encode, and g-encode for the g-SAE arms), against the default run's primary TopK and
g-SAE of the same seeds; then ``gsae.analysis.kl`` (the registered analysis). Needs the default run's harvest and
primary SAEs under runs/default on this machine.

    PYTHONPATH=. python docs/checks/kl_test.py > docs/checks/kl_test.txt
"""

from __future__ import annotations

import dataclasses
import time

import torch

from gsae import io
from gsae.analysis import kl
from gsae.config import load_profile
from gsae.paths import results_dir
from gsae.specs import SAESpec, sae_config, sae_dir
from gsae.stages import claims
from gsae.stages._jobs import train_specs
from gsae.stages._lm import load_lm
from gsae.stages.full_test import run_full_test
from gsae.stages.harvest import reader

SEEDS = tuple(range(8))
ARMS = ("topk", "gsae", "topk_kl", "gsae_kl")


def pair_specs(p, d_in: int, sel: dict, beta: float, seeds: tuple[int, ...]) -> dict[tuple[str, int], SAESpec]:
    """{(arm, seed): spec} of ``ARMS``: the default run's primary TopK and g-SAE, and the KL arms (group kl_pilot)
    specified as profiles/kl.yaml specifies them (the study's lr, beta and seeds)."""
    return {(arm, seed): SAESpec("primary" if arm in ("topk", "gsae") else "kl_pilot", arm, 32, seed,
                                 sae_config(p, arm, d_in, 32, sel["grad_scale"],
                                            **({"beta": beta} if arm.startswith("gsae") else {})),
                                 dataclasses.replace(p.train, seed=seed, lr=sel["lr"]["topk"]))
            for seed in seeds for arm in ARMS}


def trained_pairs(seeds: tuple[int, ...]):
    """The default profile, its LM, selection record and chosen beta, and ``pair_specs`` at ``seeds`` with the KL
    arms trained (the others are the default run's)."""
    p = load_profile("default")
    lm = load_lm(p, progress=False)
    rd = reader(p, "train", lm.info["model_hash"])
    sel = io.read_json(results_dir(p) / "selection.json")
    beta = io.read_json(results_dir(p) / "beta_selection.json")["arms"]["gsae"]["beta"]
    specs = pair_specs(p, rd.d, sel, beta, seeds)
    train_specs(p, lm, [s for s in specs.values() if s.group == "kl_pilot"], rd, progress=False)
    return p, lm, sel, beta, specs


def main() -> None:
    torch.set_num_threads(2)
    t0 = time.time()
    p, lm, sel, beta, specs = trained_pairs(SEEDS)
    t_train = time.time() - t0
    scored = run_full_test(p, lm, list(specs.values()), progress=False)
    rows = [{"variant": "primary", "arm": arm, "k": 32, "seed": seed, "encode_mode": mode,
             "metrics": {m: v for m, v in scored[s.name]["metrics"][mode].items() if m in kl.METRICS}}
            for (arm, seed), s in specs.items() for mode in scored[s.name]["metrics"] if mode in ("plain", "g")]
    gains, inter = kl.evaluate_kl(claims.prereg_for(p), rows)
    mh = lm.info["model_hash"]
    secs = [io.read_json(sae_dir(p, specs["topk_kl", s], mh) / "train.json")["seconds"] for s in SEEDS]
    print(f"# every test context; k = 32, beta {beta}, lr {sel['lr']['topk']}, kl_frac {p.train.kl_frac}, "
          f"kl_coef {p.train.kl_coef}; seeds {list(SEEDS)}\n")
    print(kl.render_kl(gains, inter))
    print(f"# the two KL arms of a seed train in one loop: {', '.join(f'{x:.0f}' for x in secs)} s per seed "
          f"(beside other work on the same 2 cores); training here {t_train:.0f} s, wall time "
          f"{time.time() - t0:.0f} s; torch {torch.__version__}")


if __name__ == "__main__":
    main()
