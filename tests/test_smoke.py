"""End to end: ./run_all.sh --profile smoke through papermill, then sanity checks on what it produced.

This is the slowest test (a few minutes: the tiny LM trains once, then is cached under runs/_cache)."""

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gsae.config import load_profile

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "smoke"


@pytest.fixture(scope="module")
def smoke_run():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run(["./run_all.sh", "--profile", "smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1500)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out


@pytest.mark.slow
def test_smoke_profile_runs_end_to_end_and_results_are_sane(smoke_run):
    for nb in sorted((ROOT / "notebooks").glob("0*.ipynb")):
        assert (ROOT / "runs" / "smoke" / "notebooks" / nb.name).exists(), nb.name
        # A committed notebook is either a source (no outputs at all) or a whole execution of the default profile
        # (every code cell ran, none failed): never some cells' outputs beside other cells' new code.
        source = json.loads(nb.read_text())
        code = [c for c in source["cells"] if c["cell_type"] == "code"]
        if any(c.get("outputs") for c in code):
            assert all(c.get("execution_count") for c in code), f"{nb.name}: only partly executed"
            assert not [o for c in code for o in c["outputs"] if o["output_type"] == "error"], nb.name
            assert any('profile = "default"' in "".join(c["source"]) for c in code
                       if "injected-parameters" in c.get("metadata", {}).get("tags", [])), nb.name
    rows = [json.loads(line) for line in (RESULTS / "metrics.jsonl").read_text().splitlines()]
    assert rows, "no metrics"
    exp = load_profile("smoke").experiment
    primary = [r for r in rows if r["variant"] == "primary"]
    assert {r["arm"] for r in primary} == set(exp.arms)
    for r in rows:
        for key, v in r["metrics"].items():
            assert math.isfinite(v), (r["variant"], r["arm"], r["k"], key, v)
        m = r["metrics"]
        assert 0 <= m["dead_fraction"] <= 1 and 0 <= m["fvu"] < 2
        assert m["l0"] <= r["k"] + 1e-6
        assert m["kl"] >= 0 and m["ce_spliced"] > 0
    # More latents per token reconstruct better: TopK's mean delta_ce over seeds shrinks from the smallest k
    # to the largest (the direction, not a number, is what a working pipeline must get right).
    def mean_delta(k):
        vals = [r["metrics"]["delta_ce"] for r in primary if r["arm"] == "topk" and r["k"] == k
                and r["encode_mode"] == "plain"]
        return sum(vals) / len(vals)

    ks = sorted({r["k"] for r in primary})
    assert mean_delta(ks[-1]) < mean_delta(ks[0])
    assert all(0 < r["metrics"]["recovered_zero"] <= 1.0001 for r in primary if r["arm"] == "topk")
    sel = json.loads((RESULTS / "selection.json").read_text())  # per-arm lr on the selection seed (PREREG §3)
    assert sel["protocol"] == "per_arm" and set(sel["lr"]) == set(exp.arms) and min(sel["lr"].values()) > 0
    conv = json.loads((RESULTS / "convergence.json").read_text())
    assert set(conv["curves"]) == set(exp.arms) and all(len(c) == 2 for c in conv["curves"].values())
    ledger = json.loads((RESULTS / "ledger.json").read_text())
    assert {c["claim"] for c in ledger["claims"]} == {"C1", "C1g", "C2", "C3", "C4"}
    beta_sel = json.loads((RESULTS / "beta_selection.json").read_text())  # the beta of the dose grid (PREREG v6 §3)
    chosen = beta_sel["arms"]["gsae"]["beta"]
    assert {b["beta"] for b in beta_sel["arms"]["gsae"]["betas"]} >= set(exp.beta_grid) and chosen > 0
    dose = ledger["dose"]  # TopK, then every beta on the same seeds, the chosen one marked
    assert dose[0]["beta"] == 0 and [d["beta"] for d in dose if d["chosen"]] == [chosen]
    assert len(dose) == 1 + len(beta_sel["arms"]["gsae"]["betas"]) and len({tuple(d["seeds"]) for d in dose}) == 1
    assert all(len(d["tests"]) == 4 for d in dose[1:])  # C1 and C1g, two tests each
    lengths = ledger["length_check"]  # PREREG §5 on the smoke profile's length_2 group, every primary seed
    assert [c["test"] for c in lengths] == ["delta_ce_all (plain)", "kl_all (plain)"]  # on every test context
    assert all(c["n"] == len(exp.seeds) and c["outcome"] != "not tested" for c in lengths), lengths
    assert all(c["robustness"].keys() == {"threads_1", "length_2"} for c in ledger["claims"])
    prov = json.loads((RESULTS / "provenance.json").read_text())
    assert prov["git"]["commit"] and prov["data"]["split_hash"] and prov["packages"]["torch"].startswith("2.13")
    figures = ("lm_ce_by_position.png", "harvest_norms.png", "selection.png", "convergence.png",
               "training_curves.png", "fidelity_delta_ce_kl.png", "dose_response.png",
               "paired_c1_all_contexts.png", "paired_c1g_all_contexts.png", "length_check.png", "fvu_dead.png",
               "latent_frequency.png",
               "steering_kl.png", "steering_logprob.png", "probing.png", "headline.png")
    for fig in figures:
        assert (RESULTS / "figures" / fig).stat().st_size > 1000, fig
    assert set(figures) <= set(json.loads((RESULTS / "figures" / "provenance.json").read_text()))
    k, seed = exp.primary_k[0], exp.seeds[0]
    for arm in ("topk", "gsae"):  # notebook 05: a dashboard page and a released SAE per arm
        page = (RESULTS / "dashboards" / f"{arm}-k{k}-s{seed}.html").read_text()
        assert page.count('<section class="latent"') >= 64, arm
        if shutil.which("chromium"):
            assert (RESULTS / "figures" / f"dashboard_{arm}-k{k}-s{seed}.png").stat().st_size > 10_000, arm
        cfg = json.loads((ROOT / "saes" / "smoke" / f"{arm}-k{k}-s{seed}" / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_pre" and cfg["metadata"]["release"]
    assert json.loads((ROOT / "saes" / "smoke" / "release.json").read_text())["test_rows"] > 0
    base = json.loads((RESULTS / "probe_baselines.json").read_text())  # notebook 05's reference points for C4
    assert 0.5 < base["residual"]["probe_auc_pos_heldout"] <= 1
    assert set(base["random_init"]) == {str(k) for k in exp.k_grid}
    registry = (RESULTS / "runs.jsonl").read_text().splitlines()
    assert any('"train_done"' in line for line in registry)


@pytest.mark.slow
def test_every_figure_is_followed_by_its_result_and_the_terminal_stays_clean(smoke_run):
    """Each executed notebook shows a Result sentence right under every figure (the numbers come from gsae, not the
    notebook); tables say "—" rather than nan; the terminal gets no kernel warning and no housekeeping line per
    notebook, and the run ends with the summary."""
    for path in sorted((ROOT / "runs" / "smoke" / "notebooks").glob("0*.ipynb")):
        nb = json.loads(path.read_text())
        outputs = [o for c in nb["cells"] for o in c.get("outputs", [])]
        assert not [o for o in outputs if o["output_type"] == "error"], path.name
        for i, o in enumerate(outputs):
            if "image/png" in o.get("data", {}):
                after = "".join(outputs[i + 1].get("data", {}).get("text/markdown", "")) if i + 1 < len(outputs) else ""
                assert after.startswith("**Result:**"), (path.name, i)
            for mime in ("text/markdown", "text/html"):
                text = "".join(o.get("data", {}).get(mime, ""))
                assert ">NaN<" not in text and " nan " not in text, (path.name, mime, text[:300])
    terminal = smoke_run.stdout + smoke_run.stderr
    assert "without encryption" not in terminal and "tidied" not in terminal
    tail = smoke_run.stdout.strip().splitlines()[-10:]
    assert any(line.startswith("smoke profile: this run checks") for line in tail), tail
    assert tail[-1].startswith("released SAEs: saes/smoke/")


@pytest.mark.slow
def test_full_test_scores_every_test_context_like_a_hand_written_splice(smoke_run):
    """C1's metrics: delta_ce_all / kl_all of a primary-k SAE equal a splice written here with a TransformerLens hook
    on a full forward, over every harvested test context (position 0 and massive positions clean, the last position
    unscored), in float64."""
    import torch

    from gsae import stages
    from gsae.specs import load_trained
    from gsae.stages import evaluate, full_test
    from gsae.stages.contexts import contexts
    from gsae.stages.harvest import reader
    from gsae.stages.selection import all_specs

    p = load_profile("smoke")
    lm = stages.load_lm(p, progress=False)
    mh = lm.info["model_hash"]
    chosen = full_test.c1_specs(p, all_specs(p, lm))
    assert {s.group for s in chosen if not s.group.startswith("beta_")} == {"primary", "threads_1", "length_2"}
    assert {s.k for s in chosen} == set(p.experiment.primary_k)
    spec = next(s for s in chosen if s.arm == "gsae" and s.group == "primary")
    stored = full_test.run_full_test(p, lm, [spec])[spec.name]["metrics"]["plain"]  # the run's cached file
    n_ctx = reader(p, "test", mh).manifest["n_contexts"]
    assert n_ctx > p.eval.lm_contexts  # else this would check nothing the evaluate stage does not
    tokens = contexts(p, lm.tokenizer, mh)["test"].tokens[:n_ctx]
    sae = load_trained(p, spec, mh)
    cap = evaluate.MASSIVE_NORM_FACTOR * evaluate.train_statistics(p, mh).median_norm

    def splice(act, hook):
        x = act[:, 1:]
        enc = sae.encode(x)  # plain-encode: no gradient
        x_hat = sae.decode(enc.top_acts, enc.top_indices)
        return torch.cat([act[:, :1], torch.where(x.norm(dim=-1, keepdim=True) > cap, x, x_hat)], dim=1)

    with torch.no_grad():
        clean = lm.model(tokens, return_type="logits", padding_side="right")
        spliced = lm.model.run_with_hooks(tokens, return_type="logits", padding_side="right",
                                          fwd_hooks=[(p.model.hook_name, splice)])
    lp_clean, lp_spliced = (t[:, 1:-1].double().log_softmax(-1) for t in (clean, spliced))
    target = tokens[:, 2:, None]
    delta_ce = (lp_clean.gather(-1, target) - lp_spliced.gather(-1, target)).mean()
    kl = (lp_clean.exp() * (lp_clean - lp_spliced)).sum(-1).mean()
    assert stored["n_lm_tokens_all"] == n_ctx * (tokens.shape[1] - 2)
    assert stored["delta_ce_all"] == pytest.approx(float(delta_ce), abs=2e-5)
    assert stored["kl_all"] == pytest.approx(float(kl), abs=2e-5)


@pytest.mark.slow
def test_full_test_scores_the_gradient_encoders_as_the_evaluate_stage_does(smoke_run):
    """C1 as the paper defines it (``eval.full_test_encoders`` with "g": labels at inference) on every test context:
    each encoder's numbers equal the evaluate stage's when that stage also reads every context, and the plain-encode
    numbers equal the run's, so adding an encoder changes nothing else."""
    import dataclasses

    from gsae import stages
    from gsae.stages import evaluate, full_test
    from gsae.stages.selection import all_specs

    p = load_profile("smoke")
    both = dataclasses.replace(p, eval=dataclasses.replace(p.eval, full_test_encoders=("plain", "g"),
                                                           lm_contexts=10**9))
    lm = stages.load_lm(p, progress=False)
    specs = all_specs(p, lm)
    spec = next(s for s in full_test.c1_specs(p, specs) if s.arm == "gsae" and s.group == "primary")
    topk = next(s for s in full_test.c1_specs(p, specs) if s.arm == "topk" and s.group == "primary")
    run = full_test.run_full_test(p, lm, [spec])[spec.name]["metrics"]
    new = full_test.run_full_test(both, lm, [spec, topk], progress=False)
    ev = evaluate.evaluate_specs(both, lm, [spec], "test", progress=False)[spec.name]["metrics"]
    got = new[spec.name]["metrics"]
    assert set(got) == {"plain", "g"} and got["plain"] == run["plain"]
    assert got["g"]["delta_ce_all"] != got["plain"]["delta_ce_all"]  # the gradient changes the selection
    for mode in ("plain", "g"):
        assert got[mode]["delta_ce_all"] == pytest.approx(ev[mode]["delta_ce"], rel=1e-9)
        assert got[mode]["kl_all"] == pytest.approx(ev[mode]["kl"], rel=1e-9)
    assert set(new[topk.name]["metrics"]) == {"plain", "g", "g_free"}  # TopK's code ignores g: one splice, all names


@pytest.mark.slow
def test_the_tiny_lm_the_smoke_run_trained_beats_unigram(smoke_run):
    """The tiny LM (trained once per checkout by the smoke run on the real corpus, then cached) predicts held-out
    text far better than the unigram distribution: the pipeline measures a model that learned something."""
    from gsae import stages

    info = stages.load_lm(load_profile("smoke"), progress=False).info  # from the cache the smoke run filled
    print({k: info[k] for k in ("val_ce", "unigram_ce_val", "unigram_entropy_train", "train_seconds")})
    assert info["val_ce"] < info["unigram_ce_val"] - 1.0


@pytest.mark.slow
def test_a_stage_rerun_resumes_instead_of_recomputing(smoke_run):
    """Every SAE is complete, so rerunning the train and claims stages (as the CLI does) trains nothing and
    rewrites metrics.jsonl with the same bytes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "GSAE_PROGRESS": "0"}
    before = (RESULTS / "runs.jsonl").read_text().count('"train_start"')
    metrics_before = (RESULTS / "metrics.jsonl").read_bytes()
    for stage in ("train", "claims"):
        out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "gsae.pipeline", stage, "--profile",
                              "smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    assert (RESULTS / "runs.jsonl").read_text().count('"train_start"') == before  # nothing retrained
    assert (RESULTS / "metrics.jsonl").read_bytes() == metrics_before
