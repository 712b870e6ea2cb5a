"""gsae.bench --quick runs end to end and writes well-formed JSON (speed itself is not asserted: noisy machine)."""

import json
import math

from gsae import bench


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
