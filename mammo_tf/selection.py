"""Which recipe? One chosen per fold on validation patients, so choosing among many costs no test data.

Many CNN recipes were trained on the same patient folds. Reporting the one with the best test numbers
overstates it: that choice was made on the test patients. Here each fold's recipe is the one whose
fold model scores that fold's *validation* patients best (patients held out of its training data and,
with ``early_stopping: false``, never used to steer it), and what gets reported is that model's stored
test predictions, paired with the intensity logistic regression fitted on the same training patches:

* patch level: abnormal-vs-normal AUC on the validation patients' grid_keep patches (the fold models
  are run on them here), and the chosen model's grid_keep test patches;
* film level: the max rule's validation-film AUC, which every run stored when it chose its film rule,
  and the chosen model's max-rule test films.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammo_tf import bilateral, ensemble, patches
from mammo_tf.config import from_dict, hardware_label, provenance
from mammo_tf.data import mias, splits
from mammo_tf.io import atomic_path, load_json, save_figure, save_json

TABLE = "Classification: recipe chosen per fold on validation patients (nested selection)"
SUBGROUP_TABLE = ("Classification: recipe chosen per fold on validation patients, by lesion type and breast tissue "
                  "(grid_keep test patches, folds pooled)")
# What must agree for runs to be candidates on the same folds, validation patients and test samples.
SHARED = ("seed", "folds", "val_fraction", "size", "max_films", "max_folds")
# Per level: the stored test predictions' abnormal score, and how the level is named in the rows.
SCORES = {"patch": "score_cnn", "film": "abnormal_score"}


def check_candidates(run_dirs: list[Path]) -> list[dict]:
    """The runs' experiments, after checking they are patch CNNs on the same folds (ValueError if not)."""
    if len(run_dirs) < 2:
        raise ValueError("a selection needs at least two candidate runs")
    exps = [ensemble.stored_experiment(d) for d in run_dirs]
    for d, e in zip(run_dirs, exps):
        if e.get("classifier", "cnn") != "cnn" or e.get("strategy") == patches.WHOLE:
            raise ValueError(f"{d}: candidates are patch CNN runs (got {e.get('classifier', 'cnn')}, "
                             f"strategy {e.get('strategy')})")
        if (e.get("train") or {}).get("early_stopping"):
            raise ValueError(f"{d}: trained with early stopping on its validation patients, which then "
                             "cannot choose among recipes without bias")
        diff = [k for k in SHARED if e.get(k) != exps[0].get(k)]
        if diff:
            raise ValueError(f"{d} is not on {run_dirs[0]}'s folds: {', '.join(diff)} differ")
    return exps


def validation_records(ann: pd.DataFrame, grid: pd.DataFrame, exp: dict, k: int) -> pd.DataFrame:
    """Fold ``k``'s validation patients' labelled grid patches: the ones `classify.run_fold` held out."""
    train_pat, _ = splits.patient_folds(ann, n_splits=exp["folds"], seed=exp["seed"])[k]
    _, va_pat = splits.train_val_split(ann, train_pat, exp["val_fraction"], seed=exp["seed"] + k)
    return grid[grid["patient_id"].isin(va_pat) & (grid["label_id"] >= 0)].reset_index(drop=True)


def validation_patch_aucs(run_dirs: list[Path], batch_size: int = 256) -> pd.DataFrame:
    """Abnormal-vs-normal AUC of every run's fold model on its fold's validation grid patches (rows: folds)."""
    from mammo_tf import classify
    from mammo_tf.metrics.classification import safe_roc_auc

    exps = check_candidates(run_dirs)
    exp = exps[0]
    ann = mias.load_annotations()
    if exp.get("max_films"):
        subset = classify.films_subset(ann, from_dict(classify.ClassifierExperiment, exp))
        ann = ann[ann["refnum"].isin(subset)].reset_index(drop=True)
    films = patches.FilmCache()
    grid = patches.cut_patches(ann, "grid_keep", exp["size"], seed=exp["seed"], films=films)
    n_folds = min(exp["folds"], exp.get("max_folds") or exp["folds"])
    table: dict[int, dict[str, float]] = {}
    for k in range(n_folds):
        val = validation_records(ann, grid, exp, k)
        y = (val["label_id"] > 0).to_numpy()
        print(f"[mammo-tf] selection: fold {k}, {len(val)} validation patches ({int(y.sum())} abnormal), "
              f"{len(run_dirs)} models", flush=True)
        table[k] = {}
        for d in run_dirs:
            proba = classify.predict_patches(classify.load_fold_model(d / f"fold{k}"), val, films, batch_size)
            table[k][d.name] = safe_roc_auc(y, 1.0 - proba[:, 0])
    return pd.DataFrame.from_dict(table, orient="index")


