"""The paper profile's code path, end to end on the CPU, at the paper's shapes where they matter for memory and
dtypes: a GPT-2-small-shaped LM with random weights (12 blocks, d_model 768, vocabulary 50,257; layer 7), an
OpenWebText-shaped local corpus, expansion 32 (d_sae 24,576) and float16 storage. Only the amounts shrink (tokens,
context length 32 instead of 128, grid, evaluation sets), so every stage runs, through the claims ledger, in a
few minutes."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import yaml

from gsae import io, paths, stages
from gsae.config import load_profile
from gsae.models import wrap_model
from gsae.stages.harvest import reader
from gsae.stages.probe import write_latent_browser
from gsae.stages.selection import all_specs
from gsae.tools.standins import byte_tokenizer, random_gpt2, write_openwebtext_like

REPO = Path(__file__).resolve().parent.parent
SMALL = {
    "data": {"documents": 150, "ctx_len": 32},  # ~100 byte-level contexts per document; 2 documents each for val/test
    # 30 rows per context: 4 train contexts in 2 shards, 1 val, 2 test contexts.
    "harvest": {"tokens": {"train": 120, "val": 30, "test": 60}, "batch_contexts": 2, "shard_tokens": 60},
    "train": {"tokens": 128, "batch_size": 64, "checkpoint_every": 1000, "dead_tokens": 1000},
    "experiment": {"k_grid": [32], "primary_k": [32], "seeds": [0, 1], "curve_seeds": [0], "beta_grid": [0.1]},
    "selection": {"lr_multipliers": [1.0], "seeds": [100], "max_extensions": 0, "length_multipliers": []},
    "variants": {"k_grid": [], "seeds": [], "length_multiplier": 2.0},
    "eval": {"batch_contexts": 2, "lm_contexts": 1},
    "steering": {"n_latents": 2, "n_contexts": 1, "alphas": [0.1], "top_tokens": 2},  # C3's registered alpha
    "runtime": {"device": "cpu"},
}


def test_paper_profile_code_path_runs_end_to_end_on_cpu(tmp_path, monkeypatch):
    t0 = time.perf_counter()
    raw = yaml.safe_load((REPO / "profiles" / "paper.yaml").read_text())
    for section, values in SMALL.items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["data"]["source"] = str(write_openwebtext_like(tmp_path / "owt.jsonl", n_docs=150, seed=0))
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "paper_shape.yaml").write_text(yaml.safe_dump(raw))
    shutil.copy(REPO / "prereg.yaml", tmp_path / "prereg.yaml")
    monkeypatch.setattr(paths, "ROOT", tmp_path)
    p = load_profile(tmp_path / "profiles" / "paper_shape.yaml")
    assert (p.model.name, p.model.layer, p.experiment.expansion, p.harvest.dtype) == ("gpt2", 7, 32, "float16")
    lm = wrap_model(random_gpt2(seed=0), byte_tokenizer(), name="gpt2-shaped-random")

    for stage in stages.ORDER:  # contexts harvest train evaluate full_test steer probe claims
        stages.run(stage, p, lm, progress=False)
    browser = write_latent_browser(p, lm, all_specs(p, lm), n_latents=2)
    seconds = time.perf_counter() - t0

    mh = lm.info["model_hash"]
    rd = reader(p, "train", mh)
    shard = io.load_tensors(rd.dir / rd.shards[0]["file"])
    assert shard["x"].dtype == shard["g"].dtype == torch.float16 and rd.d == 768 and rd.n_tokens == 120
    specs = all_specs(p, lm)
    assert {(s.arm, s.sae.d_sae) for s in specs} == {("topk", 24576), ("gsae", 24576)}
    assert {s.group for s in specs} == {"primary", "length_2"}  # the registered protocol, with its length check
    rows = [json.loads(line) for line in (tmp_path / "results" / "paper_shape" / "metrics.jsonl").read_text()
            .splitlines()]
    assert {(r["variant"], r["seed"]) for r in rows} == {(v, s) for v in ("primary", "length_2") for s in (0, 1)}
    assert all("probe_auc_pos" in r["not_measured"] for r in rows)  # C4 on a corpus without POS tags
    assert all(k in r["metrics"] for r in rows for k in ("fvu", "dead_fraction"))
    assert all(k in r["metrics"] for r in rows if r["encode_mode"] == "plain" for k in ("delta_ce", "kl"))
    assert any("steer_kl_ratio@0.1" in r["metrics"] for r in rows)
    led = json.loads((tmp_path / "results" / "paper_shape" / "ledger.json").read_text())
    assert {c["claim"] for c in led["claims"]} == {"C1", "C1g", "C2", "C3", "C4"} and len(led["length_check"]) == 2
    assert "Latent" in browser.read_text()
    print(f"paper-shaped profile end to end on CPU: {seconds:.0f} s")
