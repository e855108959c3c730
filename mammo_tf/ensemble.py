"""Replicates of one classifier recipe, and the mean of their scores: how much of a margin is training luck.

Replicates are runs of one experiment config that differ only in ``replicate`` (the training seed:
weight initialisation and batch order); folds, validation patients and patches are the same, which
is checked on the configs and on the stored predictions. Two questions get answers from the stored
per-fold test predictions (``fold*/patch_predictions.csv``, ``fold*/film_predictions.csv``), with no
model run again:

* how far apart two trainings of one recipe land, fold by fold (training randomness), and
* whether the mean of the replicates' abnormal scores (a deep ensemble, rule fixed in advance: the
  plain mean of 1 - p(normal) per patch, and of the max rule's film score per film) beats the
  intensity logistic regression more clearly than one run does.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammo_tf.config import hardware_label, provenance
from mammo_tf.io import load_json, save_figure, save_json

TABLE = "Classification: replicates of one recipe (training seed only) and their mean score"
PAIR_TABLE = "Classification: training randomness, replicate minus replicate on the same folds"
# Per level: the stored file, the column holding a run's abnormal score, the columns that must agree.
LEVELS = {"patch": ("patch_predictions.csv", "score_cnn", ["refnum", "label_id", "fold"]),
          "film": ("film_predictions.csv", "abnormal_score", ["refnum", "label_id", "fold"])}
LEVEL_NAMES = {"patch": "grid_keep test patches", "film": "whole mammogram, max rule"}


def stored_experiment(run_dir: Path) -> dict:
    """The stored experiment config of a classifier run."""
    metrics = load_json(run_dir / "metrics.json")
    if "experiment" not in metrics:
        raise ValueError(f"{run_dir}: not a classifier run (no experiment in metrics.json)")
    return metrics["experiment"]


def check_replicates(run_dirs: list[Path]) -> list[dict]:
    """The runs' experiments, after checking they differ only in name and replicate (ValueError if not)."""
    if len(run_dirs) < 2:
        raise ValueError("an ensemble needs at least two runs")
    exps = [stored_experiment(d) for d in run_dirs]
    strip = lambda e: {k: v for k, v in e.items() if k not in ("name", "replicate")}  # noqa: E731
    for d, e in zip(run_dirs[1:], exps[1:]):
        diff = sorted(k for k in set(strip(e)) | set(strip(exps[0])) if strip(e).get(k) != strip(exps[0]).get(k))
        if diff:
            raise ValueError(f"{d} is not a replicate of {run_dirs[0]}: configs differ in {diff}")
    reps = [e.get("replicate", 0) for e in exps]
    if len(set(reps)) != len(reps):
        raise ValueError(f"replicates must differ in their training seed, got replicate {reps}")
    if exps[0].get("classifier", "cnn") != "cnn":
        raise ValueError("replicates are for trained CNN runs (a probe's logistic fit has no training seed)")
    return exps


def load_level(run_dir: Path, level: str) -> pd.DataFrame:
    """One run's stored test predictions of a level, all folds in fold order."""
    name = LEVELS[level][0]
    paths = sorted(run_dir.glob(f"fold*/{name}"), key=lambda p: int(p.parent.name[4:]))
    if not paths:
        raise FileNotFoundError(f"{run_dir}: no fold*/{name} (re-evaluate with `mammo-tf evaluate-classifier`)")
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


def member_scores(frames: list[pd.DataFrame], level: str) -> pd.DataFrame:
    """The members' abnormal scores side by side (one column each) with the shared keys and logistic score."""
    _, column, keys = LEVELS[level]
    first = frames[0]
    for i, frame in enumerate(frames[1:], start=1):
        if len(frame) != len(first) or not frame[keys].equals(first[keys]):
            raise ValueError(f"{level} predictions of member {i} are not on the same test samples as member 0")
        # The logistic baseline is fitted on the training patches: equal scores mean equal training data.
        if not np.allclose(frame["score_logistic"], first["score_logistic"], atol=1e-6):
            raise ValueError(f"member {i} was not trained on member 0's patches (logistic baseline scores differ)")
    out = first[keys + ["score_logistic"]].copy()
    for i, frame in enumerate(frames):
        out[f"member{i}"] = frame[column].to_numpy()
    return out


