"""Planted masses: their contrast, where they go, and that their runs never mix with the real lesions'."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mammo_tf import detector as D
from mammo_tf import patches as P
from mammo_tf import planted
from mammo_tf.config import ConfigError
from mammo_tf.data import mias


@pytest.mark.parametrize("contrast", [10.0, 27.0, 81.0])
def test_a_planted_mass_has_the_contrast_asked_for_and_the_film_is_a_copy(contrast):
    film = np.full((200, 200), 60, np.uint8)
    out = planted.plant_mass(film, 100.0, 90.0, 20.0, contrast)
    assert film.max() == 60 and out is not film
    mask = np.ones(film.shape, bool)
    assert planted.lesion_contrast(out, 100.0, 90.0, 20.0, mask) == pytest.approx(contrast, rel=0.01)  # its tail reaches the ring a little
    assert planted.lesion_contrast(film, 100.0, 90.0, 20.0, mask) == 0.0
    added = out.astype(float) - film
    yy, xx = np.mgrid[:200, :200]
    assert (np.sum(added * yy) / added.sum(), np.sum(added * xx) / added.sum()) == pytest.approx((90, 100), abs=0.1)
    assert planted.plant_mass(np.full((50, 50), 250, np.uint8), 25, 25, 10, 81).max() == 255  # clipped, no wrap


def test_contrast_needs_breast_in_the_ring():
    with pytest.raises(ValueError, match="no breast pixels"):
        planted.lesion_contrast(np.zeros((64, 64), np.uint8), 32, 32, 8, np.zeros((64, 64), bool))


def test_half_the_normal_films_get_one_mass_inside_the_breast(annotations):
    some = annotations[annotations["refnum"] <= "mdb040"]
    films = P.FilmCache(P.film_loader())
    table = planted.planted_annotations(some, films, seed=0)
    images = mias.images_table(some)
    normal = sorted(images.loc[images["label"] == "normal", "refnum"])
    assert sorted(table["refnum"]) == normal  # the normal films only, one row each
    masses = table[table["has_location"]]
    assert len(masses) == round(planted.PLANTED_SHARE * len(normal))
    assert set(masses["abnormality"]) == {"CIRC"} and set(masses["severity"]) == {"B"}
    assert set(masses["label"]) == {"benign"} and set(masses["label_id"]) == {1}
    assert set(masses["radius"]) <= set(some.loc[some["has_location"], "radius"])
    assert (table.loc[~table["has_location"], "abnormality"] == "NORM").all()
    for row in masses.itertuples():
        assert films.mask(row.refnum)[int(row.y), int(row.x)]
    again = planted.planted_annotations(some, films, seed=0)
    assert again.equals(table)
    assert not planted.planted_annotations(some, films, seed=1).equals(table)


def test_the_reader_adds_each_film_its_own_mass(annotations):
    some = annotations[annotations["refnum"] <= "mdb040"]
    load = P.film_loader()
    table = planted.planted_annotations(some, P.FilmCache(load), seed=0)
    read = planted.planted_loader(load, table, contrast=81)
    with_mass = table[table["has_location"]].iloc[0]
    without = table[~table["has_location"]].iloc[0]
    np.testing.assert_array_equal(read(without["refnum"]), load(without["refnum"]))
    changed = read(with_mass["refnum"]).astype(int) - load(with_mass["refnum"]).astype(int)
    ys, xs = np.nonzero(changed)
    far = np.hypot(xs - with_mass["x"], ys - with_mass["y"]) > 2 * with_mass["radius"]
    assert changed.min() >= 0 and len(ys) and not far.any()  # added where its mass is, nowhere else
    assert changed[int(with_mass["y"]), int(with_mass["x"])] > 0


def test_planted_samples_and_folds_hold_normal_films_only(annotations):
    exp = D.DetectorExperiment(name="p", image_size=96, max_patients=24, planted_contrast=40, max_folds=1)
    samples = D.make_samples(exp, annotations)
    assert set(samples.annotations["abnormality"]) <= {"NORM", "CIRC"}
    assert set(samples.records["refnum"]) == set(samples.annotations["refnum"])
    boxed = samples.records["boxes"].map(len)
    assert boxed.max() == 1 and boxed.sum() == samples.annotations["has_location"].sum()
    fold = D.make_folds(exp, samples)[0]
    assert len(fold.train) + len(fold.val) + len(fold.test) == len(samples.records)


def test_planted_settings_are_checked():
    with pytest.raises(ConfigError, match="planted_contrast must be > 0"):
        D.DetectorExperiment(planted_contrast=0)
    with pytest.raises(ConfigError, match="whole protocol only"):
        D.DetectorExperiment(protocol="crops", planted_contrast=27)


def test_planted_runs_go_to_tables_of_their_own_without_the_poster(tmp_path):
    shutil.copy("models/ssd_cnn300_whole_e60/metrics.json", tmp_path / "metrics.json")
    real = D.refresh_rows(tmp_path)
    metrics = json.loads(Path(tmp_path / "metrics.json").read_text())
    metrics["experiment"]["planted_contrast"] = 81
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    rows = D.refresh_rows(tmp_path)
    assert all(r["table"].endswith("[PLANTED]") for r in rows)
    assert not any(r["table"].endswith("[PLANTED]") for r in real)
    assert "Poster (reference)" in [r["row"] for r in real] and "Poster (reference)" not in [r["row"] for r in rows]
    assert rows[0]["row"] == real[0]["row"] + " on planted masses of contrast 81"
    assert rows[0]["note"].startswith("PLANTED: not mini-MIAS's lesions but synthetic Gaussian masses of contrast 81")
    assert len(rows) == len(real) - 1
    metrics["experiment"]["seed"] = 1  # another draw of the masses is named as such
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert D.refresh_rows(tmp_path)[0]["row"] == real[0]["row"] + " on planted masses of contrast 81, seed 1"


def test_real_lesion_contrasts_and_their_summary(annotations):
    some = annotations[annotations["refnum"] <= "mdb012"]
    table = planted.lesion_contrasts(some, P.FilmCache(P.film_loader()))
    assert list(table["refnum"]) == list(some.loc[some["has_location"], "refnum"])
    film = mias.load_image("mdb001")
    row = some[some["refnum"] == "mdb001"].iloc[0]
    expected = planted.lesion_contrast(film, row["x"], row["y"], row["radius"], P.breast_mask(film))
    assert table.loc[table["refnum"] == "mdb001", "contrast"].item() == pytest.approx(expected, abs=0.5)
    hand = pd.DataFrame({"abnormality": ["CIRC", "CIRC", "CALC", "CIRC"], "contrast": [10.0, 30.0, 5.0, 20.0]})
    summary = planted.contrast_summary(hand)
    assert summary["all"] == {"n": 4, "q25": 8.75, "median": 15.0, "q75": 22.5}
    assert summary["CIRC"]["median"] == 20.0 and summary["CALC"]["n"] == 1


def test_the_command_prints_each_class(capsys):
    from mammo_tf import cli

    assert cli.main(["lesion-contrast", "--planted", "27"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["all", "ARCH", "ASYM", "CALC", "CIRC", "MISC", "SPIC", "planted"]
    assert all("median" in line for line in lines)
    assert lines[-1].startswith("planted 27  n 104 ") and "clips 2 at 255" in lines[-1]


def test_planted_masses_are_measured_where_they_sit(annotations):
    some = annotations[annotations["refnum"] <= "mdb030"]
    films = P.FilmCache(P.film_loader())
    tissue = planted.planted_lesion_contrasts(some, films, 0.0)
    masses = planted.planted_annotations(some, films)
    assert list(tissue["refnum"]) == list(masses.loc[masses["has_location"], "refnum"]) and len(tissue) >= 3
    added = planted.planted_lesion_contrasts(some, films, 30.0)["contrast"] - tissue["contrast"]
    # the mass adds what was asked (less only where bright tissue clips it at 255), whatever lies beneath
    assert (added <= 30.5).all() and (added >= 0).all() and added.median() == pytest.approx(30.0, abs=0.5)


def test_example_panels_show_a_real_lesion_then_one_mass_at_each_contrast(annotations):
    from mammo_tf.plots import detection as dplots

    some = annotations[annotations["refnum"] <= "mdb060"]
    panels = planted.example_panels(some, P.FilmCache(P.film_loader()), contrasts=(20, 40))
    assert len(panels) == 3 and "real" in panels[0]["title"]
    assert panels[0]["title"].split()[0] in set(some.loc[some["has_location"], "refnum"])
    refnums = {p["title"].split(",")[0] for p in panels[1:]}
    assert len(refnums) == 1 and refnums <= set(some["refnum"])
    for panel, asked in zip(panels[1:], (20, 40)):
        assert float(panel["title"].split()[-1]) == pytest.approx(asked, abs=1.0)
        assert panel["image"].shape[0] == panel["image"].shape[1] and panel["image"].dtype == np.uint8
        y0, x0, y1, x1 = panel["gt_boxes"][0]
        assert 0 < y0 < y1 < panel["image"].shape[0] and 0 < x0 < x1 < panel["image"].shape[1]
    # 8-bit crops are drawn on one grey scale, not each stretched to its own range
    image = dplots.draw_detection_grid(panels, ncols=3).axes[1].images[0]
    assert image.get_clim() == (0, 255)
