"""Rendering of the pre-registered verdicts (``gsae.claims``): the README claims table with its measurement table,
SENSITIVITY.md, and the CLI ``python -m gsae.claims --profile P [--check]`` that writes (or checks) them."""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

from . import arms
from .claims import (
    BASELINE,
    MINUS,
    ROOT,
    TREATMENT,
    UNTESTED,
    ClaimVerdict,
    KResult,
    PreregError,
    ResultsError,
    Robustness,
    _index,
    _values,
    load_metrics,
    load_prereg,
    mean_t_interval,
    sensitivity,
    verdicts,
)
from .config import ConfigError, load_profile
from .io import atomic_path, sha256_file
from .paths import figures_dir

START, END = "<!-- claims:start -->", "<!-- claims:end -->"
BOTTOM_LINE = ("<!-- bottom-line:start -->", "<!-- bottom-line:end -->")
"""Markers of the README's generated bottom line (study v2), near its top."""


class ReadmeMarkerError(ValueError):
    """The README lacks exactly one ``<!-- claims:start -->`` ... ``<!-- claims:end -->`` pair."""


# ------------------------------------------------------------------------------------------------ rendering
def _decimals(values: list[float]) -> int:
    """Decimals giving 3 significant digits to the largest |value| (kept in 1..6)."""
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0]
    if not finite:
        return 3
    return min(6, max(1, 2 - math.floor(math.log10(max(finite)))))


def _num(x: float, dec: int, sign: bool = True) -> str:
    if not math.isfinite(x):
        return "—"
    return (f"{x:+.{dec}f}" if sign else f"{x:.{dec}f}").replace("-", MINUS)


def k_status(v: ClaimVerdict, r: KResult) -> str:
    """One word for one k; a worse-than-TopK result is as loud as a success."""
    eq = v.rule == "equivalence"
    if r.stats.n == 0:
        return "no data"
    if r.worse:
        return "**worse (CI below −margin)**" if eq else "**significantly worse**"
    if r.supported:
        return "equivalent" if eq else "supported"
    if r.contradicted:
        return "below margin" if eq else "contradicted"
    if r.stats.n < 2:
        return f"no test (n={r.stats.n})"
    return "not shown" if eq else "not supported"


def summary_line(v: ClaimVerdict) -> str:
    n = len(v.per_k)
    if v.verdict == "not measured":
        return f"every row lists `{v.metric}` as not measured (e.g. POS probing on a corpus without POS tags)"
    if v.verdict == "not tested":
        return f"no paired `{v.metric}` values" + ("" if n else " (no rows for this variant)")
    if v.rule == "equivalence":
        return (f"equivalent at {v.n_supported}/{n} k (needs {v.need_replicated}); below margin at "
                f"{v.n_contradicted}/{n} (fails at {v.need_not_replicated}); worse at {v.n_worse}/{n}")
    return (f"supported at {v.n_supported}/{n} k (needs {v.need_replicated}); contradicted at "
            f"{v.n_contradicted}/{n} (fails at {v.need_not_replicated}); significantly worse at {v.n_worse}/{n}")


def _k_line(v: ClaimVerdict, r: KResult, dec: int) -> str:
    s = r.stats
    text = f"k={r.k}: Δ {_num(s.mean_diff, dec)} [{_num(s.ci_lo, dec)}, {_num(s.ci_hi, dec)}]"
    if v.relative and s.n and s.topk_mean != 0 and math.isfinite(s.topk_mean):
        text += f" ({100 * s.mean_diff / abs(s.topk_mean):+.0f}%)".replace("-", MINUS)
    return f"{text} {k_status(v, r)}"


def _effect_cell(v: ClaimVerdict) -> str:
    if v.verdict == "not measured":
        return f"not measured: {summary_line(v)}"
    if v.verdict == "not tested":
        return f"not tested: no paired `{v.metric}` values"
    dec = _decimals([x for r in v.per_k for x in (r.stats.mean_diff, r.stats.ci_lo, r.stats.ci_hi)])
    seeds = sorted({r.stats.n for r in v.per_k})
    head = (f"Δ = g-SAE − TopK, {'lower' if v.better == 'lower' else 'higher'} is better"
            if v.rule != "equivalence" else f"Δ = g-SAE − TopK, equivalent if CI > −{v.per_k[0].min_effect:g}")
    head += f"; n = {'/'.join(map(str, seeds))} seeds"
    return "<br>".join([head, *(_k_line(v, r, dec) for r in v.per_k), f"**{summary_line(v)}**"])


