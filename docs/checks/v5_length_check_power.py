"""PREREG v5's design check: how often the length check on 8 seeds says each outcome, simulated with study v4's
measured SD of the per-seed change (ledger.json, 16 seeds) and the registered rule (Bonferroni over C1's two tests,
margin 5 points). Run: python docs/checks/v5_length_check_power.py > docs/checks/v5_length_check_power.txt"""

from __future__ import annotations

import numpy as np

from gsae.analysis import decision, ledger

SD_V4 = {"delta_ce_all (plain)": 0.0294, "kl_all (plain)": 0.0119}  # study v4's length check, n = 16
MARGIN, ALPHA, FAMILY, N_SIMS = 0.05, 0.05, 2, 20000


def rates(true_change: float, sd: float, n_seeds: int, rng: np.random.Generator) -> dict[str, float]:
    out = dict.fromkeys(ledger.LENGTH_OUTCOMES[:3], 0)
    for _ in range(N_SIMS):
        iv = decision.paired_interval(true_change + sd * rng.standard_normal(n_seeds), ALPHA, FAMILY)
        out[ledger.length_outcome(iv.lower, iv.upper, MARGIN)] += 1
    return {k: v / N_SIMS for k, v in out.items()}


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"Length check, margin ±{100 * MARGIN:g} points, Bonferroni over {FAMILY} tests, {N_SIMS} draws per row")
    print("test | seeds | true change (points) | length-stable | length-dependent | undetermined")
    for test, sd in SD_V4.items():
        for n in (8, 16):
            for change in (0.0, 0.025, 0.05, 0.10):
                r = rates(change, sd, n, rng)
                print(f"{test} | {n} | {100 * change:+.1f} | {r['length-stable']:.3f} | {r['length-dependent']:.3f} "
                      f"| {r['undetermined']:.3f}")


if __name__ == "__main__":
    main()
