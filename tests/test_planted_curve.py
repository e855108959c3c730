"""The contrast curve: planted runs gathered by contrast and draw, the real lesions beside, from stored metrics."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mammo_tf import detector as D
from mammo_tf import patches as P
from mammo_tf import planted, planted_curve
from mammo_tf.cli import main
from mammo_tf.io import save_json


def _run(root: Path, name: str, sensitivities: list[float], found: int, contrast: float | None = 27.0,
         seed: int = 0, **changes) -> Path:
    """A detector run folder holding only what the curve reads: experiment, folds, lesions found."""
    exp = D.DetectorExperiment(**{"name": name, "protocol": "whole", "planted_contrast": contrast, "seed": seed, **changes})
    folds = [{"fold": k, "model": {"sens_at_1fp": s}, "random_boxes_random_class": {"sens_at_1fp": 0.05}}
             for k, s in enumerate(sensitivities)]
    save_json(root / name / "metrics.json", {"experiment": dataclasses.asdict(exp), "folds": folds,
                                             "lesions_found": {"abnormality": {"CIRC": {"n": 8, "found": found},
                                                                               "CALC": {"n": 2, "found": 0}}}})
    return root / name


def test_draws_of_one_contrast_are_averaged_and_the_real_lesions_sit_at_their_measured_contrast(tmp_path, annotations):
    runs = [_run(tmp_path, "p27_s0", [0.2, 0.4], 3), _run(tmp_path, "p27_s1", [0.6, 0.8], 7, seed=1),
            _run(tmp_path, "p54_s0", [0.5, 0.7], 6, contrast=54.0)]
    real = _run(tmp_path, "real", [0.1, 0.3], 2, contrast=None)
    some = annotations[annotations["refnum"] <= "mdb075"]  # masses, two asymmetries, one film with two lesions
    # Its test lesions (keyed as a detector run keeps them): found exactly when brighter than the median lesion.
    measured = planted.lesion_contrasts(some, P.FilmCache(P.film_loader()))
    bright = measured["contrast"] > measured["contrast"].median()
    measured.assign(fold=0, crop_top=0, crop_left=0, found=bright, found_random=False)[list(D.LESION_KEYS) + [
        "found", "found_random"]].to_csv(real / D.LESIONS_FILE, index=False)
    # Another whole-film detector (any recipe) that finds exactly the dim ones.
    other = _run(tmp_path, "other", [0.5, 0.5], 5, contrast=None, image_size=512)
    measured.assign(fold=0, crop_top=0, crop_left=0, found=~bright, found_random=False)[list(D.LESION_KEYS) + [
        "found", "found_random"]].to_csv(other / D.LESIONS_FILE, index=False)
    metrics = planted_curve.evaluate(runs, tmp_path / "curve", command="pytest", real=real, compare=[other],
                                     annotations=some)
    rows = {r["row"].split(" (")[0]: r["values"] for r in metrics["results"]}
    # 27: draws 0.3 and 0.7, their mean 0.5 and spread sqrt(2 * 0.2^2 / 1); the counts pooled over the draws.
    r27 = rows["planted masses of contrast 27"]
    assert r27["sensitivity at 1 FP/image"] == pytest.approx([0.5, math.sqrt(0.08)])
    assert r27["per draw"] == "0.300 ± 0.141 (seed 0) / 0.700 ± 0.141 (seed 1)"
    assert r27["found (draws pooled)"] == "10/20" and r27["random boxes"][0] == pytest.approx(0.05)
    # One draw has no spread between draws.
    mean54, spread54 = rows["planted masses of contrast 54"]["sensitivity at 1 FP/image"]
    assert mean54 == pytest.approx(0.6) and math.isnan(spread54)
    # The real lesions: the run's folds, at the contrast that `lesion_contrasts` measures on these films.
    assert len(measured) >= 12 and measured.groupby("refnum")["lesion"].max().max() == 1  # mdb005 has two
    summary = planted.contrast_summary(measured)["all"]
    assert metrics["real_lesions"]["contrast"] == summary
    # Found per quartile of the measured contrast: the two dim ones none, the two bright ones all; the tests see it.
    result = metrics["real_lesions"]["by_contrast"]
    bins = result["bins"]
    assert [b["found"] for b in bins] == [0, 0, bins[2]["n"], bins[3]["n"]] and sum(b["n"] for b in bins) == len(measured)
    assert bins[0]["label"] == f"contrast <= {summary['q25']:.1f}" and bins[3]["label"] == f"contrast > {summary['q75']:.1f}"
    assert [b["median"] for b in bins] == sorted(b["median"] for b in bins)
    assert sum(sum(b["abnormality"].values()) for b in bins) == len(measured) and "ASYM" in str(bins)
    assert result["p"] < 0.01 and result["n_found"] == int(bright.sum()) and result["n"] == len(measured)
    assert result["masses"]["n"] == int(measured["abnormality"].isin(planted_curve.MASSES).sum()) < len(measured)
    assert result["p_contrast_beyond_size"] < 0.01 < result["p_size_beyond_contrast"]
    # The compared run in the same bins, the other way round.
    compared = metrics["compared"]["other"]["bins"]
    assert [b["label"] for b in compared] == [b["label"] for b in bins]
    assert [b["found"] for b in compared] == [bins[0]["n"], bins[1]["n"], 0, 0]
    by_bin = {r["row"]: r["values"] for r in metrics["results"] if r["table"] == planted_curve.REAL_TABLE}
    assert list(by_bin) == ["real", "other"] and list(by_bin["real"])[:4] == [b["label"] for b in bins]
    (real_row,) = [r for r in metrics["results"] if r["row"].startswith("real lesions (real)")]
    assert f"contrast median {summary['median']:.1f}" in real_row["row"] and f"({summary['n']} measured)" in real_row["row"]
    assert real_row["values"]["sensitivity at 1 FP/image"] == pytest.approx([0.2, math.sqrt(0.02)])
    assert real_row["values"]["found (draws pooled)"] == "2/10"
    assert len(metrics["folds"]) == 6
    assert {r["table"] for r in metrics["results"]} == {planted_curve.TABLE, planted_curve.REAL_TABLE}
    assert (tmp_path / "curve" / "planted_contrast.png").is_file() and (tmp_path / "curve" / "found_by_contrast.png").is_file()
    stored = json.loads((tmp_path / "curve" / "metrics.json").read_text())
    assert [r["row"] for r in stored["results"]] == [r["row"] for r in metrics["results"]]


def test_only_planted_runs_of_one_recipe_and_a_real_run_of_it_are_gathered(tmp_path):
    ok = _run(tmp_path, "ok", [0.5], 4)
    with pytest.raises(ValueError, match="real is not a planted-mass run"):
        planted_curve.evaluate([ok, _run(tmp_path, "real", [0.1], 1, contrast=None)], tmp_path / "out")
    with pytest.raises(ValueError, match="p81 is a planted-mass run, not the real lesions"):
        planted_curve.evaluate([ok], tmp_path / "out", real=_run(tmp_path, "p81", [0.9], 8, contrast=81.0))
    other = _run(tmp_path, "big", [0.5], 4, contrast=40.0, image_size=512)
    with pytest.raises(ValueError, match="big is not ok's recipe \\(differs in image_size\\)"):
        planted_curve.evaluate([ok, other], tmp_path / "out")
    crops = _run(tmp_path, "crops", [0.5], 4, contrast=None, protocol="crops")
    with pytest.raises(ValueError, match="crops did not search whole films"):
        planted_curve.evaluate([ok], tmp_path / "out", compare=[crops])
    assert not (tmp_path / "out").exists()


def test_the_command_prints_each_contrast(tmp_path, capsys):
    runs = [_run(tmp_path, "p27", [0.25, 0.35], 3), _run(tmp_path, "p40", [0.5, 0.6], 5, contrast=40.0)]
    assert main(["contrast-curve", "--models", *map(str, runs), "--out", str(tmp_path / "curve")]) == 0
    out = capsys.readouterr().out
    assert "planted masses of contrast 27 (1 draw):\n  sensitivity at 1 FP/image: 0.300\n" in out
    assert "planted masses of contrast 40 (1 draw)" in out and "real lesions" not in out


def test_the_likelihood_ratio_p_is_the_g_test_of_a_two_by_two_table():
    """With one binary covariate and nothing else kept, the nested logistic regressions' likelihood ratio is the
    G statistic of the 2x2 table (scipy's chi2_contingency, log-likelihood, uncorrected)."""
    from scipy.stats import chi2_contingency

    x = np.array([0] * 20 + [1] * 20)
    y = np.array([1] * 4 + [0] * 16 + [1] * 12 + [0] * 8, bool)
    table = [[int(np.sum((x == a) & (y == b))) for b in (False, True)] for a in (0, 1)]
    expected = chi2_contingency(table, correction=False, lambda_="log-likelihood").pvalue
    assert planted_curve.nested_lr_p(y, x, np.zeros(len(y))) == pytest.approx(expected, rel=1e-4)
    assert planted_curve.nested_lr_p(y, np.zeros(len(y)), x) == pytest.approx(1.0)  # a constant adds nothing
    assert math.isnan(planted_curve.nested_lr_p(np.ones(5, bool), np.arange(5), np.zeros(5)))  # nothing missed
