"""gsae.tools.bench --quick runs end to end and writes well-formed JSON (speed itself is not asserted: a noisy
machine)."""

import json
import math
import re
from pathlib import Path

from gsae.tools import bench


def test_quick_bench_writes_well_formed_json(tmp_path, capsys):
    dest = tmp_path / "bench.json"
    bench.main(["--quick", "--threads", "1", "--json", str(dest)])  # 1 thread: quick even on busy cores
    res = json.loads(dest.read_text())
    train = res["train"]
    ratios = {k: v for k, v in train.items() if k.startswith(("ratio_", "cost_", "roofline_"))}
    assert set(ratios) >= {"ratio_ours_topk_vs_saelens", "ratio_ours_gsae_vs_saelens", "cost_gsae_over_topk",
                           "roofline_fraction_topk", "roofline_fraction_gsae", "ratio_ours_topk_vs_saelens_sparse",
                           "ratio_ours_vs_saelens_auxk_fwd_bwd"}
    assert all(math.isfinite(v) and v > 0 for v in ratios.values()), ratios
    assert all(v > 0 for v in train["tok_per_s_median"].values()) and train["dense_gemm_gflop_per_s_median"] > 0
    assert res["harvest"]["ratio_vs_fwd_bwd"] > 0 and res["harvest"]["ratio_vs_forward"] > 0
    assert set(res["peak_rss"]) == {"train_topk", "train_gsae", "train_saelens", "harvest"}
    assert all(r["peak_mb"] > 0 for r in res["peak_rss"].values())
    meta = res["meta"]
    assert len(meta["loadavg_start"]) == 3 and meta["threads"] >= 1 and meta["config"]["d_sae"] == bench.QUICK.d_sae
    assert "g-SAE step cost / TopK step cost" in capsys.readouterr().out  # the table was printed


def test_smoke_e2e_reports_a_missing_pipeline_gracefully(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "ROOT", tmp_path)  # a checkout without run_all.sh
    out = bench.smoke_e2e()
    assert out["ok"] is False and "run_all.sh" in out["error"]


def test_readme_table_reads_each_column_from_its_json():
    def res(threads, policy, topk_ratio, tok):
        return {"meta": {"threads": threads, "env": {"OMP_WAIT_POLICY": policy}},
                "train": {"ratio_ours_topk_vs_saelens": topk_ratio, "ratio_ours_gsae_vs_saelens": 1.5,
                          "cost_gsae_over_topk": 2.0, "tok_per_s_median": {"ours_topk": tok, "ours_gsae": tok / 2}},
                "harvest": {"ratio_vs_fwd_bwd": 1.234, "model": "m", "hook": "blocks.3.hook_resid_pre"}}

    table = bench.readme_table([res(2, None, 3.456, 8000.0), res(1, "PASSIVE", 2.0, 1234.4)]).splitlines()
    assert table[0] == "| ratio (goal) | 2 threads | 1 thread, `OMP_WAIT_POLICY=PASSIVE` |"
    assert table[2].endswith("| 3.46 | 2.00 |")
    assert table[5] == "| our TopK training, tokens/s (absolute) | 8,000 | 1,234 |"
    assert table[-1] == "| harvest / bare LM forward+backward (m, `blocks.3.hook_resid_pre`) | 1.23 | 1.23 |"


def test_performance_table_is_the_committed_bench_jsons():
    """docs/performance.md's table is rendered from results/bench/*.json (the command is quoted above the table)."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "docs" / "performance.md").read_text()
    block = readme.split("<!-- bench:start -->\n", 1)[1].split("\n<!-- bench:end -->", 1)[0]
    command = re.search(r"`python -m gsae\.tools\.bench --readme ([^`]+)`", readme).group(1).split()
    assert command, "the README names the JSONs its table comes from"
    assert block == bench.readme_table([json.loads((root / p).read_text()) for p in command])
