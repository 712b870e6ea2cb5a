"""gsae.tools.projection: the stage-by-stage work of a profile counted by hand, the OpenWebText budget check, the
dry run's disk refusal after its table, and a real (tiny-shape) cost measurement on this machine."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from gsae import pipeline
from gsae.config import ConfigError, load_profile
from gsae.tools import projection

COSTS = projection.StepCosts("cpu", harvest_s_per_token=1e-6, forward_s_per_token=2e-6,
                             sae_step_s={"topk": 1.0, "gsae": 2.0}, encode_s_per_row=1e-7, gpu_peak_bytes={})


def test_paper_work_counted_by_hand():
    p = load_profile("paper")
    stages = {s.name: s for s in projection.project(p, COSTS)}
    # 126 kept rows per 128-token context: 396,840 + 7,940 + 15,880 contexts forward + backward.
    assert stages["harvest"].seconds == pytest.approx((396_840 + 7_940 + 15_880) * 128 * 1e-6)
    # Study v3's protocol: per arm, 4 lr trials x 2 selection seeds at the primary length and the length curve at
    # 0.5x and 2x; the grid: k = 32 x 8 seeds, the other 4 k x 3 seeds, and length_2 (k = 32 x 8 seeds at 2x).
    per_arm, n_trials, n_grid = projection.count_saes(p)
    assert per_arm == {"topk": 8 + 2 + 8 + 12 + 8, "gsae": 8 + 2 + 8 + 12 + 8} and (n_trials, n_grid) == (20, 56)
    steps, half, double = 200_000_000 // 4096, 24_414, 97_656  # 2x: 97,656.25 batches, rounded
    assert stages["select"].seconds == pytest.approx((8 * steps + half + double) * (1.0 + 2.0))
    assert stages["select"].ranks == 16  # one round: every arm's lr trials on both selection seeds
    assert stages["train"].seconds == pytest.approx(20 * steps * (1.0 + 2.0) + 8 * double * (1.0 + 2.0))
    assert stages["train"].ranks == 8
    # The SAEs of one batch stream train together: seed 0 at the primary length has 5 k x 2 arms.
    assert projection.largest_stream_group(p) == 5 * 2
    # x and g in float16 (2 x 768 x 2 bytes) + 3 int64 row-index entries per row; 50 + 1 + 2 shards.
    rows = 50_001_840 + 1_000_440 + 2_000_880
    assert stages["harvest"].disk == projection.harvest_disk_bytes(p) == rows * (2 * 768 * 2 + 24) + 8192 * 53
    steer_rows = 1000 * 3 * 64
    assert stages["steer"].seconds == pytest.approx(32 * steer_rows * 128 * 2e-6)  # k = 32 only: 16 + 16 SAEs
    assert stages["probe"].seconds == pytest.approx(2 * 56 * 2_000_880 * 1e-7)
    # PREREG v4: the same 32 SAEs at k = 32 spliced on all 15,880 test contexts after one clean pass per context.
    assert stages["full_test"].seconds == pytest.approx(15_880 * 128 * (1e-6 + 32 * 2e-6))
    table = projection.format_projection(p, COSTS, list(stages.values()))
    assert any(line.startswith("train") and "76 SAEs in all" in line for line in table)
    # On 8 GPUs the harvest splits 50 ways, a selection round 8 ways and the grid 8 ways (one seed each).
    on_8 = sum(s.seconds / min(8, s.ranks) for s in stages.values())
    assert stages["harvest"].ranks == 50 and f"{on_8 / 3600:,.1f} h on 8" in table[-1]


def test_openwebtext_document_budget_is_checked_against_the_token_budget():
    p = load_profile("paper")
    notes = projection.openwebtext_budget(p)
    assert "250,000 documents" in notes[0] and "test" in notes[0]
    short = dataclasses.replace(p, data=dataclasses.replace(p.data, documents=100_000))
    # test split: 15,880 contexts / (0.01 x 1040 / 128 contexts per document) = 195,447 documents.
    need = math.ceil(15_880 / (0.01 * 1040 / 128))
    with pytest.raises(ConfigError, match=f"at least {need:,} \\(the test split binds\\)"):
        projection.openwebtext_budget(short)
    assert projection.openwebtext_budget(load_profile("smoke")) == []


def test_dry_run_shows_the_table_then_refuses_a_too_small_disk(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(projection, "measure_costs", lambda p, device: COSTS)
    shown = []
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda _: SimpleNamespace(free=10 * 2**30))
    with pytest.raises(ConfigError, match="not enough disk for the harvest: 152.8"):
        pipeline.check(load_profile("paper"), dry_run=True, emit=shown.append)
    assert any(line.startswith("harvest ") and "164.1 GB" in line for line in shown)
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda _: SimpleNamespace(free=10**12))
    notes = pipeline.check(load_profile("paper"), dry_run=True)
    assert any("configuration valid" in n for n in notes) and any(n.startswith("total") for n in notes)


def test_costs_are_measured_on_this_machine_at_a_small_shape():
    torch.manual_seed(0)
    p = load_profile("smoke")
    costs = projection.measure_costs(p, torch.device("cpu"))
    assert costs.device == "cpu" and costs.gpu_peak_bytes == {}
    values = [costs.harvest_s_per_token, costs.forward_s_per_token, costs.encode_s_per_row,
              *costs.sae_step_s.values()]
    assert all(math.isfinite(v) and v > 0 for v in values), costs
    assert set(costs.sae_step_s) == set(p.experiment.arms)


def test_the_dry_run_says_where_training_reads_the_train_split(monkeypatch):
    """The scale profile's train split by hand: 2,598,358 rows x (x and g at d 576 in float16 + 3 int64) = 6.05 GB;
    auto holds it on a GPU with twice that free, not on one with less, nor on the CPU."""
    import torch

    p = load_profile("scale")
    assert p.harvest.tokens["train"] * (2 * 576 * 2 + 3 * 8) == 6_048_977_424
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (80_000_000_000, 85_000_000_000))
    assert projection.train_data_line(p, gpu) == ("train split for SAE training: 6.0 GB as stored; runtime.train_data "
                                                  "auto: held in the device's memory (80.0 GB free on cuda:0 now)")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (12_000_000_000, 85_000_000_000))
    assert projection.train_data_line(p, gpu).endswith("auto: read from the disk cache (12.0 GB free on cuda:0 now)")
    assert projection.train_data_line(p, torch.device("cpu")).endswith("auto: read from the disk cache")


def test_a_held_train_split_counts_in_the_gpu_memory_of_selection_and_training(monkeypatch):
    import gsae.runtime

    p = load_profile("scale")
    costs = dataclasses.replace(COSTS, sae_step_s={"topk": 1.0, "gsae": 2.0, "topk_kl": 3.0})
    monkeypatch.setattr(projection, "measure_costs", lambda p, device: costs)
    monkeypatch.setattr(gsae.runtime, "resolve_device", lambda name: torch.device("cuda", 0))
    plain = {s.name: s.gpu for s in projection.project(p, costs)}
    for free, extra in [(80_000_000_000, 6_048_977_424), (10_000_000_000, 0)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 85_000_000_000))
        lines = projection.dry_run(p)
        rows = {line.split()[0]: line for line in lines[2:-2]}
        for stage, gpu in plain.items():
            shown = projection._gb(gpu + (extra if stage in ("select", "train") else 0))
            assert shown in rows[stage], (stage, shown, rows[stage])
        assert lines[-1].endswith("held in the device's memory (80.0 GB free on cuda:0 now)" if extra else
                                  "read from the disk cache (10.0 GB free on cuda:0 now)")
