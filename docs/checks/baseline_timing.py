"""Wall time of the ablation baselines restarting at the hook's block (``evals.ablation_baselines``) against the
patched full forwards they replace (``prefix_splice_check.patched_baselines``), interleaved in one process.

    PYTHONPATH=. python docs/checks/baseline_timing.py > docs/checks/baseline_timing.txt

Default profile, the first 100 test contexts in batches of ``eval.batch_contexts``, 3 alternating rounds; the
ratio is of the medians. The numbers themselves are checked identical in ``prefix_splice_check.txt``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from prefix_splice_check import patched_baselines  # noqa: E402

from gsae import evals  # noqa: E402
from gsae.config import load_profile  # noqa: E402
from gsae.stages import evaluate, load_lm  # noqa: E402


def main() -> None:
    p = load_profile("default")
    lm = load_lm(p, progress=False)
    tokens = evaluate.eval_tokens(p, lm, "test", every_context=True)[0][:100]
    mean_act = evaluate.train_statistics(p, lm.info["model_hash"]).mean
    runs = {"restart at the hook's block": lambda: evals.ablation_baselines(
                lm.model, tokens, p.model.hook_name, mean_act=mean_act, batch_contexts=p.eval.batch_contexts,
                progress=False),
            "patched full forwards": lambda: patched_baselines(lm.model, tokens, p.model.hook_name, mean_act,
                                                               p.eval.batch_contexts)}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(3):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    new, old = (statistics.median(v) for v in seconds.values())
    print(f"torch cpu capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"{tokens.shape[0]} contexts x {tokens.shape[1]} tokens")
    for name, v in seconds.items():
        print(f"{name}: median {statistics.median(v):.1f} s ({', '.join(f'{s:.1f}' for s in v)})")
    print(f"ratio restart / patched: {new / old:.2f}")


if __name__ == "__main__":
    main()
