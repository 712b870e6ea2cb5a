"""The arm registry: the ``Arm`` base class and ``register`` / ``get`` / ``by_architecture``.

Kept apart from ``gsae/arms/__init__.py`` so that the arm modules (``topk``, ``gsae``) import it without importing
the package that imports them: the static import graph has no cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    """Registry key; also the ``arm`` field of every result row and of a saved SAE's SAELens metadata."""
    label: ClassVar[str]
    """Name in figures and tables."""
    color: ClassVar[str] = "#444444"
    """Colour in figures."""
    architecture: ClassVar[str]
    """SAELens architecture name written to cfg.json (must be registered with SAELens when it is not built in).
    Several arms may save the same architecture (the g-SAE saves SAELens' own "topk"): the ``arm`` entry of the
    cfg.json metadata then tells them apart (``by_architecture``)."""
    legacy_architectures: ClassVar[tuple[str, ...]] = ()
    """Architecture names this arm wrote in earlier versions and still loads (e.g. the g-SAE's "gtopk")."""
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

    def upgrade_cfg(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """A cfg.json dict this arm wrote in a legacy format (``legacy_architectures``) as its current format;
        any other is returned as it is."""
        return cfg

    def saelens_view(self, sl: Any) -> Any:
        """The SAELens SAE ``sl`` as users get it from ``gsae.load_pretrained``: itself, unless the arm adds
        methods (the g-SAE's ``encode_with_grad``)."""
        return sl

    def label_for(self, encode_mode: str) -> str:
        """Label of this arm's codes under one encoder ("g", "g_free" or "plain") in figures and tables."""
        if not self.has_gradient_encoder:
            return self.label
        return f"{self.label}, {ENCODER_LABELS.get(encode_mode, encode_mode)}"

    def encode_modes(self) -> tuple[str, ...]:
        """The encoders worth reporting separately: both for an arm whose code uses the gradient, else plain."""
        return ("g", "plain") if self.has_gradient_encoder else ("plain",)

    def saves(self, architecture: str) -> bool:
        """Whether a cfg.json of ``architecture`` may hold this arm (its current or a legacy format)."""
        return architecture == self.architecture or architecture in self.legacy_architectures


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


def by_architecture(architecture: str, metadata: Mapping[str, Any] | None = None) -> Arm:
    """The arm that wrote a SAELens SAE of ``architecture`` whose cfg.json metadata is ``metadata``.

    The metadata's ``arm`` entry decides when it names a registered arm that saves ``architecture`` (so a g-SAE
    saved as SAELens' "topk" loads as a g-SAE). Without one (a SAELens SAE made elsewhere), the architecture
    decides: the arm named like it (SAELens' "topk" -> the TopK arm), else the first registered that saves it
    (a legacy "gtopk" -> the g-SAE)."""
    metadata = metadata or {}
    candidates = [a for a in _REGISTRY.values() if a.saves(architecture)]
    if not candidates:
        raise KeyError(f"no registered arm saves SAELens architecture {architecture!r}; "
                       f"known: {sorted({a.architecture for a in _REGISTRY.values()})}")
    named = metadata.get("arm")
    if named is not None:
        for arm in candidates:
            if arm.name == named:
                return arm
        raise KeyError(f"the SAE's cfg.json metadata names arm {named!r}, but no registered arm of that name saves "
                       f"SAELens architecture {architecture!r} (registered arms: {sorted(_REGISTRY)}); import the "
                       f"module that registers it")
    for arm in candidates:
        if arm.name == architecture:
            return arm
    return candidates[0]
