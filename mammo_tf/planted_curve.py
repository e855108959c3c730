"""Sensitivity against contrast: the planted-mass runs side by side, beside the real lesions.

Each planted run (:mod:`mammo_tf.planted`) trains and tests one recipe on masses of one contrast
and one seed's draw of films, positions, radii and folds. This gathers, from the runs' committed
``metrics.json``, each fold's sensitivity at 1 false positive per image, summarises each contrast
over its draws (the mean of the draws' fold means, and their spread when there are several), and
places the real lesions found by the same recipe at their own measured contrast (median and
quartiles, :func:`mammo_tf.planted.lesion_contrasts`). Each real test lesion is keyed to its
measured contrast through the run's ``lesions_found.csv``; the lesions found and missed are
counted per contrast quartile, compared by rank, and a likelihood-ratio test asks whether contrast
tells more than size (and the reverse). Other whole-film searches of the real lesions (tiled,
another resolution, a reference without a network) can be binned the same way beside it. Nothing is
trained or re-scored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammo_tf import detector as D
from mammo_tf import patches as P
from mammo_tf.config import from_dict, hardware_label, provenance
from mammo_tf.data import mias
from mammo_tf.io import load_json, save_figure, save_json
from mammo_tf.paired_detection import load_lesions
from mammo_tf.planted import contrast_summary, lesion_contrasts

TABLE = "Detection, whole films: planted masses found at 1 false positive per image, by contrast [PLANTED]"
# MIAS's mass classes (circumscribed, spiculated, ill-defined): a lesion type that contrast does not single out.
MASSES = ("CIRC", "SPIC", "MISC")
REAL_TABLE = "Detection, whole films: real lesions found at 1 false positive per image, by their measured contrast"
REAL_NOTE = ("located test lesions whose contrast could be measured, pooled over the folds, each fold at its own "
             "threshold for at most 1 false positive per image (box centre in the lesion), in the quartiles of all "
             "measured lesions' contrast; rank test: two-sided Mann-Whitney U of the contrast of the lesions found "
             "against those missed, over all of them and over the masses (CIRC, SPIC, MISC) alone; LR p: "
             "likelihood-ratio test of adding contrast to an unpenalised logistic regression of found on log radius, "
             "and log radius to one on contrast. Tissue and lesion type are not in the regression")
# Settings a planted run may differ in from the real-lesion run and still be the same recipe.
_DRAW_KEYS = ("name", "seed", "planted_contrast")


def _recipe(metrics: dict) -> tuple[D.DetectorExperiment, dict]:
    """The run's experiment, and its settings other than name, seed and planted contrast."""
    exp = from_dict(D.DetectorExperiment, metrics["experiment"])
    return exp, {k: v for k, v in dataclasses.asdict(exp).items() if k not in _DRAW_KEYS}


def _found(metrics: dict) -> tuple[int, int]:
    """Test lesions found at 1 FP/image and located test lesions, pooled over the folds."""
    groups = metrics["lesions_found"]["abnormality"].values()
    return sum(g["found"] for g in groups), sum(g["n"] for g in groups)


def fold_points(run_metrics: list[dict]) -> pd.DataFrame:
    """One row per planted run and fold: run, contrast, seed, fold, sensitivity at 1 FP/image (model, random boxes)."""
    rows = []
    for m in run_metrics:
        exp = m["experiment"]
        for f in m["folds"]:
            rows.append({"run": exp["name"], "contrast": float(exp["planted_contrast"]), "seed": int(exp["seed"]),
                         "fold": int(f["fold"]), "sensitivity": float(f["model"]["sens_at_1fp"]),
                         "random": float(f["random_boxes_random_class"]["sens_at_1fp"])})
    return pd.DataFrame(rows, columns=["run", "contrast", "seed", "fold", "sensitivity", "random"])


def by_contrast(points: pd.DataFrame) -> pd.DataFrame:
    """Per contrast: draws, mean of the draws' fold means, spread of those means (n-1; NaN for one draw), random boxes."""
    draws = points.groupby(["contrast", "seed"]).agg(sensitivity=("sensitivity", "mean"), random=("random", "mean"))
    summary = draws.groupby("contrast").agg(draws=("sensitivity", "size"), mean=("sensitivity", "mean"),
                                            spread=("sensitivity", "std"), random=("random", "mean"))
    return summary.reset_index()


