"""What a notebook shows beside its figures: one **Result** sentence per figure, computed from the very numbers the
figure plots (the same frames and records, so the sentence cannot disagree with the picture); display tables that
write "—" where a value was not measured; and ``publish``, which saves a figure and shows it with its sentence.

Sign convention as in ``analysis.figures`` and ``analysis.report``: a gain is positive when the g-SAE is better,
and every interval says whether it is the deciding one (Bonferroni over a claim's tests) or a plain 95 % interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import arms, io
from ..paths import figures_dir
from . import figures as gf
from .headline import SHORT_NAMES, headline_rows
from .report import PLAIN_NAMES
from .rows import mean_t_interval

MISSING = "—"
"""What a table shows for a value that was not measured."""


def result(text: str) -> str:
    """A figure's result sentence, as Markdown."""
    return f"**Result:** {text}"


def num(x: Any, signed: bool = False) -> str:
    """3 significant digits (trailing zeros kept: 0.220), whole numbers from 1,000 on, "—" for NaN or None."""
    if x is None or not isinstance(x, (int, float, np.floating, np.integer)) or not math.isfinite(x):
        return MISSING
    if abs(x) >= 1000:
        return f"{x:+,.0f}" if signed else f"{x:,.0f}"
    return f"{x:+#.3g}" if signed else f"{x:#.3g}"


def _plain(label: str) -> str:
    return label.replace(", ", " ")


def publish(fig: Any, p: Any, name: str, sentence: str, provenance: dict[str, Any] | None = None) -> Path:
    """A notebook's figure: saved as ``<figures_dir(p)>/name`` with ``provenance`` (by default the profile's), then
    shown with its ``sentence`` (Markdown) under it; the figure is closed, so it shows once."""
    import matplotlib.pyplot as plt
    from IPython.display import Markdown, display

    path = gf.save_figure(fig, figures_dir(p) / name, provenance or io.provenance(profile=p.to_dict()))
    display(fig)
    display(Markdown(sentence))
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------- sentences
def ce_by_position(ce: Sequence[float], unigram_ce: float | None = None) -> str:
    """``figures.plot_ce_by_position``: first and last position, the mean, and the mean against the unigram CE."""
    ce = [float(v) for v in ce]
    mean = sum(ce) / len(ce)
    text = (f"the LM's next-token CE falls from {ce[0]:.2f} nats with 1 token of context to {ce[-1]:.2f} nats with "
            f"{len(ce)}; over all {len(ce)} positions it averages {mean:.2f} nats")
    if unigram_ce is not None:
        side = "below" if mean < unigram_ce else "above"
        text += (f", {abs(unigram_ce - mean):.2f} nats {side} the unigram CE ({unigram_ce:.2f} nats, the best "
                 f"prediction without context)")
    return result(text + ".")


def harvest_norms(x_norm: Sequence[float], cg_norm: Sequence[float], factor: float = 10.0) -> str:
    """``figures.plot_harvest_norms``: the median norms and the tokens above ``factor`` x the median ‖x‖."""
    x, cg = np.asarray(x_norm, dtype=float), np.asarray(cg_norm, dtype=float)
    med = float(np.median(x))
    massive = int((x > factor * med).sum())
    return result(f"over {len(x):,} tokens the median ‖x‖ is {med:.2f}; {massive:,} tokens "
                  f"({100 * massive / len(x):.2f}%) exceed {factor:g}× that median (massive activations), the "
                  f"largest at {x.max() / med:.0f}× it; the median ‖c g‖ is {float(np.median(cg)):.2f}.")


def selection(sel: dict[str, Any]) -> str:
    """``figures.plot_selection``: each arm's chosen lr with its validation ΔCE, and whether it is inside its grid."""
    parts, edges = [], []
    for name, lr in sel["lr"].items():
        trials = {float(t): v for t, v in sel["lr_trials"][name].items()}
        parts.append(f"{arms.get(name).label} {float(lr):.3g} (validation ΔCE {trials[float(lr)]:.3f} nats, "
                     f"{len(trials)} trials)")
        if sel.get("at_edge", {}).get(name):
            edges.append(arms.get(name).label)
    where = ("every chosen rate lies inside its trial grid" if not edges
             else f"on the edge of its grid: {', '.join(edges)}")
    return result(f"at k = {sel['k']}, mean over selection seeds {sel['seeds']}, the chosen learning rates are "
                  f"{'; '.join(parts)}; {where}.")


