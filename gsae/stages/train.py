"""Stage ``train``: the selection on the validation split (``stages.selection``), the convergence record, then
every SAE of the grid (``gsae.specs``), spread over the ranks of a torchrun launch by seed
(``distributed.assign_groups``), each resumable from checkpoints and saved in SAELens format."""

from __future__ import annotations

from .. import io
from ..config import Profile
from ..specs import SAESpec, sae_dir
from ._jobs import train_specs
from .harvest import reader
from .selection import all_specs, convergence, run_selection


def run(p: Profile, lm, progress: bool = True) -> list[SAESpec]:
    """The selection, the convergence record and the whole grid; returns the grid's specs."""
    run_selection(p, lm, progress)
    convergence(p, lm, progress)
    specs = all_specs(p, lm)
    train_specs(p, lm, specs, reader(p, "train", lm.info["model_hash"]), progress, by_seed=True)
    return specs


def training_history_frame(p: Profile, lm, specs: list[SAESpec], group: str = "primary"):
    """Long table of the training curves (one row per logged step): arm, k, seed and the logged fields
    (tokens, the arm's loss terms, l0, dead_fraction) from each SAE's train.json."""
    import pandas as pd

    mh = lm.info["model_hash"]
    rows = [{"arm": s.arm, "k": s.k, "seed": s.seed, **r}
            for s in specs if s.group == group for r in io.read_json(sae_dir(p, s, mh) / "train.json")["history"]]
    return pd.DataFrame(rows)