def _text(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``, or 'n/a' where there is none (no lesion found, or none missed)."""
    return "n/a" if value is None or value != value else format(value, spec)


def found_against_missed(tested: pd.DataFrame) -> dict[str, Any]:
    """Counts and median contrast of the lesions found and missed, and a two-sided Mann-Whitney U test between them."""
    from scipy.stats import mannwhitneyu

    found, missed = (tested.loc[tested["found"] == hit, "contrast"] for hit in (True, False))
    both = len(found) > 0 and len(missed) > 0
    return {"n": int(len(tested)), "n_found": int(len(found)),
            "median_found": float(found.median()) if len(found) else None,
            "median_missed": float(missed.median()) if len(missed) else None,
            "p": float(mannwhitneyu(found, missed, alternative="two-sided").pvalue) if both else None}


def lesions_by_contrast(lesions: pd.DataFrame, contrasts: pd.DataFrame) -> dict[str, Any]:
    """A run's test lesions (``lesions``: its lesions_found.csv) at their measured contrast (``contrasts``:
    `lesion_contrasts` of every located lesion): found per quartile of all measured lesions' contrast, found
    against missed (all, and masses alone), and whether contrast tells more than size."""
    from scipy.stats import binomtest

    edges = [-np.inf, *contrasts["contrast"].quantile([0.25, 0.5, 0.75]).to_numpy(float), np.inf]
    tested = lesions.merge(contrasts[["refnum", "lesion", "contrast", "radius", "abnormality"]], on=["refnum", "lesion"],
                           how="inner")
    bins = []
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        g = tested[(tested["contrast"] > low) & (tested["contrast"] <= high)]
        k, n = int(g["found"].sum()), len(g)
        ci = binomtest(k, n).proportion_ci(method="wilson") if n else None
        label = (f"contrast <= {high:.1f}" if i == 0 else f"contrast > {low:.1f}" if i == len(edges) - 2
                 else f"contrast {low:.1f} to {high:.1f}")
        inside = contrasts["contrast"][(contrasts["contrast"] > low) & (contrasts["contrast"] <= high)]
        bins.append({"label": label, "median": float(inside.median()), "n": n, "found": k,
                     "abnormality": {str(a): int(c) for a, c in g["abnormality"].value_counts().sort_index().items()},
                     "sensitivity": k / n if n else float("nan"),
                     "ci": [float(ci.low), float(ci.high)] if ci else [float("nan")] * 2})
    # Larger lesions are both brighter on average and easier to find: does contrast tell more than size?
    log_radius = np.log(tested["radius"].to_numpy(float))
    hit = tested["found"].to_numpy(bool)
    return {"bins": bins, **found_against_missed(tested),
            "masses": found_against_missed(tested[tested["abnormality"].isin(MASSES)]),
            "p_contrast_beyond_size": nested_lr_p(hit, tested["contrast"], log_radius),
            "p_size_beyond_contrast": nested_lr_p(hit, log_radius, tested["contrast"])}


def real_lesions(metrics: dict, lesions: pd.DataFrame, contrasts: pd.DataFrame) -> dict[str, Any]:
    """The real-lesion run's fold sensitivities and pooled count, the lesions' contrast quartiles, and
    `lesions_by_contrast`."""
    n_found, n = _found(metrics)
    return {"run": metrics["experiment"]["name"],
            "fold_sensitivity": [float(f["model"]["sens_at_1fp"]) for f in metrics["folds"]],
            "found": n_found, "n": n, "contrast": contrast_summary(contrasts)["all"],
            "by_contrast": lesions_by_contrast(lesions, contrasts)}


def nested_lr_p(y: np.ndarray, added: Any, kept: Any) -> float:
    """Likelihood-ratio p of adding one covariate (``added``) to an unpenalised logistic regression on ``kept``."""
    from scipy.stats import chi2
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y, bool)
    if y.all() or not y.any():
        return float("nan")

    def log_likelihood(x: np.ndarray) -> float:
        p = LogisticRegression(C=np.inf, max_iter=10_000).fit(x, y).predict_proba(x)[:, 1]
        p = np.clip(p, 1e-12, 1 - 1e-12)
        return float(np.sum(np.where(y, np.log(p), np.log1p(-p))))

    kept = np.asarray(kept, float).reshape(len(y), -1)
    both = np.hstack([kept, np.asarray(added, float).reshape(len(y), 1)])
    return float(chi2.sf(max(2.0 * (log_likelihood(both) - log_likelihood(kept)), 0.0), 1))


def _real_rows(reference: dict, common: dict, seed: int) -> list[dict]:
    """The real lesions' row of the contrast table (``common``: its table, provenance and note), and their row of
    lesions found by contrast."""
    q = reference["contrast"]
    sens = np.asarray(reference["fold_sensitivity"])
    curve = {**common, "row": (f"real lesions ({reference['run']}): contrast median {q['median']:.1f}, "
                               f"quartiles {q['q25']:.1f}-{q['q75']:.1f} ({q['n']} measured)"),
             "values": {"sensitivity at 1 FP/image": [float(sens.mean()), float(sens.std(ddof=1))],
                        "per draw": f"{sens.mean():.3f} ± {sens.std(ddof=1):.3f} (seed {seed})",
                        "found (draws pooled)": f"{reference['found']}/{reference['n']}"}}
    return [curve, _by_contrast_row(reference["run"], reference["by_contrast"], common)]


def _by_contrast_row(name: str, result: dict, common: dict) -> dict:
    """One run's row of lesions found by contrast (``result``: `lesions_by_contrast`)."""
    masses = result["masses"]
    values = {**{b["label"]: f"{b['found']}/{b['n']}" for b in result["bins"]},
              "median contrast, found / missed": f"{_text(result['median_found'], '.1f')} / "
                                                 f"{_text(result['median_missed'], '.1f')}",
              "rank test p": _text(result["p"], ".2g"),
              "masses only: found, rank test p": f"{masses['n_found']}/{masses['n']}, {_text(masses['p'], '.2g')}",
              "contrast beyond size: LR p": _text(result["p_contrast_beyond_size"], ".2g"),
              "size beyond contrast: LR p": _text(result["p_size_beyond_contrast"], ".2g")}
    return {**common, "table": REAL_TABLE, "row": name, "values": values, "note": REAL_NOTE}


