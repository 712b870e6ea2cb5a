"""Study v5's C1 decided again on a machine whose CPU kernels differ from the committed run's.

    PYTHONPATH=. python docs/checks/cross_isa_c1.py > docs/checks/cross_isa_c1_<isa>.txt

The committed study ran on AMD EPYC vCPUs where torch dispatches to AVX2 kernels; on a machine where it dispatches
to AVX-512 the LM's float sums round differently, so the harvest differs in its last bits and every SAE trained on
it differs (training is chaotic). This script does what a fresh clone there does for C1 -- reuses the committed
selection record, trains the primary SAEs at the primary k (16 seeds x 2 arms) on this machine's harvest, scores
them on all 400 test contexts (``full_test``) -- and applies PREREG v5's C1 tests (``gsae.analysis.ledger.run_test``) to
them, beside the committed ledger's numbers. C2-C4, the curve and the robustness rows are not rerun.
Needs the default profile's harvest on this machine; ≈ 35 min on 2 cores.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from gsae.analysis import ledger
from gsae.analysis.rows import index_rows
from gsae.config import load_profile
from gsae.paths import results_dir
from gsae.stages import load_lm
from gsae.stages.full_test import run_full_test
from gsae.stages.harvest import reader
from gsae.stages._jobs import train_specs
from gsae.stages.selection import all_specs


def main() -> int:
    p = load_profile("default")
    lm = load_lm(p, progress=False)
    mh = lm.info["model_hash"]
    specs = [s for s in all_specs(p, lm) if s.group == "primary" and s.k in p.experiment.primary_k]
    t0 = time.perf_counter()
    train_specs(p, lm, specs, reader(p, "train", mh), progress=False, by_seed=True)
    t_train = time.perf_counter() - t0
    ft = run_full_test(p, lm, specs, progress=False)
    t_full = time.perf_counter() - t0 - t_train
    rows = [{"variant": "primary", "arm": s.arm, "encode_mode": "plain", "k": s.k, "seed": s.seed,
             "metrics": ft[s.name]["metrics"]["plain"]} for s in specs]
    committed_rows = [json.loads(line) for line in (results_dir(p) / "metrics.jsonl").read_text().splitlines()]
    committed = {(r["arm"], r["k"], r["seed"]): r["metrics"] for r in committed_rows
                 if r["variant"] == "primary" and r["encode_mode"] == "plain" and r["split"] == "test"}
    prereg = ledger.load_prereg("prereg_v5.yaml")
    tests, primary_k = prereg["claims"]["C1"]["tests"], prereg["primary_k"]
    committed_c1 = next(c for c in json.loads((results_dir(p) / "ledger.json").read_text())["claims"]
                        if c["claim"] == "C1")
    ledger_c1 = committed_c1["primary"]
    selection_grad_scale = json.loads((results_dir(p) / "selection.json").read_text())["grad_scale"]
    grad_scale = reader(p, "train", mh).manifest["grad_stats"]["grad_scale"]
    print(f"this machine: torch cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; harvest grad_scale {grad_scale!r} "
          f"(committed selection record: {selection_grad_scale!r})")
    print(f"trained {len(specs)} SAEs in {t_train / 60:.1f} min, full_test {t_full / 60:.1f} min")
    for t in tests:
        diffs = [ft[s.name]["metrics"]["plain"][t["metric"]] / committed[s.arm, s.k, s.seed][t["metric"]] - 1
                 for s in specs]
        print(f"{t['metric']}: per SAE, this machine / committed - 1: median |.| {np.median(np.abs(diffs)):.2%}, "
              f"max |.| {np.max(np.abs(diffs)):.2%} over {len(diffs)} SAEs")
    index = index_rows(rows)
    verdicts = []
    for k in primary_k:
        for t in tests:
            r = ledger.run_test(index, t, k, "primary", float(prereg["alpha"]), len(tests) * len(primary_k))
            c = next(x for x in ledger_c1 if x["k"] == k and x["test"] == r.test)
            verdicts.append(r.verdict)
            print(f"C1 {r.test} at k = {k}, {r.n} seeds: {r.verdict}, gain {r.estimate:+.2%} "
                  f"[{r.lower:+.2%}, {r.upper:+.2%}], half-width {r.half_width_pct:.2f} % | committed: {c['verdict']}, "
                  f"{c['estimate']:+.2%} [{c['lower']:+.2%}, {c['upper']:+.2%}]")
    print(f"C1 on this machine: {ledger.combine(verdicts)} (committed: {committed_c1['verdict']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
