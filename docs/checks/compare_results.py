"""Compare two result directories number by number (what reproduces bit for bit between two runs).

    python docs/checks/compare_results.py results/default /path/to/other/clone/results/default

Reads metrics.jsonl (every metric of every SAE, split and encoder), runs.jsonl (each SAE's final training terms)
and the selection / convergence records, and prints how many values are identical, and for the others the largest
relative difference per metric. Exit status 0 when every shared value is identical.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path


def _metrics(d: Path) -> dict[tuple, dict[str, float]]:
    out = {}
    for line in (d / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[(r["sae"], r["split"], r["encode_mode"])] = r["metrics"]
    return out


def _final_terms(d: Path) -> dict[str, dict[str, float]]:
    out = {}
    for line in (d / "runs.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["event"] == "train_done":
            out[r["sae"]] = r["final_loss_terms"] | {"dead_fraction_train": r["dead_fraction_train"]}
    return out


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, float(obj)


def compare(name: str, a: dict, b: dict) -> bool:
    shared = sorted(set(a) & set(b), key=str)
    same = differ = 0
    worst: dict[str, float] = defaultdict(float)
    for key in shared:
        va, vb = dict(_flat(a[key])), dict(_flat(b[key]))
        for m in set(va) & set(vb):
            x, y = va[m], vb[m]
            if x == y or (math.isnan(x) and math.isnan(y)):
                same += 1
            else:
                differ += 1
                worst[m] = max(worst[m], abs(x - y) / max(abs(x), abs(y), 1e-300))
    print(f"{name}: {len(shared)} shared records ({len(a)} vs {len(b)}), {same:,} of {same + differ:,} values "
          f"identical")
    for m, rel in sorted(worst.items(), key=lambda kv: -kv[1])[:15]:
        print(f"    {m}: largest relative difference {rel:.3g}")
    return differ == 0


def main(a: Path, b: Path) -> int:
    ok = True
    if (a / "metrics.jsonl").exists() and (b / "metrics.jsonl").exists():
        ok &= compare("metrics.jsonl", _metrics(a), _metrics(b))
    if (a / "runs.jsonl").exists() and (b / "runs.jsonl").exists():
        ok &= compare("runs.jsonl final training terms", _final_terms(a), _final_terms(b))
    for f in ("selection.json", "convergence.json"):
        if (a / f).exists() and (b / f).exists():
            ja, jb = json.loads((a / f).read_text()), json.loads((b / f).read_text())
            ok &= compare(f, {"all": {k: v for k, v in ja.items() if k != "provenance"}},
                          {"all": {k: v for k, v in jb.items() if k != "provenance"}})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