def evaluate(run_dirs: list[str | Path], out_dir: str | Path, command: str | None = None,
             real: str | Path | None = None, compare: list[str | Path] | None = None,
             annotations: pd.DataFrame | None = None) -> dict:
    """Gather planted runs, beside the same recipe's run on the real lesions (``real``), into a table and
    `planted_contrast.png`; with ``compare``, other whole-film detectors' real lesions found by contrast too
    (`found_by_contrast.png`)."""
    from mammo_tf.plots import detection as dplots

    dirs = [Path(d) for d in run_dirs]
    runs = [load_json(d / "metrics.json") for d in dirs]
    for d, m in zip(dirs, runs):
        if m["experiment"].get("planted_contrast") is None:
            raise ValueError(f"{d.name} is not a planted-mass run (no planted_contrast)")
    recipes = [_recipe(m) for m in runs]
    reference = None
    if real is not None:
        reference = load_json(Path(real) / "metrics.json")
        if reference["experiment"].get("planted_contrast") is not None:
            raise ValueError(f"{Path(real).name} is a planted-mass run, not the real lesions")
        recipes.append(_recipe(reference))
    names = [d.name for d in dirs] + ([Path(real).name] if real is not None else [])
    for (_, settings), name in zip(recipes, names):
        changed = sorted(k for k in settings if settings[k] != recipes[0][1].get(k))
        if changed:
            raise ValueError(f"{name} is not {names[0]}'s recipe (differs in {', '.join(changed)})")
    others = {}
    for d in map(Path, compare or []):
        experiment = load_json(d / "metrics.json")["experiment"]
        if experiment.get("protocol") != "whole" or experiment.get("planted_contrast") is not None:
            raise ValueError(f"{d.name} did not search whole films for the real lesions: it cannot be compared")
        others[d.name] = load_lesions(d)
    points = fold_points(runs)
    summary = by_contrast(points)
    exp = recipes[0][0]
    contrasts = None
    if reference is not None or others:
        annotations = annotations if annotations is not None else mias.load_annotations(exp.data)
        contrasts = lesion_contrasts(annotations, P.FilmCache(P.film_loader(exp.data)))
    if reference is not None:
        reference = real_lesions(reference, load_lesions(Path(real)), contrasts)
    compared = {name: lesions_by_contrast(lesions, contrasts) for name, lesions in others.items()}
    prov = provenance(command)
    common = {"table": TABLE, "command": prov["command"], "hardware": hardware_label(prov), "date": prov["date"],
              "note": ("sensitivity at 1 FP/image (box centre in the lesion); each draw (seed: films, positions, "
                       "radii, folds, initial weights) as mean ± std over its 5 patient folds; the contrast as the "
                       "mean of the draws' means ± their spread (n - 1) where there are several")}
    results = []
    for row in summary.itertuples():
        draws = points[points["contrast"] == row.contrast].groupby("seed")["sensitivity"]
        found = [_found(m) for m in runs if float(m["experiment"]["planted_contrast"]) == row.contrast]
        results.append({**common, "row": f"planted masses of contrast {row.contrast:g} ({row.draws} "
                                         f"draw{'s' if row.draws > 1 else ''})",
                        "values": {"sensitivity at 1 FP/image": [row.mean, row.spread],
                                   "per draw": " / ".join(f"{g.mean():.3f} ± {g.std():.3f} (seed {s})"
                                                          for s, g in draws),
                                   "found (draws pooled)": f"{sum(f for f, _ in found)}/{sum(n for _, n in found)}",
                                   "random boxes": [row.random, float("nan")]}})
    if reference is not None:
        results += _real_rows(reference, common, exp.seed)
    results += [_by_contrast_row(name, result, common) for name, result in compared.items()]
    metrics = {"runs": [str(d) for d in dirs], "real": str(real) if real is not None else None,
               "compare": [str(d) for d in compare or []],
               "folds": points.to_dict("records"), "by_contrast": summary.to_dict("records"),
               "real_lesions": reference, "compared": compared, "results": results, "provenance": prov}
    out = Path(out_dir)
    save_figure(dplots.plot_contrast_curve(points, summary, reference), out / "planted_contrast.png")
    found_by_contrast = {**({reference["run"]: reference["by_contrast"]} if reference else {}), **compared}
    if found_by_contrast:
        recipe = reference["run"] if reference else names[0]
        save_figure(dplots.plot_found_by_contrast(found_by_contrast, summary.set_index("contrast")["mean"],
                                                  f"planted masses, {recipe}'s recipe (mean of the draws)"),
                    out / "found_by_contrast.png")
    save_json(out / "metrics.json", metrics)
    return metrics
