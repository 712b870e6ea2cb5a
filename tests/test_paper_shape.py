"""The paper profile's code path, end to end on the CPU, at the paper's shapes where they matter for memory and
dtypes: a GPT-2-small-shaped LM with random weights (12 blocks, d_model 768, vocabulary 50,257; layer 7), an
OpenWebText-shaped local corpus, expansion 32 (d_sae 24,576) and float16 storage. Only the amounts shrink (tokens,
context length 32 instead of 128, grid, evaluation sets), so every stage runs, through the claims table, in a
minute or two."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import yaml

from gsae import io, paths, report, stages
from gsae.config import load_profile
from gsae.models import wrap_model
from gsae.stages.harvest import reader
from gsae.stages.probe import write_latent_browser
from gsae.stages.train import all_specs
from gsae.standins import byte_tokenizer, random_gpt2, write_openwebtext_like

REPO = Path(__file__).resolve().parent.parent
SMALL = {
    "data": {"documents": 150, "ctx_len": 32},  # ~100 byte-level contexts per document; 2 documents each for val/test
    # 30 rows per context: 4 train contexts in 2 shards, 1 val, 2 test contexts.
    "harvest": {"tokens": {"train": 120, "val": 30, "test": 60}, "batch_contexts": 2, "shard_tokens": 60},
    "train": {"tokens": 128, "batch_size": 64, "checkpoint_every": 1000, "dead_tokens": 1000},
    "experiment": {"k_grid": [32], "seeds": [0], "beta_grid": [0.3]},
    "selection": {"lr_multipliers": [1.0]},
    "variants": {"k_grid": [], "seeds": []},
    "eval": {"batch_contexts": 2, "lm_contexts": 1},
    "steering": {"n_latents": 2, "n_contexts": 1, "alphas": [0.5], "top_tokens": 2},
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
    monkeypatch.setattr(report, "ROOT", tmp_path)
    p = load_profile(tmp_path / "profiles" / "paper_shape.yaml")
    assert (p.model.name, p.model.layer, p.experiment.expansion, p.harvest.dtype) == ("gpt2", 7, 32, "float16")
    lm = wrap_model(random_gpt2(seed=0), byte_tokenizer(), name="gpt2-shaped-random")

    for stage in stages.ORDER:  # contexts harvest train evaluate steer probe claims
        stages.run(stage, p, lm, progress=False)
    browser = write_latent_browser(p, lm, all_specs(p, lm), n_latents=2)
    seconds = time.perf_counter() - t0

    mh = lm.info["model_hash"]
    rd = reader(p, "train", mh)
    shard = io.load_tensors(rd.dir / rd.shards[0]["file"])
    assert shard["x"].dtype == shard["g"].dtype == torch.float16 and rd.d == 768 and rd.n_tokens == 120
    specs = all_specs(p, lm)
    assert {(s.arm, s.sae.d_sae) for s in specs} == {("topk", 24576), ("gsae", 24576)}
    rows = [json.loads(line) for line in (tmp_path / "results" / "paper_shape" / "metrics.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 4 and all(r["not_measured"] == ["probe_auc_genre", "probe_auc_pos"] for r in rows)
    assert all(k in rows[0]["metrics"] for k in ("delta_ce", "fvu", "dead_fraction", "steer_kl@0.5"))
    sens = (tmp_path / "results" / "paper_shape" / "SENSITIVITY.md").read_text()
    assert "not measured" in sens and "probe_auc_pos" in sens  # C4 on a corpus without POS tags
    assert "Latent" in browser.read_text()
    print(f"paper-shaped profile end to end on CPU: {seconds:.0f} s")
    assert seconds < 180