def readme_verdict(rob: Robustness) -> str:
    """The verdict as the README states it: plain "replicated" only for a robust replication."""
    v = rob.primary.verdict
    if rob.label in ("robust", *UNTESTED):
        return v
    return f"{v} ({'fragile' if rob.label == 'fragile' else 'sensitivity incomplete'})"


def _robustness_cell(rob: Robustness) -> str:
    n = len(rob.variants)
    if rob.label in UNTESTED:
        return "—"
    if not n:
        return "robust (no variants registered)"
    parts = []
    n -= len(rob.same_as_primary)
    agree = n - len(rob.disagreeing) - len(rob.untested)
    if rob.label == "fragile":
        by = {v.variant: v.verdict for v in rob.variants}
        parts.append("**fragile**: " + "; ".join(f"{name} → {by[name]}" for name in rob.disagreeing))
    else:
        parts.append(rob.label)
    parts.append(f"{agree}/{n} variants agree")
    if rob.untested:
        parts.append("not run: " + ", ".join(rob.untested))
    if rob.same_as_primary:
        parts.append("not counted (SAEs identical to the primary's): " + ", ".join(rob.same_as_primary))
    return "; ".join(parts)


def render_claims_table(claim_verdicts: list[ClaimVerdict], sens: dict[str, Robustness],
                        figure_links: dict[str, str], source_note: str = "") -> str:
    """The README's claims table (Markdown)."""
    lines = ["| claim | verdict | robustness | effect ± 95% CI per k | figure |", "|---|---|---|---|---|"]
    for v in claim_verdicts:
        rob = sens.get(v.claim) or Robustness(v.claim, v, (), "robust", (), ())
        fig = f"[figure]({figure_links[v.claim]})" if v.claim in figure_links else "—"
        title = f"**{v.claim}** {v.title} (`{v.metric}`)".replace("|", "\\|")
        lines.append(f"| {title} | {readme_verdict(rob)} | {_robustness_cell(rob)} | {_effect_cell(v)} | {fig} |")
    if source_note:
        lines += ["", source_note]
    return "\n".join(lines) + "\n"