def convergence(conv: dict[str, Any], extension: dict[str, Any] | None = None) -> str:
    """``figures.plot_convergence``: each arm's change of validation ΔCE from the primary length to the longest
    length of the record (and of the exploratory extension, if given)."""
    base = int(conv["primary_tokens"])

    def change(curve: dict[str, dict[str, float]]) -> tuple[int, float]:
        pts = {int(t): v["delta_ce"] for t, v in curve.items()}
        at = min(pts, key=lambda t: abs(t - base))
        last = max(pts)
        return last, pts[last] / pts[at] - 1

    def part(curves: dict[str, Any]) -> str:
        return ", ".join(f"{arms.get(a).label} {100 * change(c)[1]:+.1f}% (to {change(c)[0]:,} tokens)"
                         for a, c in curves.items())

    text = f"from the primary length ({base:,} tokens) validation ΔCE changes by {part(conv['curves'])}"
    if extension:
        text += f"; in the exploratory extension by {part(extension['curves'])}"
    return result(text + ".")


def training_curves(history: pd.DataFrame, y: str = "fvu", last: int = 5) -> str:
    """``figures.plot_training_curves``: per k and arm, ``y`` averaged over each run's last ``last`` logged steps
    and then over seeds."""
    parts = []
    for k, sub in history.groupby("k"):
        ends = sub.sort_values("tokens").groupby(["arm", "seed"])[y].apply(lambda s: s.tail(last).mean())
        by_arm = ends.groupby(level="arm", sort=False).agg(["mean", "size"])
        parts.append(f"k = {k}: " + ", ".join(f"{arms.get(a).label} {num(r['mean'])} (n = {int(r['size'])})"
                                               for a, r in by_arm.iterrows()))
    return result(f"training {y.upper() if y == 'fvu' else y} over the last {last} logged batches, mean over seeds: "
                  + "; ".join(parts) + ".")


def _primary_k(df: pd.DataFrame) -> int:
    counts = df.groupby("k").seed.nunique()
    return int(counts.idxmax())


def vs_k(df: pd.DataFrame, metrics: Sequence[str], k: int | None = None) -> str:
    """``figures.plot_vs_k``: at ``k`` (by default the k with the most seeds, the primary one) each arm's mean
    ± 95 % t half-width and its number of seeds, per metric."""
    k = _primary_k(df[df.metric.isin(metrics)]) if k is None else k
    parts = []
    for m in metrics:
        sub = df[(df.metric == m) & (df.k == k) & df.value.notna()]
        cells = []
        for arm, g in sub.groupby("arm", sort=False):
            mean, half = mean_t_interval(g.value.tolist())
            cells.append(f"{_plain(arm)} {num(mean)}" + ("" if math.isnan(half) else f" ± {num(half)}")
                         + f" (n = {len(g)})")
        unit = gf.UNITS.get(m, "")
        parts.append(f"{m}{f' ({unit})' if unit else ''}: " + ", ".join(cells or [MISSING]))
    return result(f"at k = {k}, mean ± 95% t half-width over seeds: " + "; ".join(parts) + ".")


def paired(table: pd.DataFrame, who: str = "the g-SAE", over: str = "TopK") -> str:
    """``figures.plot_paired_differences`` (or any ``paired_difference_table``): per metric and k the mean gain
    with its interval (the table says which) and n."""
    parts = []
    for m, sub in table.groupby("metric", sort=False):
        pct = sub.unit.iloc[0] == "%"
        fmt = (lambda x: f"{x:+.1f}%") if pct else (lambda x: f"{x:+.4f}")
        cells = [f"k = {r.k}: {fmt(r.mean)} [{fmt(r.lower)}, {fmt(r.upper)}] (n = {r.n})" for r in sub.itertuples()]
        parts.append(f"{m}: " + "; ".join(cells))
    kind = "gain in % of TopK's mean" if (table.unit == "%").all() else "difference"
    return result(f"{kind} of {who} over {over} (positive = {who} better; {table.interval.iloc[0]}) — "
                  + " · ".join(parts) + ".")


def length_check(checks: Sequence[Any], margin: float) -> str:
    """``figures.plot_length_check``: per test the change of the paired gain with its deciding interval."""
    parts = [f"{c.test} {100 * c.estimate:+.1f} points [{100 * c.lower:+.1f}, {100 * c.upper:+.1f}] ({c.outcome}, "
             f"n = {c.n})" for c in checks]
    return result(f"with training twice as long the paired gain moves by {'; '.join(parts)} (deciding 95% "
                  f"Bonferroni intervals; length-stable if inside ±{100 * margin:g} points).")


def frequency(freqs: Mapping[str, np.ndarray]) -> str:
    """``figures.plot_frequency_histogram``: dead latents and the median live latent's firing rate per arm."""
    parts = []
    for label, f in freqs.items():
        f = np.asarray(f)
        live = f[f > 0]
        parts.append(f"{_plain(label)} {int((f == 0).sum())} of {len(f):,} dead, median live latent on "
                     f"{100 * float(np.median(live)) if len(live) else math.nan:.2f}% of tokens")
    return result("on the test split: " + "; ".join(parts) + ".")


