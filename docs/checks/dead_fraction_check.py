"""C2's window read once for every SAE (``evaluate.dead_fractions_over``) against the pass per SAE it replaced:
the same numbers, and how much faster. Needs the default profile's harvest and trained SAEs (after ./run_all.sh).

    python docs/checks/dead_fraction_check.py > docs/checks/dead_fraction_check.txt

Rounds alternate the two ways so that both see the same machine; ratio = per-SAE passes / one shared pass.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from gsae import paths, stages
from gsae.config import load_profile
from gsae.specs import load_trained
from gsae.stages.evaluate import dead_fractions_over, reader
from gsae.stages.selection import all_specs

NAMES = ["primary/topk-k32-s0", "primary/gsae-k32-s0", "primary/topk-k8-s1", "primary/gsae-k64-s1",
         "length_2/topk-k32-s3", "length_2/gsae-k32-s3"]


def per_sae_pass(sae, rd, mode: str, batch: int = 8192) -> float:
    """The code this replaced (gsae/stages/evaluate.py before 2026-12-03): one pass over the split per SAE."""
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for x, g in rd.batches(batch, seed=0, epochs=1, device=torch.device("cpu"),
                               gradient="g_free" if mode == "g_free" else "g"):
            enc = sae.encode(x, None if mode == "plain" else g)
            fired[enc.top_indices[enc.top_acts > 0]] = True
    return float((~fired).double().mean())


def main() -> None:
    p = load_profile("default")
    lm = stages.load_lm(p, progress=False)
    mh = lm.info["model_hash"]
    specs = {s.name: s for s in all_specs(p, lm)}
    chosen = [specs[n] for n in NAMES]
    encoders = {s.name: (load_trained(p, s, mh, torch.device("cpu")), s.primary_encode) for s in chosen}
    rd = reader(p, "train", mh)
    print(f"{len(chosen)} SAEs, C2's window: the train split, {rd.n_tokens:,} rows; torch threads "
          f"{torch.get_num_threads()}")
    old_t, new_t = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        old = {n: per_sae_pass(sae, rd, mode) for n, (sae, mode) in encoders.items()}
        old_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        new = dead_fractions_over(encoders, rd)
        new_t.append(time.perf_counter() - t0)
        print(f"round: per-SAE passes {old_t[-1]:.1f} s, one shared pass {new_t[-1]:.1f} s, "
              f"ratio {old_t[-1] / new_t[-1]:.2f}")
        assert new == old, (new, old)
    committed = {(r["sae"], r["encode_mode"]): r["metrics"].get("dead_fraction_trainsplit")
                 for r in map(json.loads, (paths.results_dir(p) / "metrics.jsonl").read_text().splitlines())
                 if r["split"] == "test"}
    for n in NAMES:
        was = committed.get((n, encoders[n][1]))
        print(f"{n}: dead_fraction_trainsplit {new[n]!r} (identical both ways; results/default/metrics.jsonl: "
              f"{was!r}, {'identical' if was == new[n] else 'DIFFERENT'})")
    print(f"median ratio {statistics.median(o / n for o, n in zip(old_t, new_t, strict=True)):.2f}")


if __name__ == "__main__":
    main()