def validation_film_aucs(run_dirs: list[Path]) -> pd.DataFrame:
    """The max rule's AUC on each fold's validation films, as every run stored it (rows: folds)."""
    table: dict[str, dict[int, float]] = {}
    for d in run_dirs:
        folds = load_json(d / "metrics.json").get("folds", [])
        try:
            table[d.name] = {f["fold"]: float(f["film_rule"]["validation_abnormal_auc"]["max"]) for f in folds}
        except KeyError as err:
            raise ValueError(f"{d}: no stored validation-film AUC (re-evaluate with `mammo-tf evaluate-classifier`)"
                             ) from err
    return pd.DataFrame(table)[[d.name for d in run_dirs]]


def choose(validation: pd.DataFrame) -> pd.Series:
    """Each fold's run with the highest validation AUC (the first in candidate order on a tie; NaN never wins)."""
    if validation.isna().all(axis=1).any():
        raise ValueError("a fold has no validation AUC for any candidate")
    return validation.apply(lambda row: row.index[int(np.nanargmax(row.to_numpy()))], axis=1)


def chosen_predictions(frames: dict[str, pd.DataFrame], choice: pd.Series, level: str) -> pd.DataFrame:
    """Each fold's test rows from the run chosen for it, after checking every run scored the same samples."""
    names = list(frames)
    first = frames[names[0]]
    keys = ["refnum", "label_id", "fold"]
    for name in names[1:]:
        if len(frames[name]) != len(first) or not frames[name][keys].equals(first[keys]):
            raise ValueError(f"{level} test predictions of {name} are not on {names[0]}'s test samples")
    parts = []
    for k, name in choice.items():
        part = frames[name][frames[name]["fold"] == k]
        parts.append(part[keys + ["score_logistic"]].assign(score=part[SCORES[level]].to_numpy(), run=name))
    return pd.concat(parts, ignore_index=True)