def steering(sf: pd.DataFrame, metric: str = "kl", k: int | None = None) -> str:
    """``figures.plot_steering``: at ``k`` (by default the largest) the median per-latent effect of each arm (and
    the control) at every alpha, with the number of values behind each median."""
    sub = sf[sf.metric == metric]
    k = int(sub.k.max()) if k is None else k
    sub = sub[sub.k == k]
    unit = "KL(clean ‖ steered), nats" if metric == "kl" else "log-prob gain of the promoted tokens, nats"
    parts = []
    for a, g in sub.groupby("alpha"):
        med = g.groupby("arm", sort=False).value.agg(["median", "size"])
        parts.append(f"α = {a:g}: " + ", ".join(f"{arm} {num(r['median'])} (n = {int(r['size'])})"
                                                for arm, r in med.iterrows()))
    return result(f"median {unit} per steered direction at k = {k}: " + "; ".join(parts) + ".")


def probing(rows: Sequence[dict[str, Any]], baselines: dict[str, Any] | None, margin: float,
            metric: str = "probe_auc_pos_heldout") -> str:
    """``figures.plot_probing``: at the k with the most seeds both arms' AUC, their paired difference
    (``figures.probing_table``, the plotted one) with its interval against the margin, and the reference points."""
    table = gf.probing_table(rows, metric)
    r = table.loc[table.n.idxmax()]
    side = "above" if r.lower > -margin else "not wholly above"
    text = (f"at k = {r.k} the {metric} is {num(r.baseline_mean)} for TopK and {num(r.treatment_mean)} for the "
            f"g-SAE (plain-encode, n = {r.n}); the difference g-SAE − TopK is {r['mean']:+.4f} "
            f"[{r.lower:+.4f}, {r.upper:+.4f}] ({r.interval}), {side} the −{margin:g} margin")
    if baselines and "residual" in baselines:
        rand = baselines["random_init"].get(str(r.k), {}).get(metric)
        text += (f"; the best raw residual dimension reaches {num(baselines['residual'][metric])} and an untrained "
                 f"SAE {num(rand)}")
    return result(text + ".")


def headline(record: dict[str, Any], pre: dict[str, Any]) -> str:
    """``headline.plot_headline``: per claim its verdict and each test's estimate with its deciding interval."""
    parts: dict[str, list[str]] = {}
    verdicts = {}
    for c, r, t in headline_rows(record, pre):
        verdicts[c["claim"]] = c["verdict"]
        name = SHORT_NAMES.get(t["metric"], t["metric"]).split(": ")[-1]  # the claim is named already
        if not all(isinstance(r[x], (int, float)) and math.isfinite(r[x]) for x in ("estimate", "lower", "upper")):
            parts.setdefault(c["claim"], []).append(f"{name} {r['verdict']}")
        elif t["rule"] == "relative":
            need = 100 * float(t["min_rel_effect"])
            parts.setdefault(c["claim"], []).append(
                f"{name} {100 * r['estimate']:+.1f}% [{100 * r['lower']:+.1f}%, {100 * r['upper']:+.1f}%], "
                f"needs ≥ {need:g}%")
        else:
            parts.setdefault(c["claim"], []).append(
                f"{name} {r['estimate']:+.4f} [{r['lower']:+.4f}, {r['upper']:+.4f}], needs > −{float(t['margin']):g}")
    ns = sorted({r["n"] for _, r, _ in headline_rows(record, pre)})
    claims = [f"{cl} ({PLAIN_NAMES.get(cl, cl).lower()}) **{verdicts[cl]}**: {'; '.join(ps)}"
              for cl, ps in parts.items()]
    return result(f"at k = {', '.join(map(str, pre['primary_k']))} with {'/'.join(map(str, ns))} paired seeds "
                  f"(deciding 95% intervals, Bonferroni over each claim's tests): " + " — ".join(claims) + ".")


def dashboards(n_latents: Mapping[str, int], pages: Mapping[str, Path]) -> str:
    """The release stage's dashboard pages: latents and size per arm."""
    return result("one page per arm: " + "; ".join(
        f"{arms.get(a).label} {n} latents ({pages[a].stat().st_size / 1e6:.1f} MB)" for a, n in n_latents.items())
                  + ".")