def fold_aucs(scores: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Abnormal-vs-normal ROC AUC of each score column in each fold (rows: folds)."""
    from sklearn.metrics import roc_auc_score

    rows = {}
    for k, g in scores.groupby("fold"):
        y = (g["label_id"] > 0).to_numpy()
        rows[k] = {c: float(roc_auc_score(y, g[c])) if 0 < y.sum() < len(y) else float("nan") for c in columns}
    return pd.DataFrame.from_dict(rows, orient="index")


def evaluate(run_dirs: list[str | Path], out_dir: str | Path, command: str | None = None,
             n_boot: int = 2000, seed: int = 0) -> dict:
    """Replicates side by side and their mean score against the logistic baseline; writes metrics and figures."""
    from mammo_tf import bilateral
    from mammo_tf.metrics.classification import bootstrap_auc_ci, paired_differences
    from mammo_tf.plots.classification import plot_paired_folds

    t0 = time.perf_counter()
    dirs = [Path(d) for d in run_dirs]
    exps = check_replicates(dirs)
    names = [d.name for d in dirs]
    prov = provenance(command)
    common = {"command": prov["command"], "date": prov["date"],
              "hardware": hardware_label(prov)}
    members = [f"member{i}" for i in range(len(dirs))]
    values: dict[str, dict[str, Any]] = {n: {} for n in [*names, "ensemble", "logistic"]}
    pair_values: dict[str, dict[str, Any]] = {f"{b} minus {a}": {} for a, b in itertools.combinations(names, 2)}
    summary: dict[str, Any] = {}
    figure_folds: dict[str, dict[str, list[float]]] = {}
    spread = lambda v: [float(np.mean(v)), float(np.std(v, ddof=1))]  # noqa: E731
    for level in LEVELS:
        scores = member_scores([load_level(d, level) for d in dirs], level)
        scores["ensemble"] = scores[members].mean(axis=1)
        aucs = fold_aucs(scores, [*members, "ensemble", "score_logistic"])
        patients = scores["refnum"].map(bilateral.patient_of).to_numpy()
        y = (scores["label_id"] > 0).to_numpy()
        col = f"{LEVEL_NAMES[level]}: abnormal AUC"
        for name, c in [*zip(names, members), ("ensemble", "ensemble"), ("logistic", "score_logistic")]:
            values[name][col] = spread(aucs[c])
            if c == "score_logistic":
                continue
            d = paired_differences(aucs[c], aucs["score_logistic"])
            ci = bootstrap_auc_ci(y, scores[c], groups=patients, n_boot=n_boot, seed=seed,
                                  baseline=scores["score_logistic"], strata=scores["fold"].to_numpy())
            values[name][f"{LEVEL_NAMES[level]}: Δ vs logistic"] = [d["mean"], d["std"]]
            values[name][f"{LEVEL_NAMES[level]}: Δ 95 % CI"] = f"[{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]"
            summary.setdefault(level, {})[name] = {"fold_auc": aucs[c].tolist(), "minus_logistic": d,
                                                   "bootstrap": ci}
        summary.setdefault(level, {})["logistic"] = {"fold_auc": aucs["score_logistic"].tolist()}
        for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
            d = paired_differences(aucs[members[j]], aucs[members[i]])
            gap = (aucs[members[j]] - aucs[members[i]]).abs()
            pair_values[f"{b} minus {a}"].update({
                f"{LEVEL_NAMES[level]}: Δ abnormal AUC": [d["mean"], d["std"]],
                f"{LEVEL_NAMES[level]}: largest |Δ| in a fold": float(gap.max()),
                f"{LEVEL_NAMES[level]}: folds ahead": f"{d['ahead']}/{d['n']}"})
        short = [f"replicate {e.get('replicate', 0)}" for e in exps]
        figure_folds[level] = {name: aucs[c].tolist() for name, c in
                               [*zip(short, members), ("mean of replicates", "ensemble"), ("logistic", "score_logistic")]}
    n_folds = len(summary["patch"]["ensemble"]["fold_auc"])
    note = (f"{n_folds} patient folds' stored test predictions; mean ± std over folds; Δ: minus the logistic "
            f"regression on intensity features, per fold; CI: {n_boot} resamples of test patients within folds "
            "(models held fixed)")
    rows = []
    for name, vals in values.items():
        label = {"ensemble": f"mean score of the {len(names)} replicates (rule fixed in advance)",
                 "logistic": "logistic, intensity (the replicates' shared baseline)"}.get(
            name, f"{name} (replicate {exps[names.index(name)].get('replicate', 0)})" if name in names else name)
        rows.append({"table": TABLE, "row": label, "values": vals, "note": note, **common})
    for label, vals in pair_values.items():
        rows.append({"table": PAIR_TABLE, "row": label, "values": vals,
                     "note": f"{n_folds} shared patient folds; Δ: per-fold abnormal AUC difference, mean ± std", **common})
    out = Path(out_dir)
    for level, folds in figure_folds.items():
        fig = plot_paired_folds(folds, title=f"{exps[0]['name']}: replicates, their mean, intensity\n"
                                f"({LEVEL_NAMES[level]})", metric="abnormal-vs-normal AUC")
        save_figure(fig, out / f"replicate_folds_{level}.png")
    prov["wall_time_s"] = round(time.perf_counter() - t0, 1)
    metrics = {"runs": names, "experiments": exps, "summary": summary, "results": rows, "provenance": prov}
    save_json(out / "metrics.json", metrics)
    return metrics
