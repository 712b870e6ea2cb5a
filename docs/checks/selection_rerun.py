"""Recompute the default profile's per-arm selection and convergence check -- the part of a run that
`./run_all.sh --reselect` adds to a fresh clone's `./run_all.sh` -- time it, and compare every value with the
committed records.

    PYTHONPATH=. python docs/checks/selection_rerun.py SCRATCH_DIR > docs/checks/selection_rerun.txt

Needs the default profile's harvest (`python -m gsae.pipeline harvest --profile default`) and no trained selection
SAEs in the cache (else their training is not timed). The committed `selection.json` and `convergence.json` are
moved aside for the run and always put back; the recomputed ones are left in SCRATCH_DIR.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compare_results import compare  # noqa: E402

from gsae.config import load_profile  # noqa: E402
from gsae.paths import results_dir  # noqa: E402
from gsae.stages import load_lm  # noqa: E402
from gsae.stages.selection import convergence  # noqa: E402
from gsae.stages.train import run_selection  # noqa: E402

NAMES = ("selection.json", "convergence.json")


def main(scratch: Path) -> int:
    p = load_profile("default")
    res = results_dir(p)
    scratch.mkdir(parents=True, exist_ok=True)
    aside = {n: scratch / f"{n}.committed" for n in NAMES}
    for n in NAMES:
        shutil.copy2(res / n, aside[n])
    try:
        for n in NAMES:
            (res / n).unlink()
        lm = load_lm(p, progress=False)
        t0 = time.perf_counter()
        run_selection(p, lm, progress=False)
        t_sel = time.perf_counter() - t0
        convergence(p, lm, progress=False)
        t_conv = time.perf_counter() - t0 - t_sel
        for n in NAMES:
            shutil.copy2(res / n, scratch / n)
    finally:
        for n in NAMES:
            shutil.copy2(aside[n], res / n)
    print(f"selection (16 lr trials and their validation splices): {t_sel / 60:.1f} min")
    print(f"convergence check (2 arms x 0.5 and 2 x the primary length): {t_conv / 60:.1f} min")
    print(f"together: {(t_sel + t_conv) / 60:.1f} min (wall, this process)")
    same = True
    for n in NAMES:
        a, b = (json.loads(f.read_text()) for f in (aside[n], scratch / n))
        a.pop("provenance", None)
        b.pop("provenance", None)
        same &= compare(n, {"all": a}, {"all": b})
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
