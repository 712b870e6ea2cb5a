"""SAE architectures ("arms") and their registry, in SAELens' pattern: one module per arm plus a registration.

An arm owns everything that differs between architectures: how its ``SAEConfig`` is made from the shared
settings and its own hyperparameters, how its module is built, its named loss terms, its sensitivity
variants, and its SAELens save / load. The training loop, the stages, the
evaluation, the figures and the claims ask the registry; nothing else compares an arm's name.

    from gsae import arms
    arm = arms.get("gsae")
    sae = arm.build(arm.make_config(d_in=576, d_sae=2304, k=32, beta=0.1), seed=0)

A new architecture: subclass ``Arm`` in ``gsae/arms/<name>.py``, call ``register(MyArm())`` at its bottom and
import it below (or, in a test, just call ``register``).
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

from torch import Tensor, nn

from ..config import SAEConfig, TrainConfig

ENCODER_LABELS = {"g": "g-encode", "g_free": "label-free g-encode", "plain": "plain-encode"}
"""How each encoder is named in figures and tables: "g" uses the true-label gradient, "g_free" the label-free
(argmax pseudo-label) gradient, "plain" none."""


class LossTerms(NamedTuple):
    total: Tensor
    """The scalar that is back-propagated."""
    terms: dict[str, Tensor]
    """Each named term before weighting (logged in the training history under its name)."""
    top_acts: Tensor
    """[N, k] the code's values (for firing statistics)."""
    top_indices: Tensor
    """[N, k] the code's latent indices."""


class Arm:
    """Base class of an SAE architecture. Subclasses set the class variables and override what differs."""

    name: ClassVar[str]
    """Registry key; also the ``arm`` field of every result row."""
    label: ClassVar[str]
    """Name in figures and tables."""
    color: ClassVar[str] = "#444444"
    """Colour in figures."""
    architecture: ClassVar[str]
    """SAELens architecture name written to cfg.json (must be registered with SAELens when it is not built in)."""
    hyperparameters: ClassVar[tuple[str, ...]] = ()
    """Names of the arm's own ``SAEConfig`` fields that are selected on validation (e.g. ("beta",))."""
    sensitivity_variants: ClassVar[dict[str, dict[str, Any]]] = {}
    """Variant name -> ``SAEConfig`` overrides, trained as sensitivity analyses of this arm."""
    has_gradient_encoder: ClassVar[bool] = False
    """True when the arm's code can use the gradient, so its g-encode and plain-encode are told apart."""
    gradient: ClassVar[str] = "g"
    """Which harvested gradient the arm trains on and encodes with: "g" (true next-token labels) or "g_free"
    (the label-free argmax pseudo-label, ``gsae.lm.label_free_ce``)."""

    # -------------------------------------------------------------------------------------------- config
    def make_config(self, **fields: Any) -> SAEConfig:
        """The ``SAEConfig`` of this arm (shared fields d_in, d_sae, k, grad_scale plus its own)."""
        return SAEConfig(**fields)

    def hyperparameter_grid(self, experiment: Any) -> dict[str, tuple[float, ...]]:
        """The validation grid of each of ``hyperparameters``, from the profile's experiment section."""
        return {}

    # -------------------------------------------------------------------------------------------- model
    def build(self, cfg: SAEConfig, seed: int | None = None) -> nn.Module:
        from ..sae import GSAE

        return GSAE(cfg, seed=seed)

    def loss(self, sae: nn.Module, x: Tensor, g: Tensor | None, dead_mask: Tensor | None, k_aux: int,
             train: TrainConfig) -> LossTerms:
        """Reconstruction FVU plus ``aux_coef`` x AuxK (Gao et al.), the loss of every TopK-style arm."""
        out = sae(x, g, dead_mask=dead_mask, k_aux=k_aux)
        return LossTerms(out.fvu + train.aux_coef * out.auxk_loss, {"fvu": out.fvu, "auxk": out.auxk_loss},
                         out.top_acts, out.top_indices)

    # -------------------------------------------------------------------------------------------- SAELens
    def to_saelens(self, sae: nn.Module, metadata: dict[str, Any] | None = None) -> Any:
        raise NotImplementedError

    def from_saelens(self, sl: Any) -> nn.Module:
        raise NotImplementedError

    def label_for(self, encode_mode: str) -> str:
        """Label of this arm's codes under one encoder ("g", "g_free" or "plain") in figures and tables."""
        if not self.has_gradient_encoder:
            return self.label
        return f"{self.label}, {ENCODER_LABELS.get(encode_mode, encode_mode)}"

    def encode_modes(self) -> tuple[str, ...]:
        """The encoders worth reporting separately: both for an arm whose code uses the gradient, else plain."""
        return ("g", "plain") if self.has_gradient_encoder else ("plain",)


_REGISTRY: dict[str, Arm] = {}


def register(arm: Arm) -> Arm:
    """Add ``arm`` (re-registering the same name replaces it: notebooks re-run cells)."""
    if not getattr(arm, "name", None) or not getattr(arm, "architecture", None):
        raise ValueError(f"{type(arm).__name__} must set the class variables 'name' and 'architecture'")
    _REGISTRY[arm.name] = arm
    return arm


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> Arm:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown arm {name!r}; registered arms: {sorted(_REGISTRY)}") from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def by_architecture(architecture: str) -> Arm:
    """The arm that saves SAELens architecture ``architecture``."""
    for arm in _REGISTRY.values():
        if arm.architecture == architecture:
            return arm
    raise KeyError(f"no registered arm saves SAELens architecture {architecture!r}; "
                   f"known: {sorted(a.architecture for a in _REGISTRY.values())}")


from . import gsae, topk  # noqa: E402,F401  (registers the built-in arms)
