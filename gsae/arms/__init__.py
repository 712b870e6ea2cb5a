"""SAE architectures ("arms") and their registry, in SAELens' pattern: one module per arm plus a registration.

An arm owns everything that differs between architectures: how its ``SAEConfig`` is made from the shared
settings and its own hyperparameters, how its module is built, its named loss terms, its sensitivity
variants, and its SAELens save / load. The training loop, the stages, the
evaluation, the figures and the claims ask the registry; nothing else compares an arm's name.

    from gsae import arms
    arm = arms.get("gsae")
    sae = arm.build(arm.make_config(d_in=576, d_sae=2304, k=32, beta=0.1), seed=0)

A new architecture: subclass ``Arm`` in ``gsae/arms/<name>.py`` (importing ``Arm`` and ``register`` from
``gsae.arms.registry``, never from this package, so the import graph has no cycle), call ``register(MyArm())`` at
its bottom and import it below (or, in a test, just call ``register``). ``gsae.arms.saelens`` saves and loads any
registered arm in SAELens' format.
"""

from __future__ import annotations

from .registry import ENCODER_LABELS, Arm, LossTerms, by_architecture, get, names, register, unregister

__all__ = ["ENCODER_LABELS", "Arm", "LossTerms", "by_architecture", "get", "names", "register", "unregister"]

from . import gsae, kl_finetune, topk  # noqa: E402,F401  (registers the built-in arms; kl_finetune: topk_kl, gsae_kl)
