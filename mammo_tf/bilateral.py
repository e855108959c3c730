"""Each film against the same patient's other film: a bilateral film score from stored classifier outputs.

Radiologists read a mammogram beside the other breast's: a patient's overall density or exposure
raises or lowers both films, while a lesion is usually on one side. So, beside the max rule's
film score, a film is scored by how much it exceeds its contralateral film's (``score - other``).
The rule is fixed in advance (the max rule, no choice on any patients), both films of a patient
are always in the same test fold (folds are by patient), and the inputs are the per-film test
scores every classifier run stores (``fold*/film_predictions.csv``): no model is run again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammo_tf.config import provenance
from mammo_tf.io import load_json, save_figure, save_json

TABLE = "Classification, whole mammogram: each film against the patient's other film (max rule)"
SCORE = "abnormal_score"  # the max rule's film score, 1 - p(normal) of the most abnormal patch


def patient_of(refnum: str) -> int:
    """MIAS patient number of a film: mdb001 and mdb002 are patient 1 (left and right), and so on."""
    digits = str(refnum)[3:]
    if not (str(refnum).startswith("mdb") and digits.isdigit()):
        raise ValueError(f"not a MIAS film name: {refnum!r}")
    return (int(digits) + 1) // 2


def contralateral_difference(scores: pd.Series) -> pd.Series:
    """Film score minus the patient's other film's (index: refnums); NaN where the other film is absent."""
    patients = pd.Series([patient_of(r) for r in scores.index], index=scores.index)
    counts = patients.map(patients.value_counts())
    if (counts > 2).any():
        raise ValueError(f"more than two films for patients {sorted(set(patients[counts > 2]))}")
    total = scores.groupby(patients).transform("sum")
    return (2 * scores - total).where(counts == 2)


def fold_aucs(predictions: pd.DataFrame) -> dict[str, float]:
    """Abnormal-vs-normal AUC of one fold's test films: the max rule, and minus the other film."""
    from sklearn.metrics import roc_auc_score

    frame = predictions.set_index("refnum")
    y = (frame["label_id"] > 0).astype(int)
    diff = contralateral_difference(frame[SCORE])
    paired = diff.notna()
    auc = lambda yy, s: float(roc_auc_score(yy, s)) if 0 < yy.sum() < len(yy) else float("nan")  # noqa: E731
    return {"max": auc(y, frame[SCORE]), "bilateral": auc(y[paired], diff[paired]),
            "max_on_paired": auc(y[paired], frame.loc[paired, SCORE]), "n_films": int(len(frame)),
            "n_paired": int(paired.sum())}


def run_folds(model_dir: str | Path) -> list[dict[str, float]] | None:
    """`fold_aucs` of every fold of a classifier run, with its logistic baseline's (None without film predictions)."""
    paths = sorted(Path(model_dir).glob("fold*/film_predictions.csv"))
    if not paths:
        return None
    stored = {f["fold"]: f for f in load_json(Path(model_dir) / "metrics.json").get("folds", [])}
    out = []
    for path in paths:
        predictions = pd.read_csv(path)
        k = int(predictions["fold"].iloc[0])
        logistic = stored.get(k, {}).get("image", {}).get("logistic", {})
        out.append({"fold": k, **fold_aucs(predictions),
                    "logistic": float(logistic.get("abnormal_vs_normal_auc", float("nan")))})
    return out


def evaluate(models_dir: str | Path, out_dir: str | Path, command: str | None = None) -> dict:
    """Bilateral film AUCs of every classifier run under ``models_dir``, with report rows and a per-fold figure."""
    from mammo_tf.metrics.classification import paired_differences
    from mammo_tf.plots.classification import plot_paired_folds

    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {}
    for path in sorted(Path(models_dir).glob("*/metrics.json")):
        folds = run_folds(path.parent)
        if folds:
            runs[path.parent.name] = folds
    if not runs:
        raise ValueError(f"{models_dir}: no classifier run with stored film predictions")
    prov = provenance(command)
    common = {"table": TABLE, "command": prov["command"], "date": prov["date"],
              "hardware": f"{prov['hardware']['cpu']} ({prov['hardware']['cpu_count']} cores)"}
    rows, summary = [], {}
    for name, folds in runs.items():
        mx, bi = [f["max"] for f in folds], [f["bilateral"] for f in folds]
        d = paired_differences(bi, mx)
        # One fold (the small setting) has no spread: NaN, without numpy's degrees-of-freedom warning.
        spread = lambda v: [float(np.nanmean(v)), float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1  # noqa: E731
                            else float("nan")]
        summary[name] = {"folds": folds, "difference": d}
        rows.append({**common, "row": name, "values": {
            "max rule AUC": spread(mx), "minus other film AUC": spread(bi), "Δ AUC": [d["mean"], d["std"]],
            "folds ahead (bilateral)": f"{d['ahead']}/{d['n']}",
            "logistic (intensity) AUC": spread([f["logistic"] for f in folds])},
            "note": f"{len(folds)} patient folds' test films (as stored by the run); abnormal vs normal; "
                    "Δ: bilateral minus max, per fold; rule fixed in advance"})
    out = Path(out_dir)
    fig = plot_paired_folds({n: [f["bilateral"] - f["max"] for f in runs[n]] for n in runs},
                            title="Whole-film AUC, film minus the other film, minus the max rule's",
                            metric="Δ abnormal AUC (bilateral - max)", chance=0.0, chance_label="no change")
    save_figure(fig, out / "bilateral_folds.png")
    prov["wall_time_s"] = round(time.perf_counter() - t0, 1)
    metrics = {"runs": summary, "results": rows, "provenance": prov}
    save_json(out / "metrics.json", metrics)
    return metrics


def add_cli(sub: Any) -> None:
    """The ``bilateral`` subcommand."""
    p = sub.add_parser("bilateral", help="whole-film AUC of each film minus the patient's other film (stored outputs)")
    p.add_argument("--models", default="models")
    p.add_argument("--out", default="models/bilateral_films")
    p.set_defaults(func=_cli)


def _cli(args: Any) -> int:
    from mammo_tf.cli import _command

    metrics = evaluate(args.models, args.out, command=_command())
    for row in metrics["results"]:
        v = row["values"]
        print(f"{row['row']:32s} max {v['max rule AUC'][0]:.3f}  bilateral {v['minus other film AUC'][0]:.3f}  "
              f"Δ {v['Δ AUC'][0]:+.3f} ± {v['Δ AUC'][1]:.3f} ({v['folds ahead (bilateral)']})")
    return 0

