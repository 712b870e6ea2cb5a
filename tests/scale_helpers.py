"""Shared by the multi-process tests: a tiny offline setup for the real pipeline CLI, run in-process or under torchrun.

As a script (what torchrun launches):  python tests/scale_helpers.py ROOT PROFILE_YAML STAGE
  ROOT           where runs/ and results/ go (``gsae.paths.ROOT`` is pointed there)
  PROFILE_YAML   the profile (``write_profile``)
  STAGE          a pipeline command (harvest, train, ...)
Environment: GSAE_TEST_SLOW=<seconds> sleeps before every LM capture (so a test can kill a rank mid-harvest);
every rank writes its pid to ROOT/pid_rank<RANK>.

The LM is a 2-block random HookedTransformer over the byte tokenizer (``gsae.tools.standins``), on the CPU, patched in
for ``gsae.models.load_model``; the corpus is OpenWebText-shaped local text (``data.source``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID")

PROFILE = {
    "model": {"name": "gpt2", "layer": 1, "hook": "resid_pre"},  # the name only: load_model is patched
    "data": {"corpus": "openwebtext", "ctx_len": 16, "split_fracs": [0.8, 0.1, 0.1], "split_seed": 0,
             "documents": 60},
    # 14 rows per context; 10 contexts (140 rows) per shard: train 10 shards, val and test 2 each.
    "harvest": {"tokens": {"train": 1400, "val": 280, "test": 280}, "batch_contexts": 4, "shard_tokens": 140,
                "dtype": "float16", "exclude_pos0": True},
    "train": {"tokens": 512, "batch_size": 128, "lr": 0.004, "warmup_frac": 0.1, "decay_frac": 0.2,
              "aux_coef": 0.03125, "dead_tokens": 256, "seed": 0, "checkpoint_every": 2},
    "experiment": {"expansion": 2, "k_grid": [4, 8], "seeds": [0, 1, 2], "beta_grid": [0.3, 1.0],
                   "beta_select_k": 4},
    "selection": {"lr_multipliers": [1.0, 2.0], "seeds": [100], "max_extensions": 0},
    "variants": {"k_grid": [4], "seeds": [0]},
    "eval": {"batch_contexts": 8, "lm_contexts": 10},
    "steering": {"n_latents": 4, "n_contexts": 2, "alphas": [0.5], "top_tokens": 3},
    "probing": {"min_tag_count": 10, "max_tags": 4},
    "runtime": {"device": "cpu"},
}


def write_profile(tmp: Path, name: str = "scale", **sections: dict) -> Path:
    """A profile YAML in ``tmp`` (with its own local corpus), ``sections`` overriding ``PROFILE``'s."""
    from gsae.tools.standins import write_openwebtext_like

    corpus = write_openwebtext_like(tmp / "owt.jsonl", n_docs=60, seed=0, mean_words=60)
    raw = {k: dict(v) for k, v in PROFILE.items()}
    raw["data"]["source"] = str(corpus)
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tiny_lm():
    """The test LM (deterministic: seeded init on the CPU)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from gsae.models import wrap_model
    from gsae.tools.standins import byte_tokenizer

    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64,
                                                      d_vocab=257, n_ctx=32, act_fn="gelu", normalization_type="LN",
                                                      seed=0, device="cpu"))
    return wrap_model(model, byte_tokenizer(), name="tiny-random")


def use_test_setup(root: Path) -> None:
    """Point gsae's outputs at ``root`` and its LM at ``tiny_lm`` (in this process)."""
    import gsae.models
    import gsae.paths

    gsae.paths.ROOT = Path(root)
    gsae.models.load_model = lambda *a, **k: tiny_lm()


def run_stage(root: Path, profile: Path, stage: str) -> int:
    """``python -m gsae.pipeline STAGE --profile PROFILE`` in this process, with the test setup, one thread."""
    import torch

    from gsae import pipeline

    torch.set_num_threads(1)
    use_test_setup(root)
    return pipeline.main([stage, "--profile", str(profile)])


def sae_hashes(root: Path) -> dict[str, str]:
    """sha256 of every trained SAE's weights under ``root``, by its spec name (group/arm-k-seed[-label])."""
    from gsae.io import sha256_file

    (top,) = (root / "runs" / "scale" / "saes").iterdir()
    return {str(p.parent.parent.relative_to(top)): sha256_file(p) for p in sorted(top.rglob("sae_weights.safetensors"))}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(root: Path, profile: Path, stage: str, nproc: int = 2, env: dict | None = None) -> subprocess.Popen:
    """torchrun --nproc_per_node=NPROC of this script (gloo, 1 thread per rank), in its own session."""
    full = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    full.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, str(root), str(profile), stage]
    return subprocess.Popen(cmd, cwd=REPO, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 150) -> tuple[int, str]:
    """Wait for a launch; on a timeout kill its whole session (torchrun and its workers)."""
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        return -9, f"timed out after {timeout} s\n{log}"
    return proc.returncode, log


def _main(root: str, profile: str, stage: str) -> int:
    import torch

    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    (root_path / f"pid_rank{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
    slow = float(os.environ.get("GSAE_TEST_SLOW", "0"))
    if slow:
        import gsae.harvest

        real = gsae.harvest.capture

        def slow_capture(*args, **kwargs):
            time.sleep(slow)
            return real(*args, **kwargs)

        gsae.harvest.capture = slow_capture
    torch.set_num_threads(1)
    return run_stage(root_path, Path(profile), stage)


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:4]))
