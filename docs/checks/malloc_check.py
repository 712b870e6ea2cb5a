"""Does keeping freed memory in glibc's heap (run_all.sh's MALLOC_* settings) speed up the splice evaluation, and
does it change any number? The settings act when a process starts, so each configuration runs in its own child
process; children alternate (default, heap, default, heap, ...) on the same machine and the report gives the median
ratio over rounds, never an absolute time. Each child evaluates one primary SAE (plain-encode, massive positions
clean) on the first 25 test contexts, three times, with ``gsae.evals.evaluate_saes``, and prints its numbers.
Run from the repository root after the default profile's caches exist:
    python docs/checks/malloc_check.py > docs/checks/malloc_check.txt
"""
import json
import os
import statistics
import subprocess
import sys
import time

HEAP = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
        "MALLOC_TOP_PAD_": "1073741824"}
ROUNDS, REPS, N_CTX = 3, 3, 25


def child() -> None:
    from gsae import evals
    from gsae.config import load_profile
    from gsae.specs import load_trained
    from gsae.stages import load_lm
    from gsae.stages.evaluate import eval_context
    from gsae.stages.selection import all_specs

    p = load_profile("default")
    lm = load_lm(p, progress=False)
    spec = next(s for s in all_specs(p, lm) if s.group == "primary" and s.k == 32 and s.arm == "gsae")
    tokens, base, _, cap = eval_context(p, lm, "test")
    tokens = tokens[:N_CTX]
    base = evals.ablation_baselines(lm.model, tokens, p.model.hook_name, exclude_pos0=True, batch_contexts=N_CTX,
                                    progress=False)
    sae = {spec.name: load_trained(p, spec, lm.info["model_hash"])}
    seconds, res = [], None
    for _ in range(REPS):
        t0 = time.perf_counter()
        res = evals.evaluate_saes(lm.model, sae, tokens, p.model.hook_name, baselines=base, encode_modes=("plain",),
                                  batch_contexts=N_CTX, clean_above=cap, progress=False)[spec.name]["plain"]
        seconds.append(time.perf_counter() - t0)
    print(json.dumps({"seconds": seconds, "delta_ce": res.delta_ce, "kl": res.kl, "sae": spec.name}))


def main() -> None:
    base_env = {k: v for k, v in os.environ.items() if k not in HEAP}
    runs: dict[str, list[dict]] = {"default": [], "heap": []}
    for _ in range(ROUNDS):
        for name, env in (("default", base_env), ("heap", {**base_env, **HEAP})):
            out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
                                 check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    ratios = [statistics.median(d["seconds"]) / statistics.median(h["seconds"])
              for d, h in zip(runs["default"], runs["heap"], strict=True)]
    same = all(r["delta_ce"] == runs["default"][0]["delta_ce"] and r["kl"] == runs["default"][0]["kl"]
               for rs in runs.values() for r in rs)
    print(f"SAE {runs['default'][0]['sae']}, {N_CTX} test contexts, {REPS} evaluations per process, {ROUNDS} rounds")
    print(f"settings: {' '.join(f'{k}={v}' for k, v in HEAP.items())}")
    print(f"time with glibc's defaults / time with the settings, per round: {', '.join(f'{r:.2f}' for r in ratios)}"
          f"; median {statistics.median(ratios):.2f}")
    print(f"delta_ce and kl identical in every process (bit for bit): {same}")


if __name__ == "__main__":
    child() if "--child" in sys.argv else main()
