"""Two detectors on the same test lesions: which lesions does each find, and is the difference chance?

Each evaluated detector keeps, per test lesion, whether it was found at its own threshold for at
most one false positive per image (``lesions_found.csv``, keyed by fold, film, crop position and the
lesion's place among its film's lesions). Two runs cut the same test samples when their keys agree
fold by fold; then every lesion is a pair of outcomes, and an exact sign test over lesions
(McNemar's test where each lesion is one pair) says whether one run finds more than the other beyond
chance. A lesion seen in several crops is one trial, since its crops are not independent, won by the
run that finds it in more of them. Folds present in one run only are left out.

Two further readings guard the lesion-level p. Lesions of one patient (several in one film, or one
in each breast) are not independent either, so the same sign test is also run over patients, each
won by the run that wins more of the patient's lesions. And the per-group p-values (lesion type,
tissue, severity, size: 14 groups or so) come with Benjamini-Hochberg q-values over those groups
(``scipy.stats.false_discovery_control``): a group's p alone tests nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control

from mammo_tf import detector as D
from mammo_tf.config import from_dict, hardware_label, provenance
from mammo_tf.data import mias
from mammo_tf.io import load_json, save_figure, save_json

TABLE = "Detection: two detectors on the same test lesions, found at 1 false positive per image (paired)"
BOXED_TABLE = "Detection: two detectors on the same test lesions, boxed at IoU >= {:g} at 1 false positive per image (paired)"
ALL = "all lesions"


def load_lesions(run_dir: Path, min_iou: float | None = None) -> pd.DataFrame:
    """A detector run's per-lesion outcomes (ValueError where it has none: evaluate it again); with ``min_iou``,
    ``found`` only where the lesion's hit box also overlaps it by that IoU."""
    path = Path(run_dir) / D.LESIONS_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir}: no {D.LESIONS_FILE}; run `mammo-tf evaluate-detector` (or "
                         "`evaluate-detector-arrays`) on it again")
    lesions = pd.read_csv(path)
    if min_iou is None:
        return lesions
    if not 0.0 < min_iou <= 1.0:
        raise ValueError(f"min_iou must be in (0, 1], got {min_iou}")
    if "hit_iou" not in lesions:
        raise ValueError(f"{run_dir}: its {D.LESIONS_FILE} has no hit_iou (evaluated before it was kept); "
                         "run `mammo-tf evaluate-detector` on it again")
    # hit_iou is empty (NaN) for a lesion not found, and NaN >= x is False.
    return lesions.assign(found=lesions["found"].astype(bool) & (lesions["hit_iou"] >= min_iou))