# ------------------------------------------------------------------------------------------------------ tables
def summary_table(df: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Per arm and k: n (seeds) and mean ± 95 % t half-width over seeds of each metric, "—" where not measured."""
    rows = []
    for (arm, k), g in df[df.metric.isin(metrics)].groupby(["arm", "k"]):
        row: dict[str, Any] = {"arm": arm, "k": k, "n": g.seed.nunique()}
        for m in metrics:
            mean, half = mean_t_interval(g[(g.metric == m) & g.value.notna()].value.tolist())
            row[m] = num(mean) + ("" if math.isnan(half) else f" ± {num(half)}")
        rows.append(row)
    return pd.DataFrame(rows)


def paired_table(table: pd.DataFrame) -> pd.DataFrame:
    """A ``paired_difference_table`` for reading: metric, k, n, the baseline mean and the gain [interval]."""
    def cell(r: Any) -> str:
        f = (lambda x: f"{x:+.2f}%") if r.unit == "%" else (lambda x: f"{x:+.4f}")
        return f"{f(r.mean)} [{f(r.lower)}, {f(r.upper)}]"

    return pd.DataFrame({"metric": table.metric, "k": table.k, "n": table.n,
                         "TopK mean": [num(x) for x in table.baseline_mean],
                         "g-SAE mean": [num(x) for x in table.treatment_mean],
                         "gain [interval]": [cell(r) for r in table.itertuples()], "interval": table.interval})


def secondary_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str], modes: Sequence[str] = ("g", "g_free"),
                    baseline: str = "topk", treatment: str = "gsae", better: str = "lower") -> pd.DataFrame:
    """``paired_table`` of ``treatment``'s codes under each gradient encoder in ``modes`` (secondary, never
    decisive) against ``baseline``, where the rows measured them; "not measured" when none did."""
    parts = []
    for mode in modes:
        try:
            t = gf.paired_difference_table(rows, metrics, baseline, treatment, mode, better)
        except ValueError:  # this encoder's LM metrics were not measured
            continue
        parts.append(paired_table(t).assign(encoder=arms.get(treatment).label_for(mode)))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"secondary encoders": ["not measured"]})


def dashed(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with "—" wherever a value is missing."""
    return df.astype(object).where(df.notna(), MISSING)


def info_table(info: Mapping[str, Any]) -> pd.DataFrame:
    """The LM's scalar facts (its name, hash, sizes, training figures), one row each."""
    return dashed(pd.DataFrame({"value": {k: v for k, v in info.items() if not isinstance(v, (dict, list, tuple))}}))


def harvest_table(manifests: Mapping[str, dict[str, Any]]) -> pd.DataFrame:
    """Per split: tokens, contexts, shards and the gradient statistics of its harvest manifest."""
    return pd.DataFrame({s: {"harvested tokens": m["n_tokens"], "contexts": m["n_contexts"],
                             "shards": len(m["files"]), "mean CE (nats)": m["grad_stats"]["mean_loss"],
                             "E‖x‖²": m["grad_stats"]["mean_sq_norm_x"], "E‖g‖²": m["grad_stats"]["mean_sq_norm_g"],
                             "grad scale c": m["grad_stats"]["grad_scale"]} for s, m in manifests.items()}).T


def trials_table(sel: dict[str, Any]) -> pd.DataFrame:
    """The selection's trials: arm, lr, seed and their validation metrics."""
    cols = [c for c in ("arm", "lr", "seed", "beta", "delta_ce", "kl", "fvu", "dead_fraction") if c in sel["trials"][0]]
    return dashed(pd.DataFrame(sel["trials"])[cols])


def baseline_table(baselines: dict[str, Any]) -> pd.DataFrame:
    """C4's reference points (``stages.probe.run_baselines``): one row per baseline, its probe AUCs."""
    if "residual" not in baselines:
        return pd.DataFrame({"not measured": [baselines.get("not_measured", MISSING)]})
    rows = {"raw residual dimension": baselines["residual"]}
    rand = baselines["random_init"]
    rows |= {f"random-init SAE, k = {k}": rand[k] for k in sorted(rand, key=int)}
    return pd.DataFrame({name: {m: num(v) for m, v in b.items()} for name, b in rows.items()}).T


def release_table(released: Mapping[str, Any]) -> pd.DataFrame:
    """The released SAEs (``release.export_release``): per SAE and encoder the stored dtype, the fp16 check and
    the class ``gsae.load_pretrained`` loads it as (each is loaded from disk)."""
    from ..release import load_pretrained

    loads = {name: type(load_pretrained(name)).__name__ for name in released}
    return pd.DataFrame([{"name": name, "loads as": loads[name], "weights": r.weights_dtype, "encoder": mode,
                          "fp16 pooled rel. error": num(e.pooled), "fp16 same-latent rows": num(e.pooled_same_latents),
                          "rows with a changed latent": num(e.changed_rows),
                          "MB": f"{sum(f.stat().st_size for f in r.path.iterdir()) / 1e6:.2f}"}
                         for name, r in released.items() for mode, e in r.fp16_error.items()])