def subgroups(chosen: pd.DataFrame, annotations: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Chosen model against its logistic baseline on the patches of each lesion type and each breast tissue."""
    from mammo_tf.metrics.classification import bootstrap_auc_ci, safe_roc_auc

    films = mias.images_table(annotations).set_index("refnum")
    lesion_type = annotations[annotations["label_id"] > 0].drop_duplicates("refnum").set_index("refnum")["abnormality"]
    y = (chosen["label_id"] > 0).to_numpy()
    kind, tissue = chosen["refnum"].map(lesion_type).to_numpy(), chosen["refnum"].map(films["tissue"]).to_numpy()
    # A lesion type's abnormal patches against every normal patch; a tissue's patches against each other.
    masks = {f"{a} ({mias.ABNORMALITY_NAMES[a]}) vs all normal patches": ~y | (kind == a)
             for a in mias.ABNORMALITIES if a != "NORM"}
    masks.update({f"{name} breasts": tissue == code for code, name in mias.TISSUES.items()})
    patients = chosen["refnum"].map(bilateral.patient_of).to_numpy()
    out = {}
    for name, mask in masks.items():
        yy = y[mask]
        if yy.sum() < 2 or (~yy).sum() < 2:
            continue
        sub = chosen[mask]
        ci = bootstrap_auc_ci(yy, sub["score"], groups=patients[mask], n_boot=n_boot, seed=seed,
                              baseline=sub["score_logistic"])
        out[name] = {"n_abnormal": int(yy.sum()), "n_normal": int((~yy).sum()),
                     "auc": safe_roc_auc(yy, sub["score"]), "auc_logistic": safe_roc_auc(yy, sub["score_logistic"]),
                     "difference": ci}
    return out


def evaluate(run_dirs: list[str | Path], out_dir: str | Path, command: str | None = None,
             validation: dict[str, pd.DataFrame] | None = None, n_boot: int = 2000, seed: int = 0,
             annotations: pd.DataFrame | None = None) -> dict:
    """Choose each fold's recipe on validation patients, score the choice on test patients; write metrics, figure."""
    from mammo_tf.metrics.classification import bootstrap_auc_ci, paired_differences
    from mammo_tf.plots.classification import plot_validation_vs_test

    t0 = time.perf_counter()
    dirs = [Path(d) for d in run_dirs]
    check_candidates(dirs)
    names = [d.name for d in dirs]
    if validation is None:
        validation = {"patch": validation_patch_aucs(dirs), "film": validation_film_aucs(dirs)}
    prov = provenance(command)
    common = {"command": prov["command"], "date": prov["date"],
              "hardware": hardware_label(prov)}
    spread = lambda v: [float(np.mean(v)), float(np.std(v, ddof=1))]  # noqa: E731
    summary: dict[str, Any] = {}
    values: dict[str, dict[str, Any]] = {"chosen": {}, "logistic": {}, "best on test": {}}
    panels = {}
    for level, val in validation.items():
        val = val[names]
        frames = {d.name: ensemble.load_level(d, level) for d in dirs}
        test = pd.DataFrame({n: ensemble.fold_aucs(f, [SCORES[level]])[SCORES[level]] for n, f in frames.items()})
        test = test.loc[val.index]
        choice = choose(val)
        chosen = chosen_predictions(frames, choice, level)
        aucs = ensemble.fold_aucs(chosen, ["score", "score_logistic"])
        d = paired_differences(aucs["score"], aucs["score_logistic"])
        patients = chosen["refnum"].map(bilateral.patient_of).to_numpy()
        ci = bootstrap_auc_ci((chosen["label_id"] > 0).to_numpy(), chosen["score"], groups=patients, n_boot=n_boot,
                              seed=seed, baseline=chosen["score_logistic"], strata=chosen["fold"].to_numpy())
        # For contrast: the run whose mean test AUC is highest, a choice made on the test patients.
        best = str(test.mean().idxmax())
        where = ensemble.LEVEL_NAMES[level]
        values["chosen"].update({f"{where}: abnormal AUC": spread(aucs["score"]),
                                 f"{where}: Δ vs logistic": [d["mean"], d["std"]],
                                 f"{where}: folds ahead": f"{d['ahead']}/{d['n']}",
                                 f"{where}: Δ 95 % CI": f"[{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]",
                                 f"{where}: runs chosen (fold 0, 1, ...)": ", ".join(choice)})
        values["logistic"][f"{where}: abnormal AUC"] = spread(aucs["score_logistic"])
        values["best on test"].update({f"{where}: abnormal AUC": spread(test[best]),
                                       f"{where}: runs chosen (fold 0, 1, ...)": best})
        summary[level] = {"validation_auc": val.to_dict(), "test_auc": test.to_dict(), "chosen": choice.tolist(),
                          "fold_auc": aucs["score"].tolist(), "logistic_fold_auc": aucs["score_logistic"].tolist(),
                          "minus_logistic": d, "bootstrap": ci, "best_on_test": best,
                          "rank_correlation": _rank_correlation(val, test)}
        values["chosen"][f"{where}: validation-test rank correlation"] = summary[level]["rank_correlation"]["mean"]
        if level == "patch":
            summary["patch_subgroups"] = subgroups(chosen, annotations if annotations is not None
                                                   else mias.load_annotations(), n_boot=n_boot // 2, seed=seed)
        panels[where] = (val, test, choice)
    n_folds = len(next(iter(validation.values())))
    note = (f"{len(names)} candidate runs on the same {n_folds} patient folds; each fold's run has the best "
            "validation-patient AUC (patches: grid_keep patches of the validation patients, scored here; films: "
            "max rule, as stored by each run); mean ± std over folds; Δ: minus the logistic regression on "
            "intensity features fitted on the chosen run's training patches (films: its training films), per fold; "
            f"CI: {n_boot} resamples of "
            "test patients within folds; rank correlation: Spearman's, validation vs test AUC over the runs, mean "
            "over folds")
    labels = {"chosen": "recipe chosen per fold on validation patients",
              "logistic": "logistic, intensity (the chosen run's own baseline, same training patients)",
              "best on test": "best mean test AUC of the candidates (chosen on test patients: optimistic)"}
    rows = [{"table": TABLE, "row": labels[key], "values": vals, "note": note, **common} for key, vals in values.items()]
    sub_note = (f"the chosen fold models' test patches, folds pooled (a type is missing from some folds); CI: "
                f"{n_boot // 2} resamples of test patients; no correction for the {len(summary.get('patch_subgroups', {}))} "
                "groups")
    rows += [{"table": SUBGROUP_TABLE, "row": name, "note": sub_note, **common,
              "values": {"abnormal patches": g["n_abnormal"], "normal patches": g["n_normal"], "CNN AUC": g["auc"],
                         "logistic AUC": g["auc_logistic"], "Δ AUC": g["difference"]["auc_difference"],
                         "Δ 95 % CI": f"[{g['difference']['ci_low']:.3f}, {g['difference']['ci_high']:.3f}]"}}
             for name, g in summary.get("patch_subgroups", {}).items()]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for level, val in validation.items():
        with atomic_path(out / f"validation_auc_{level}.csv") as tmp:
            val[names].to_csv(tmp, index_label="fold")
    save_figure(plot_validation_vs_test(panels), out / "validation_vs_test.png")
    prov["wall_time_s"] = round(time.perf_counter() - t0, 1)
    metrics = {"runs": names, "summary": summary, "results": rows, "provenance": prov}
    save_json(out / "metrics.json", metrics)
    return metrics


def _rank_correlation(validation: pd.DataFrame, test: pd.DataFrame) -> dict:
    """Spearman correlation between the runs' validation and test AUCs, per fold and its mean."""
    from scipy.stats import spearmanr

    per_fold = [float(spearmanr(validation.loc[k], test.loc[k]).statistic) for k in validation.index]
    return {"per_fold": per_fold, "mean": float(np.nanmean(per_fold))}
