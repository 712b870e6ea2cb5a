"""The GPU check (python -m gsae.tools.gpu_check): its code runs on the CPU at a tiny shape (--cpu-dry), a failed
check sets the exit status, and without CUDA it says so and exits 0."""

from __future__ import annotations

import json

import torch

from gsae.tools import gpu_check


def test_cpu_dry_run_passes_every_check_and_writes_json(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.cli(["--cpu-dry", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["check"] for r in res["results"]] == ["placement", "storage", "held", "speed", "agreement",
                                                       "splice"]
    assert all(r["ok"] for r in res["results"]) and res["device"] == "cpu"
    text = capsys.readouterr().out
    assert "PASS  storage: float16: rel. error" in text and "projection for profile smoke on cpu" in text
    assert any(line.startswith("total") for line in res["projection"])


def test_a_failed_check_fails_the_run(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "_rel", lambda a, b: 1.0)  # every comparison "differs"
    assert gpu_check.main(cpu_dry=True) == 1
    assert "FAIL  storage" in capsys.readouterr().out


def test_without_cuda_it_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main() == 0
    assert "no CUDA device" in capsys.readouterr().out