def render_sensitivity_md(claim_verdicts: list[ClaimVerdict], sens: dict[str, Robustness], prereg: dict[str, Any],
                          claims_table: str = "", header: str = "") -> str:
    """SENSITIVITY.md: verdict x variant grid, then every number behind every verdict."""
    names = [v["name"] for v in prereg.get("variants", []) or []]
    out = [header or "# Sensitivity analysis", ""]
    if claims_table:
        out += ["## Claims", "", claims_table.rstrip("\n"), ""]
    out += ["## Verdict per variant", "",
            "Each cell: verdict (supported or equivalent / k tested). n/a: the variant does not apply (PREREG §6).", "",
            "| claim | primary | " + " | ".join(names) + " | robustness |",
            "|---|---|" + "---|" * len(names) + "---|"]
    for v in claim_verdicts:
        rob = sens[v.claim]
        by = {x.variant: x for x in rob.variants}
        out.append(f"| {v.claim} | {_grid_cell(v)} | "
                   + " | ".join(_grid_cell(by.get(n)) + (" = primary SAEs" if n in rob.same_as_primary else "")
                                for n in names) + f" | {rob.label} |")
    same = sorted({n for rob in sens.values() for n in rob.same_as_primary})
    if same:
        why = " (auxk_off: no latent went dead, so the AuxK loss was zero throughout)" if "auxk_off" in same else ""
        out += ["", f"= primary SAEs: every row of {', '.join(same)} is identical to the primary row of the same arm, "
                    f"k and seed, so the variant's setting had no effect on training{why}. Such a variant repeats "
                    "the primary analysis; it is not counted for or against robustness."]
    out += ["", "| variant | what |", "|---|---|"]
    out += [f"| {v['name']} | {v.get('what', '')} |" for v in prereg.get("variants", []) or []]
    out += ["", "## Numbers per k", "",
            "Δ = g-SAE − TopK over paired seeds; CI two-sided 95% t (df = n − 1); p one-sided in the claimed "
            "direction, Holm over the k grid within each claim × variant (equivalence: decided by the CI).", ""]
    for v in claim_verdicts:
        rob = sens[v.claim]
        out += [f"### {v.claim} — {v.title}", "",
                "| variant | metric | k | n | TopK mean | g-SAE mean | Δ [95% CI] | p | p Holm | min effect | status |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in (v, *rob.variants):
            vals = [y for r in x.per_k for y in (r.stats.mean_diff, r.stats.ci_lo, r.stats.ci_hi,
                                                r.stats.topk_mean, r.stats.g_mean)]
            dec = _decimals(vals)
            for r in x.per_k:
                s = r.stats
                out.append(f"| {x.variant} | `{x.metric}` | {r.k} | {s.n} | {_num(s.topk_mean, dec, False)} | "
                           f"{_num(s.g_mean, dec, False)} | {_num(s.mean_diff, dec)} [{_num(s.ci_lo, dec)}, "
                           f"{_num(s.ci_hi, dec)}] | {_p(s.p_one_sided, x)} | {_p(r.p_holm, x)} | "
                           f"{_num(r.min_effect, dec, False)} | {k_status(x, r)} |")
            if not x.per_k:
                out.append(f"| {x.variant} | `{x.metric}` | — | 0 | | | | | | | no rows |")
            out.append(f"| {x.variant} | | | | | | | | | | **{x.verdict}**: {summary_line(x)} |")
        out.append("")
    return "\n".join(out)


def _grid_cell(x: ClaimVerdict | None) -> str:
    if x is None:
        return "n/a"
    return x.verdict if x.verdict in UNTESTED else f"{x.verdict} ({x.n_supported}/{len(x.per_k)})"


def _p(p: float, v: ClaimVerdict) -> str:
    if v.rule == "equivalence" or not math.isfinite(p):
        return "—"
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


# ------------------------------------------------------------------------------------------------ README
def _split_markers(text: str, path: Path, markers: tuple[str, str] = (START, END)) -> tuple[str, str, str]:
    start, end = markers
    n_start, n_end = text.count(start), text.count(end)
    if n_start != 1 or n_end != 1 or text.index(end) < text.index(start):
        raise ReadmeMarkerError(
            f"{path} must contain exactly one '{start}' followed by one '{end}' (found {n_start} and {n_end}); "
            f"put the pair on their own lines where the generated block belongs")
    i = text.index(start) + len(start)
    j = text.index(end)
    return text[:i], text[i:j], text[j:]


def _block(table: str) -> str:
    return "\n" + table.strip("\n") + "\n"


def _read_readme(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; create it with a '{START}' / '{END}' pair where the claims "
                                f"table goes")
    return path.read_text()


def update_readme(readme_path: str | Path, table: str, markers: tuple[str, str] = (START, END)) -> None:
    """Replace the text between ``markers`` (default: the claims markers) with ``table`` (atomic write; everything
    else untouched)."""
    path = Path(readme_path)
    head, _, tail = _split_markers(_read_readme(path), path, markers)
    with atomic_path(path) as tmp:
        tmp.write_text(head + _block(table) + tail)


def check_readme(readme_path: str | Path, table: str, markers: tuple[str, str] = (START, END)) -> bool:
    """True if the README's block between ``markers`` is exactly what ``update_readme`` would write."""
    path = Path(readme_path)
    return _split_markers(_read_readme(path), path, markers)[1] == _block(table)


# ------------------------------------------------------------------------------------------------ profiles
class ProfileClaims(NamedTuple):
    profile: str
    verdicts: list[ClaimVerdict]
    sensitivity: dict[str, Robustness]
    claims_table: str
    """The README table (figure links relative to the repository root)."""
    sensitivity_md: str
    sensitivity_path: Path
    """Where SENSITIVITY.md goes: the repository root for the registered profile, else results/<profile>/."""
    readme_path: Path | None
    """The README to update (registered profile only)."""


FIGURE_EXTS = (".png", ".svg", ".pdf")


FIGURE_FOR_CLAIM = {"C1": "fidelity_delta_ce_kl.png", "C2": "fvu_dead.png", "C3": "steering_kl.png",
                    "C4": "probing.png"}
"""The figure each claim links to (drawn by notebooks 03-05 into the profile's figures directory)."""


def find_figures(fig_dir: Path, claim_ids: list[str]) -> dict[str, Path]:
    """The claims' figures that exist in ``fig_dir`` (see FIGURE_FOR_CLAIM)."""
    return {c: fig_dir / FIGURE_FOR_CLAIM[c] for c in claim_ids
            if c in FIGURE_FOR_CLAIM and (fig_dir / FIGURE_FOR_CLAIM[c]).exists()}


GLANCE_METRICS = (("delta_ce", "ΔCE (nats)"), ("kl", "KL"), ("fvu", "FVU"), ("fvu_typical", "FVU typical"),
                  ("dead_fraction", "dead frac."), ("steer_kl@0.5", "steer KL@0.5"), ("probe_auc_pos", "POS AUC"))
"""Columns of the README's measurement table: (metrics.jsonl key, header)."""


def render_glance_table(rows: list[dict[str, Any]], k_grid: list[int], variant: str = "primary") -> str:
    """Per k and arm (TopK, g-SAE g-encode, g-SAE plain-encode): mean ± 95% t-interval over seeds of the
    headline measurements, straight from metrics.jsonl (columns without data are left out)."""
    index = _index(rows)
    shown = [(arms.get(a).label_for(e), a, e) for a in (BASELINE, TREATMENT) for e in arms.get(a).encode_modes()]
    cols = [(key, head) for key, head in GLANCE_METRICS
            if any(_values(index, variant, a, e, k, key) for _, a, e in shown for k in k_grid)]
    lines = ["| k | SAE | n | " + " | ".join(h for _, h in cols) + " |", "|---" * (3 + len(cols)) + "|"]
    for k in k_grid:
        for label, arm, enc in shown:
            cells, n = [], 0
            for key, _ in cols:
                vals = list(_values(index, variant, arm, enc, k, key).values())
                n = max(n, len(vals))
                mean, half = mean_t_interval(vals)
                dec = 4 if key == "dead_fraction" else 3
                cells.append("—" if math.isnan(mean) else
                             f"{mean:.{dec}f}" + ("" if math.isnan(half) else f" ± {half:.{dec}f}"))
            lines.append(f"| {k} | {label} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def selection_note(selection: dict[str, Any] | None, edges: dict[str, Any] | None) -> str:
    """One Markdown sentence on how lr and beta were chosen and whether a choice sits on its grid's edge, from
    ``results/<profile>/selection.json`` and ``selection_edges.json`` (empty when there is no selection)."""
    if not selection:
        return ""

    def grid(trials: dict[str, float]) -> str:
        vals = sorted(float(v) for v in trials)
        return f"{vals[0]:g} … {vals[-1]:g}"

    parts = [f"Selection on the validation split (k = {selection['k']}, seed {selection['seed']}, "
             f"{selection['objective']}): lr {float(selection['lr']):g} (grid {grid(selection['lr_trials'])}), "
             f"β {float(selection['beta']):g} (grid {grid(selection['beta_trials'])})."]
    for name, c in sorted(((edges or {}).get("checks") or {}).items()):
        verdict = ("scores better, so the registered choice is a limit of its grid, not an optimum"
                   if c["would_move"] else "scores worse, so the registered choice is a local optimum")
        parts.append(f"Grid-edge check (not registered; DEVIATIONS.md): {name} {float(c['beyond']):.3g} "
                     f"(ΔCE {c['beyond_delta_ce']:.3f} vs {c['chosen_delta_ce']:.3f} at {float(c['chosen']):g}) "
                     f"{verdict}.")
    return " ".join(parts)


def verdict_for_profile(profile: str, root: str | Path | None = None) -> ProfileClaims:
    """Everything ``python -m gsae.claims --profile <profile>`` would write, without writing it."""
    root = Path(root) if root is not None else ROOT
    prereg = load_prereg(root / "prereg.yaml")
    metrics_path = root / "results" / profile / "metrics.jsonl"
    rows = load_metrics(metrics_path)
    registered = profile == prereg.get("profile")
    if registered:
        k_grid = [int(k) for k in prereg["estimand"]["k_grid"]]
    else:  # an unregistered profile (smoke, paper) is analysed on its own k grid
        k_grid = list(load_profile(root / "profiles" / f"{profile}.yaml").experiment.k_grid)
    primary = verdicts(prereg, rows, k_grid)
    sens = sensitivity(prereg, rows, k_grid, primary)

    out_dir = root if registered else root / "results" / profile
    fig_dir = figures_dir(profile, root)
    figures = find_figures(fig_dir, list(prereg["claims"]))

    def links(base: Path) -> dict[str, str]:
        return {c: Path(os.path.relpath(p, base)).as_posix() for c, p in figures.items()}

    note = (f"Computed by `python -m gsae.claims --profile {profile}` from `results/{profile}/metrics.jsonl` "
            f"(sha256 `{sha256_file(metrics_path)[:12]}`, {len(rows)} rows) with the rules of PREREG.md §2 "
            f"(prereg.yaml version {prereg.get('version')}); per-k numbers for every variant in SENSITIVITY.md.")
    res_dir = root / "results" / profile
    sel = selection_note(*(json.loads((res_dir / f).read_text()) if (res_dir / f).exists() else None
                           for f in ("selection.json", "selection_edges.json")))
    if sel:
        note += " " + sel
    if not registered:
        note += (f" Profile `{profile}` is not the registered profile `{prereg.get('profile')}`: these numbers "
                 f"test the pipeline, never the claims (PREREG §7).")
    glance = ("\nMeasurements behind the table (test split, mean ± 95% t-interval over seeds; FVU typical leaves "
              "out massive-activation tokens, DEVIATIONS.md):\n\n" + render_glance_table(rows, k_grid))
    table = render_claims_table(primary, sens, links(root), note) + glance
    header = (f"# Sensitivity analysis — profile `{profile}`\n\nGenerated by `python -m gsae.claims --profile "
              f"{profile}`; do not edit by hand. Rules: PREREG.md §2 and §6.")
    sens_md = render_sensitivity_md(primary, sens, prereg, render_claims_table(primary, sens, links(out_dir), note),
                                    header)
    return ProfileClaims(profile, primary, sens, table, sens_md, out_dir / "SENSITIVITY.md",
                         root / "README.md" if registered else None)


def _diff(old: str, new: str, name: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{name} (on disk)",
                                        f"{name} (generated)"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gsae.claims", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="default", help="results/<profile>/metrics.jsonl is read")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 (printing a diff) if README.md or SENSITIVITY.md is out of date")
    ap.add_argument("--root", default=None, help="repository root (default: this checkout)")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, ConfigError, PreregError, ResultsError, ReadmeMarkerError) as e:
        print(f"gsae.claims: {e}", file=sys.stderr)
        return 2


def _print_stale(diffs: list[str], profile: str) -> int:
    """``--check`` found generated files out of date: print their diffs and what to run; exit status 1."""
    print("".join(diffs))
    print(f"out of date: run `python -m gsae.claims --profile {profile}`", file=sys.stderr)
    return 1


def _run_ledger(args: argparse.Namespace, profile: Any) -> int:
    """A v2 profile (``selection.protocol: per_arm``): the ledger from results/<profile>/metrics.jsonl (no LM
    needed); ``--check`` compares the README block of the registered profile with it."""
    from . import ledger
    from .stages.claims import ledger_report, write_ledger

    rows = load_metrics(ROOT / "results" / args.profile / "metrics.jsonl")
    if not args.check:
        print(write_ledger(profile, rows))
        return 0
    readme = ROOT / "README.md"
    rep = ledger_report(profile, rows)
    if profile.name == ledger.load_prereg(ROOT / ledger.CURRENT).get("profile"):
        stale = [_diff(_split_markers(_read_readme(readme), readme, m)[1], _block(text), f"README.md {m[0]}")
                 for m, text in (((START, END), rep.markdown), (BOTTOM_LINE, rep.bottom_line))
                 if not check_readme(readme, text, m)]
        if stale:
            return _print_stale(stale, args.profile)
    print("claims ledger block is up to date")
    return 0


def _run(args: argparse.Namespace) -> int:
    # Profiles are looked up under ROOT (not only the installed package's folder) so that a repository root set
    # elsewhere, as the paper-shaped test does, finds its own profiles.
    local = ROOT / "profiles" / f"{args.profile}.yaml"
    profile = None if args.root is not None else load_profile(local if local.exists() else args.profile)
    if profile is not None and profile.selection.protocol == "per_arm":
        return _run_ledger(args, profile)
    pc = verdict_for_profile(args.profile, args.root)

    if args.check:
        stale = []
        if pc.readme_path is not None and not check_readme(pc.readme_path, pc.claims_table):
            current = _split_markers(_read_readme(pc.readme_path), pc.readme_path)[1]
            stale.append(_diff(current, _block(pc.claims_table), "README.md claims block"))
        on_disk = pc.sensitivity_path.read_text() if pc.sensitivity_path.exists() else ""
        if on_disk != pc.sensitivity_md:
            stale.append(_diff(on_disk, pc.sensitivity_md, str(pc.sensitivity_path.name)))
        if stale:
            return _print_stale(stale, args.profile)
        print("claims table and SENSITIVITY.md are up to date")
        return 0

    if pc.readme_path is not None:  # fail on missing markers before writing anything
        _split_markers(_read_readme(pc.readme_path), pc.readme_path)
    with atomic_path(pc.sensitivity_path) as tmp:
        tmp.write_text(pc.sensitivity_md)
    if pc.readme_path is not None:
        update_readme(pc.readme_path, pc.claims_table)
    for v in pc.verdicts:
        print(f"{v.claim}: {readme_verdict(pc.sensitivity[v.claim])} — {summary_line(v)}")
    print(f"wrote {pc.sensitivity_path}" + (f" and {pc.readme_path}" if pc.readme_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