def pair_lesions(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """One row per test lesion of the folds both runs have: ``found_a``, ``found_b`` (ValueError if they differ)."""
    keys = list(D.LESION_KEYS)
    folds = sorted(set(a["fold"]) & set(b["fold"]))
    if not folds:
        raise ValueError("the two runs share no fold")
    a, b = (x[x["fold"].isin(folds)] for x in (a, b))
    for x, name in ((a, "first"), (b, "second")):
        if x.duplicated(keys).any():
            raise ValueError(f"the {name} run lists a lesion twice")
    pairs = a[keys + ["found"]].merge(b[keys + ["found"]], on=keys, how="outer", suffixes=("_a", "_b"),
                                      indicator=True)
    odd = pairs[pairs["_merge"] != "both"]
    if len(odd):
        fold = int(odd["fold"].iloc[0])
        raise ValueError(f"the runs do not cut the same test samples: {len(odd)} lesions of folds {folds} are "
                         f"in one run only (first in fold {fold}, {odd['refnum'].iloc[0]})")
    return pairs.drop(columns="_merge").astype({"found_a": bool, "found_b": bool})


def sign_test(found_a: np.ndarray, found_b: np.ndarray, lesion: np.ndarray | None = None,
              patient: np.ndarray | None = None) -> dict[str, Any]:
    """Paired counts and a two-sided exact sign test over lesions (McNemar's when each lesion is one pair).

    ``lesion``: which lesion each pair is; a lesion seen in several crops is one trial, won by the run
    that finds it in more of them, since its crops are not independent. ``patient``: which patient each
    pair belongs to; adds the same test over patients (``p_patients``), each won by the run that wins
    more of its lesions. A p is 1.0 when nothing differs.
    """
    found_a, found_b = np.asarray(found_a, bool), np.asarray(found_b, bool)
    diff = pd.Series(found_a.astype(int) - found_b.astype(int))
    lesion = np.asarray(lesion) if lesion is not None else np.arange(len(diff))
    per_lesion = np.sign(diff.groupby(lesion).mean())
    a_more, b_more, p = _signs(per_lesion)
    out = {"n": len(found_a), "found_a": int(found_a.sum()), "found_b": int(found_b.sum()),
           "only_a": int((found_a & ~found_b).sum()), "only_b": int((found_b & ~found_a).sum()),
           "n_lesions": len(per_lesion), "a_more": a_more, "b_more": b_more, "p": p}
    if patient is not None:
        patient_of = pd.Series(np.asarray(patient)).groupby(lesion)  # same groups, same order as per_lesion
        if (patient_of.nunique() > 1).any():
            raise ValueError("a lesion is listed under two patients")
        per_patient = per_lesion.groupby(patient_of.first().to_numpy()).sum()
        a_pat, b_pat, p_pat = _signs(per_patient)
        out.update(n_patients=len(per_patient), a_more_patients=a_pat, b_more_patients=b_pat, p_patients=p_pat)
    return out


def _signs(scores: pd.Series) -> tuple[int, int, float]:
    """Units won by each side and the two-sided exact binomial p over the units that differ."""
    from scipy.stats import binomtest

    a_more, b_more = int((scores > 0).sum()), int((scores < 0).sum())
    p = binomtest(a_more, a_more + b_more, 0.5).pvalue if a_more + b_more else 1.0
    return a_more, b_more, float(p)


def compare(pairs: pd.DataFrame, annotations: pd.DataFrame) -> dict[str, dict[str, dict]]:
    """`sign_test` for all lesions and per lesion group (`detector.lesion_groups`)."""
    located = annotations[annotations["has_location"]].assign(lesion=D.lesion_numbers(annotations))
    lesions = pairs[["refnum", "lesion"]].merge(located, on=["refnum", "lesion"], how="left", validate="many_to_one")
    if lesions["abnormality"].isna().any():
        raise ValueError("the lesion keys do not match these annotations (another Info.txt?)")
    found_a, found_b = pairs["found_a"].to_numpy(), pairs["found_b"].to_numpy()
    # One trial per lesion, across folds too (a leaky split can put crops of one lesion in several).
    lesion = (pairs["refnum"] + "/" + pairs["lesion"].astype(str)).to_numpy()
    patient = lesions["patient_id"].to_numpy()
    out: dict[str, dict[str, dict]] = {ALL: {ALL: sign_test(found_a, found_b, lesion, patient)}}
    for group, key in D.lesion_groups(lesions).items():
        for value, g in lesions.groupby(key, sort=True, observed=True):
            idx = g.index.to_numpy()
            out.setdefault(group, {})[str(value)] = sign_test(found_a[idx], found_b[idx], lesion[idx], patient[idx])
    subgroups = [c for group, cells in out.items() if group != ALL for c in cells.values()]
    for cell, q in zip(subgroups, false_discovery_control([c["p"] for c in subgroups], method="bh")):
        cell["q"] = float(q)
    return out


def evaluate(run_dirs: list[str | Path], out_dir: str | Path, command: str | None = None,
             min_iou: float | None = None) -> dict:
    """Compare two evaluated detector runs lesion by lesion (found: box centre in the lesion, and with ``min_iou``
    its box overlapping it by that IoU too); write metrics.json and a figure to ``out_dir``."""
    from mammo_tf.plots import detection as dplots

    if len(run_dirs) != 2:
        raise ValueError(f"a paired comparison takes two detector runs, got {len(run_dirs)}")
    dirs = [Path(d) for d in run_dirs]
    exps = [from_dict(D.DetectorExperiment, load_json(d / "metrics.json")["experiment"]) for d in dirs]
    if exps[0].protocol != exps[1].protocol:
        raise ValueError(f"{dirs[0].name} is {exps[0].protocol}, {dirs[1].name} {exps[1].protocol}: "
                         "not the same test samples")
    pairs = pair_lesions(*(load_lesions(d, min_iou) for d in dirs))
    table = compare(pairs, mias.load_annotations(exps[0].data))
    names = [e.name for e in exps]
    prov = provenance(command)
    folds = sorted(int(f) for f in set(pairs["fold"]))
    what = ("located test lesions" if exps[0].protocol == "whole" else
            "lesions in the test crops (one seen in several crops counts in each)")
    note = (f"{what} of folds {', '.join(map(str, folds))} (those both runs have), each run at its own threshold "
            "for at most 1 false positive per image; p: two-sided exact sign test over lesions (McNemar's "
            "where each lesion is seen once; a lesion in several crops counts once, for the run that finds it "
            "in more of them); q: Benjamini-Hochberg over the lesion groups (all lesions excepted); patients: "
            "the same test with each patient one trial, won by the run that wins more of its lesions"
            + (f"; found: box centre in the lesion and IoU >= {min_iou:g} with it" if min_iou is not None else ""))
    found = "found" if min_iou is None else f"boxed at IoU >= {min_iou:g}"
    title = TABLE if min_iou is None else BOXED_TABLE.format(min_iou)
    common = {"table": title, "command": prov["command"], "hardware": hardware_label(prov), "date": prov["date"],
              "note": note}
    cells = [c for g in table.values() for c in g.items()]
    results = [{**common, "row": f"{name}: {found}", "values": {v: f"{c[key]}/{c['n']}" for v, c in cells}}
               for name, key in zip(names, ("found_a", "found_b"))]
    results.append({**common, "row": f"sign test p (lesions {found} more often by {names[0]} / by {names[1]})",
                    "values": {v: f"{c['p']:.3g} ({c['a_more']} / {c['b_more']})" for v, c in cells}})
    results.append({**common, "row": f"sign test q over the lesion groups (Benjamini-Hochberg; {names[0]} / {names[1]})",
                    "values": {v: f"{c['q']:.3g}" for v, c in cells if "q" in c}})
    finds = "finds" if min_iou is None else f"boxes at IoU >= {min_iou:g}"
    results.append({**common, "row": f"sign test over patients p (patients whose lesions {names[0]} / {names[1]} "
                                     f"{finds} more often)",
                    "values": {v: f"{c['p_patients']:.3g} ({c['a_more_patients']} / {c['b_more_patients']})"
                               for v, c in cells}})
    metrics = {"runs": [str(d) for d in dirs], "names": names, "protocol": exps[0].protocol, "folds": folds,
               "min_iou": min_iou,
               "table": table, "results": results, "provenance": prov}
    out = Path(out_dir)
    save_figure(dplots.plot_paired_lesions(table, names, found), out / "paired_lesions.png")
    save_json(out / "metrics.json", metrics)
    return metrics
