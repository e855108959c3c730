"""Tiled full-resolution search with a crops-trained detector: tile placement, merging, a tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mammo_tf import detect
from mammo_tf import detector as D
from mammo_tf import tiled as T
from mammo_tf.config import ConfigError
from mammo_tf.data import mias


def _rect_mask(top: int, bottom: int, left: int, right: int, n: int = 1024) -> np.ndarray:
    mask = np.zeros((n, n), bool)
    mask[top:bottom, left:right] = True
    return mask


def test_tiles_cover_the_breast_box_the_last_flush_with_its_edge():
    origins = T.tile_origins(_rect_mask(100, 700, 0, 400), size=300, stride=200, min_breast=0.0)
    assert sorted(map(tuple, origins)) == [(t, l) for t in (100, 300, 400) for l in (0, 100)]
    covered = np.zeros((1024, 1024), bool)
    for t, l in origins:
        covered[t:t + 300, l:l + 300] = True
    assert covered[100:700, 0:400].all()


def test_tiles_stay_in_the_film_and_skip_those_with_too_little_breast():
    # A breast strip at the right edge, narrower than a tile: the tile is pushed inside the film.
    origins = T.tile_origins(_rect_mask(0, 1024, 1000, 1024), 300, 300)
    assert origins.tolist() == [[0, 724], [300, 724], [600, 724], [724, 724]]
    # 24 of 300 columns are breast: 8 % of each tile, below a 10 % minimum.
    assert len(T.tile_origins(_rect_mask(0, 1024, 1000, 1024), 300, 300, min_breast=0.1)) == 0
    assert len(T.tile_origins(np.zeros((1024, 1024), bool), 300, 200)) == 0
    with pytest.raises(ValueError, match="gaps"):
        T.tile_origins(_rect_mask(0, 500, 0, 500), 300, 301)
    with pytest.raises(ValueError, match="exceeds"):
        T.tile_origins(_rect_mask(0, 100, 0, 100, n=200), 300, 100)


def test_merged_tiles_are_in_film_pixels_and_duplicates_of_one_class_suppressed():
    box = lambda *b: np.array([b], np.float64)  # noqa: E731
    det = lambda b, label, score: {"boxes": b, "labels": np.array([label]), "scores": np.array([score])}  # noqa: E731
    tiles = [det(box(0.5, 0.5, 0.8, 0.8), 1, 0.9),          # film [150, 150, 240, 240]
             det(box(0.5, 0.5, 0.8, 0.8) - 1 / 3, 1, 0.6),   # the same spot seen from the tile at (100, 100)
             det(box(0.5, 0.5, 0.8, 0.8) - 1 / 3, 2, 0.7),   # same spot, other class: kept
             det(box(0.0, 0.0, 0.2, 0.2), 2, 0.8)]            # film [400, 100, 460, 160]
    merged = T.merge_tiles(tiles, np.array([[0, 0], [100, 100], [100, 100], [400, 100]]), 300, 0.45, 10)
    np.testing.assert_allclose(merged["boxes"], [[150, 150, 240, 240], [400, 100, 460, 160], [150, 150, 240, 240]])
    assert merged["labels"].tolist() == [1, 2, 2] and merged["scores"].tolist() == [0.9, 0.8, 0.7]
    assert len(T.merge_tiles(tiles, np.zeros((4, 2), int), 300, 0.45, max_total=2)["scores"]) == 2
    empty = T.merge_tiles([], np.zeros((0, 2), int), 300, 0.45, 10)
    assert empty["boxes"].shape == (0, 4) and len(empty["labels"]) == 0
    # A tile of the half-size film covers 600 film pixels: its boxes are scaled by its own side.
    pyramid = T.merge_tiles([tiles[0], tiles[3]], np.array([[0, 0], [200, 200]]), np.array([300, 600]), 0.45, 10)
    np.testing.assert_allclose(pyramid["boxes"], [[150, 150, 240, 240], [200, 200, 320, 320]])


def test_box_voting_averages_the_overlapping_boxes_by_score():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 20, 20], [1, 1, 11, 11], [50, 50, 60, 60]], np.float64)
    scores = np.array([0.6, 0.9, 0.2, 0.5])
    # IoU with the first box: 1, 0.25 (left out at 0.5), 81/119, 0.
    np.testing.assert_allclose(T.vote_boxes(boxes[:1], boxes, scores, 0.5), [[0.25, 0.25, 10.25, 10.25]])
    np.testing.assert_allclose(T.vote_boxes(boxes[:1], boxes, scores, 0.2),
                               [(0.6 * boxes[0] + 0.9 * boxes[1] + 0.2 * boxes[2]) / 1.7])
    np.testing.assert_allclose(T.vote_boxes(boxes[3:], boxes, scores, 0.5), boxes[3:])
    assert T.vote_boxes(np.zeros((0, 4)), boxes, scores, 0.5).shape == (0, 4)
    with pytest.raises(ValueError, match="among the boxes"):
        T.vote_boxes([[100, 100, 110, 110]], boxes, scores, 0.5)
    # A box without area overlaps nothing, itself included: it stays as it is.
    flat = np.array([[5, 5, 5, 9]], np.float64)
    np.testing.assert_allclose(T.vote_boxes(flat, np.concatenate([boxes, flat]), np.append(scores, 0.3), 0.5), flat)
    # In the merge, per class: the suppressed duplicate of class 1 moves the kept box; class 2 votes alone.
    det = lambda b, label, score: {"boxes": np.array([b], np.float64), "labels": np.array([label]),  # noqa: E731
                                   "scores": np.array([score])}
    tiles = [det([0.5, 0.5, 0.8, 0.8], 1, 0.6), det([0.53, 0.53, 0.83, 0.83], 1, 0.3), det([0.5, 0.5, 0.8, 0.8], 2, 0.5)]
    origins = np.zeros((3, 2))
    plain = T.merge_tiles(tiles, origins, 300, 0.45, 10)
    voted = T.merge_tiles(tiles, origins, 300, 0.45, 10, vote_iou=0.5)
    assert voted["labels"].tolist() == plain["labels"].tolist() == [1, 2] and voted["scores"].tolist() == [0.6, 0.5]
    np.testing.assert_allclose(plain["boxes"], [[150, 150, 240, 240]] * 2)
    np.testing.assert_allclose(voted["boxes"], [[153, 153, 243, 243], [150, 150, 240, 240]])


def test_the_models_agreement_scales_the_scores_of_the_boxes_they_vote_for():
    box = lambda *c: np.array([c], float) / 300  # noqa: E731 - one box in a 300 px tile, normalised
    det = lambda b, s: {"boxes": b, "labels": np.array([1]), "scores": np.array([s])}  # noqa: E731
    # Model 0 finds a lesion (0.9) and a false positive (0.95); model 1, in the same tile, the lesion alone (0.6).
    tiles = [det(box(10, 10, 50, 50), 0.9), det(box(200, 200, 240, 240), 0.95), det(box(12, 12, 52, 52), 0.6)]
    origins = np.zeros((3, 2))
    pooled = T.merge_tiles(tiles, origins, 300, 0.45, 10, vote_iou=0.5)
    np.testing.assert_allclose(pooled["scores"], [0.95, 0.9])
    agreed = T.merge_tiles(tiles, origins, 300, 0.45, 10, vote_iou=0.5, sources=np.array([0, 0, 1]))
    # The lesion keeps 0.9 (both models), the false positive halves (one of two) and drops below it.
    np.testing.assert_allclose(agreed["scores"], [0.9, 0.475])
    np.testing.assert_allclose(agreed["boxes"], [[(0.9 * 10 + 0.6 * 12) / 1.5] * 2 + [(0.9 * 50 + 0.6 * 52) / 1.5] * 2,
                                                 [200, 200, 240, 240]])
    assert len(T.merge_tiles(tiles, origins, 300, 0.45, 1, vote_iou=0.5, sources=np.array([0, 0, 1]))["scores"]) == 1
    # A box without area gets no vote, not even its own.
    flat = T.merge_tiles(tiles + [det(box(100, 100, 100, 140), 0.99)], np.zeros((4, 2)), 300, 0.45, 10, vote_iou=0.5,
                         sources=np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(flat["scores"], [0.9, 0.475, 0.0])
    with pytest.raises(ValueError, match="need vote_iou"):
        T.merge_tiles(tiles, origins, 300, 0.45, 10, sources=np.array([0, 0, 1]))


def test_tile_settings_are_checked_and_name_their_output_folder():
    assert T.run_name("ssd_x") == "tiled_ssd_x" and T.TileConfig().suffix() == ""
    assert T.run_name("ssd_x", T.TileConfig(scales=[1, 0.5])) == "tiled_ssd_x_scales1-0.5"
    assert T.run_name("ssd_x", T.TileConfig(stride=100, min_breast=0.2)) == "tiled_ssd_x_stride100_breast0.2"
    assert T.run_name("ssd_x", T.TileConfig(hflip=True, vote_iou=0.5)) == "tiled_ssd_x_hflip_vote0.5"
    assert T.study_entry({"name": "ssd_x", "vote_iou": 0.5}) == ("ssd_x", T.TileConfig(vote_iou=0.5))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="vote_iou"):
            T.TileConfig(vote_iou=bad)
    assert T.study_entry("ssd_x") == ("ssd_x", T.TileConfig())
    # An ensemble names its partner runs after the tile settings.
    assert T.run_name("ssd_x", T.TileConfig(vote_iou=0.5, partners="ssd_y")) == "tiled_ssd_x_vote0.5_plus_ssd_y"
    assert T.study_entry({"name": "ssd_x", "partners": ["ssd_y", "ssd_z"]})[1].partners == ("ssd_y", "ssd_z")
    assert T.TileConfig(vote_iou=0.5, partners="ssd_y", agreement=True).suffix() == "_vote0.5_plus_ssd_y_agree"
    for bad in ({}, {"partners": "ssd_y"}, {"vote_iou": 0.5}):
        with pytest.raises(ValueError, match="needs partners and vote_iou"):
            T.TileConfig(agreement=True, **bad)
    for bad in (("ssd_y", "ssd_y"), ("",)):
        with pytest.raises(ValueError, match="partners"):
            T.TileConfig(partners=bad)
    assert T.study_entry({"name": "ssd_x", "scales": [1, 0.5]}) == ("ssd_x", T.TileConfig(scales=(1.0, 0.5)))
    with pytest.raises(ValueError, match="needs a name"):
        T.study_entry({"name": "ssd_x", "scale": [1, 0.5]})
    for bad in ((), (1.0, 1.0), (4.5,), (0.0,), (-1.0,)):
        with pytest.raises(ValueError, match="scales"):
            T.TileConfig(scales=bad)
    assert T.run_name("ssd_x", T.TileConfig(scales=[1, 2])) == "tiled_ssd_x_scales1-2"


def test_an_enlarged_film_is_interpolated_and_its_mask_kept_binary():
    image = np.zeros((8, 8), np.uint8)
    image[:, 4:] = 200
    mask = image > 0
    big, big_mask = T._scaled(image, mask, 2.0)
    assert big.shape == big_mask.shape == (16, 16) and big_mask.dtype == bool
    # Bilinear: the step between 0 and 200 gets an intermediate grey, which area averaging up would not make.
    assert 0 < big[0, 7] < 200 and big[0, 0] == 0 and big[0, 15] == 200
    assert big_mask[:, 9:].all() and not big_mask[:, :7].any()


TINY_CROPS = dict(name="tiny_crops", protocol="crops", image_size=96, ssd={"backbone": "cnn"},
                  train={"epochs": 1, "batch_size": 4, "early_stopping": False, "tensorboard": False},
                  folds=2, max_folds=1, max_patients=6, val_fraction=0.3, n_examples=2, seed=0)


def test_a_crops_detector_searches_whole_films_tile_by_tile(tmp_path, annotations, film_and_broken_png, monkeypatch):
    crops_dir = tmp_path / "tiny_crops"
    # Trained with the crops-only augmentations (re-cuts, zoom out), which the whole-film search leaves out.
    D.run_experiment(D.DetectorExperiment(**{**TINY_CROPS, "max_shift": 10, "max_zoom_out": 1.5}), crops_dir, command="pytest")
    # `mammo-tf detect` with a crops model searches the file's film in full-resolution tiles, as the evaluation does.
    good, bad = film_and_broken_png
    found = detect.detect_images([good, bad], crops_dir, tmp_path / "detect", score_threshold=0.01)  # the run's own
    model, exp, anchors = D.load_detector(crops_dir)
    image = mias.read_pgm(good)
    tiles = T.detect_film(model, exp, anchors, image, D.P.breast_mask(image), T.TileConfig())[0]
    np.testing.assert_allclose(np.reshape(found[0]["boxes"], (-1, 4)), tiles["boxes"], atol=0.051)  # rounded to 0.1 px
    # An image pyramid searches the full-resolution tiles and those of the half-size film, each in film pixels.
    mask = D.P.breast_mask(image)
    pyramid = T.TileConfig(scales=(1.0, 0.5))
    dets, origins, sides = T.tile_predictions(model, exp, anchors, image, mask, pyramid)
    full, half = (T.tile_origins(m, 96, 64) for m in (mask, T._scaled(image, mask, 0.5)[1]))
    assert len(dets) == len(origins) == len(sides) == len(full) + len(half)
    assert sides.tolist() == [96.0] * len(full) + [192.0] * len(half)
    np.testing.assert_array_equal(origins[len(full):], half * 2)
    assert len(T.detect_film(model, exp, anchors, image, mask, pyramid)[1]) == len(origins)
    # With hflip the mirrored film is searched too: its tiles' boxes, merged, are the mirrored film's own
    # search mirrored back in film pixels.
    dets, origins, sides = T.tile_predictions(model, exp, anchors, image, mask, T.TileConfig(hflip=True))
    mirror_dets, mirror_origins, mirror_sides = T.tile_predictions(model, exp, anchors, image[:, ::-1], mask[:, ::-1],
                                                                   T.TileConfig())
    half = len(full)
    assert len(dets) == half + len(mirror_dets) and len(mirror_dets) > 0
    back = T.merge_tiles(dets[half:], origins[half:], sides[half:], 1.0, 1000)["boxes"]
    seen = T.merge_tiles(mirror_dets, mirror_origins, mirror_sides, 1.0, 1000)["boxes"]
    assert len(seen) > 0
    np.testing.assert_allclose(back, seen[:, [0, 3, 2, 1]] * [1, -1, 1, -1] + [0, 1024, 0, 1024], atol=1e-3)
    assert "error" in found[1] and "tiles" in json.loads((tmp_path / "detect" / "results.json").read_text())["note"]
    out = tmp_path / T.run_name("tiny_crops")
    metrics = T.run(crops_dir, out, command="pytest", annotations=annotations)  # stride 64: 2/3 of a tile
    fold = metrics["folds"][0]
    # The whole-film samples of the same patients: every test film, lesion or normal, is searched.
    assert metrics["experiment"]["protocol"] == "whole" and metrics["protocol_note"] == T.TILED_NOTE
    films = mias.images_table(annotations)
    test_films = set(films.loc[films["patient_id"].isin(fold["test_patients"]), "refnum"])
    assert fold["n_test"] == len(test_films - set(metrics["excluded_films"])) > 0
    # A 1024 px film's breast spans hundreds of pixels: many 96 px tiles each, fewer than the whole film's grid.
    whole_grid = len(T.tile_origins(np.ones((1024, 1024), bool), 96, 64))
    assert 10 < fold["training"]["tiles_per_test_film"] < whole_grid == 16 ** 2
    row = next(r for r in metrics["results"] if r["row"].startswith("SSD96 cnn trained on crops"))
    assert row["row"].endswith("96 px tiles every 64 px at full resolution")
    assert row["table"] == "Detection (mini-MIAS, whole films: no prior location)" and T.TILED_NOTE in row["note"]
    assert (out / "config.json").is_file() and (out / "froc.png").is_file() and (out / D.LESIONS_FILE).is_file()
    # Relabelled from the stored summary, the rows come back the same (NaN cells compared as text).
    assert json.dumps(D.refresh_rows(out)) == json.dumps(metrics["results"])
    with pytest.raises(ConfigError, match="patient-split crops"):
        T.run(out, tmp_path / "again", command="pytest", annotations=annotations)
    # An ensemble pools a partner's tile boxes with the model's own before the merge. With the same model as its
    # partner, the merge gets every tile twice, and its NMS leaves what the model finds alone.
    merge_tiles, merged = T.merge_tiles, []
    monkeypatch.setattr(T, "merge_tiles", lambda *args: merged.append(args) or merge_tiles(*args))
    alone = T.detect_film(model, exp, anchors, image, mask, T.TileConfig(vote_iou=0.5))[0]
    pooled = T.detect_film(model, exp, anchors, image, mask, T.TileConfig(vote_iou=0.5), partners=[(model, exp, anchors)])[0]
    (dets, origins, sides, *settings), (pooled_dets, pooled_origins, pooled_sides, *pooled_settings) = merged
    assert len(pooled_dets) == 2 * len(dets) > 0 and pooled_settings == settings
    for d, p in zip(pooled_dets, dets + dets):
        for key in ("boxes", "labels", "scores"):
            np.testing.assert_array_equal(d[key], p[key])
    np.testing.assert_array_equal(pooled_origins, np.concatenate([origins, origins]))
    np.testing.assert_array_equal(pooled_sides, np.concatenate([sides, sides]))
    np.testing.assert_allclose(pooled["boxes"], alone["boxes"], atol=1e-6)
    # Scaled by the models' agreement: the same model agrees with itself on every box, so nothing changes.
    few = dataclasses.replace(exp, max_total=20)  # the untrained model's thousands of boxes, cut short
    agreed = T.detect_film(model, few, anchors, image, mask, T.TileConfig(vote_iou=0.5, partners="x", agreement=True),
                           partners=[(model, few, anchors)])[0]
    voted = T.detect_film(model, few, anchors, image, mask, T.TileConfig(vote_iou=0.5))[0]
    assert len(agreed["scores"]) == 20
    np.testing.assert_allclose(agreed["scores"], voted["scores"], atol=1e-6)
    np.testing.assert_allclose(agreed["boxes"], voted["boxes"], atol=1e-6)
    with pytest.raises(ConfigError, match="own ensemble partner"):
        T.run(crops_dir, tmp_path / "self", T.TileConfig(partners=("tiny_crops",)), command="pytest", annotations=annotations)
    with pytest.raises(ConfigError, match="patient-split crops"):
        T.run(crops_dir, tmp_path / "whole", T.TileConfig(partners=(out.name,)), command="pytest", annotations=annotations)
    # A partner's fold model that trained on one of the fold's test films is refused like the model's own.
    shutil.copytree(crops_dir, tmp_path / "tiny_copy")
    seen = sorted(test_films - set(metrics["excluded_films"]))[:1]
    copy_config = tmp_path / "tiny_copy" / "folds" / "fold0" / D.CONFIG_FILE
    copied = json.loads(copy_config.read_text())
    copy_config.write_text(json.dumps({**copied, "train_refnums": copied["train_refnums"] + seen}))
    with pytest.raises(ConfigError, match="tiny_copy.*trained on 1 of the fold's test films"):
        T.run(crops_dir, tmp_path / "ens", T.TileConfig(partners=("tiny_copy",)), command="pytest", annotations=annotations)
    # A model trained on equalised films (clahe_clip) searches the equalised film, its tiles placed by the raw
    # film's mask; it does not pool boxes with a model that saw raw films.
    eq = dataclasses.replace(exp, clahe_clip=2.0)
    expected = T.detect_film(model, eq, anchors, D.P.clahe(image, 2.0), mask, T.TileConfig())[0]
    raw_search = T.detect_film(model, eq, anchors, image, mask, T.TileConfig())[0]
    assert not np.array_equal(expected["scores"], raw_search["scores"])
    got = D.detect_films(model, eq, anchors, [image])[0]
    np.testing.assert_array_equal(got["boxes"], expected["boxes"])
    np.testing.assert_array_equal(got["scores"], expected["scores"])
    shutil.copytree(tmp_path / "tiny_copy", tmp_path / "tiny_eq")
    eq_config = json.loads((tmp_path / "tiny_eq" / D.CONFIG_FILE).read_text())
    eq_config["experiment"]["clahe_clip"] = 2.0
    (tmp_path / "tiny_eq" / D.CONFIG_FILE).write_text(json.dumps(eq_config))
    with pytest.raises(ConfigError, match="tiny_eq: its films are equalised otherwise"):
        T.run(crops_dir, tmp_path / "mixed", T.TileConfig(partners=("tiny_eq",)), command="pytest", annotations=annotations)
    # A fold model that trained on one of the fold's test films is refused.
    fold_config = crops_dir / "folds" / "fold0" / D.CONFIG_FILE
    config = json.loads(fold_config.read_text())
    fold_config.write_text(json.dumps({**config, "train_refnums": config["train_refnums"] + seen}))
    with pytest.raises(ConfigError, match="trained on 1 of the fold's test films"):
        T.run(crops_dir, tmp_path / "leak", command="pytest", annotations=annotations)


def test_the_tiled_search_figure_draws_every_tile_and_the_best_detections():
    from mammo_tf.plots.detection import draw_tiled_search

    origins = T.tile_origins(_rect_mask(100, 700, 0, 400), 300, 200)
    dets = {"boxes": np.array([[10, 10, 50, 50], [60, 60, 90, 90], [0, 0, 5, 5]], float),
            "labels": np.array([1, 2, 1]), "scores": np.array([0.9, 0.5, 0.1])}
    fig = draw_tiled_search(np.zeros((1024, 1024), np.uint8), origins, 300, np.array([[10, 10, 50, 50]]),
                            np.array([2]), dets, top=2)
    # One rectangle per tile, per lesion and per detection kept.
    assert len(fig.axes[0].patches) == len(origins) + 1 + 2 and "6 tiles" in fig.axes[0].get_title()


# --------------------------------------------------------------------------- hard-negative tiles


def test_a_tile_is_lesion_free_only_with_no_box_within_the_margin():
    from mammo_tf.hard_negatives import lesion_free

    origins = np.array([[0, 0], [0, 300], [400, 400]])
    box = np.array([[320, 100, 360, 140]])  # 20 px below the first tile, far from the others
    assert lesion_free(origins, 300, box, margin=0).tolist() == [True, True, True]
    assert lesion_free(origins, 300, box, margin=30).tolist() == [False, True, True]
    assert lesion_free(origins, 300, np.array([[450, 450, 460, 460]]), margin=0).tolist() == [True, True, False]
    assert lesion_free(origins, 300, np.zeros((0, 4)), margin=150).all()
    # Mined tiles become training crops of the film at full resolution: a pyramid is refused.
    from mammo_tf.hard_negatives import mine

    with pytest.raises(ValueError, match="full resolution"):
        mine(None, None, None, None, None, [], 1, 0, cfg=T.TileConfig(scales=(1.0, 0.5)))


def test_hard_negative_settings_are_refused_without_a_crops_model_to_go_on_from():
    with pytest.raises(ConfigError, match="set init_from"):
        D.DetectorExperiment(**{**TINY_CROPS, "hard_negative_tiles": 5})
    with pytest.raises(ConfigError, match="protocol: crops"):
        D.DetectorExperiment(**{**TINY_CROPS, "protocol": "whole", "init_from": "somewhere"})
    with pytest.raises(ConfigError, match="protocol: crops"):
        D.DetectorExperiment(**{**TINY_CROPS, "naive_split": True, "init_from": "somewhere"})


def test_training_goes_on_from_the_fold_model_with_mined_tiles_added(tmp_path, annotations):
    import pandas as pd

    from mammo_tf.hard_negatives import KIND, lesion_free, with_hard_negatives

    crops_dir = tmp_path / "tiny_crops"
    D.train_experiment(D.DetectorExperiment(**TINY_CROPS), crops_dir, annotations=annotations)
    # A learning rate of ~0: the fold model keeps the weights it went on from.
    exp = D.DetectorExperiment(**{**TINY_CROPS, "name": "tiny_hn", "init_from": str(crops_dir), "hard_negative_tiles": 3,
                                  "max_shift": 20, "train": {**TINY_CROPS["train"], "learning_rate": 1e-12}})
    out = tmp_path / "tiny_hn"
    info = D.train_experiment(exp, out, annotations=annotations)
    samples = D.make_samples(exp, annotations)
    fold = D.make_folds(exp, samples)[0]
    tiles = pd.read_csv(out / "folds" / "fold0" / "hard_negatives.csv")
    assert 0 < len(tiles) <= 3 and tiles["score"].is_monotonic_decreasing
    assert set(tiles["refnum"]) <= set(fold.train["refnum"])           # training patients' films only
    for t in tiles.itertuples():
        boxes = mias.lesion_boxes(annotations, t.refnum)[0]
        assert lesion_free(np.array([[t.top, t.left]]), 96, boxes, margin=20).all()
    assert info[0]["n_train"] == len(fold.train) + len(tiles)
    grown = with_hard_negatives(exp, samples, fold, out / "folds" / "fold0")
    assert (grown.train["kind"] == KIND).sum() == len(tiles) and grown.test.equals(fold.test)
    before, after = D.load_detector(crops_dir / "folds" / "fold0")[0], D.load_detector(out / "folds" / "fold0")[0]
    for a, b in zip(before.get_weights(), after.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Another network cannot go on from these fold models.
    other = D.DetectorExperiment(**{**TINY_CROPS, "init_from": str(crops_dir), "ssd": {"backbone": "cnn", "s_max": 0.5}})
    with pytest.raises(ConfigError, match="another network"):
        D.train_experiment(other, tmp_path / "other", annotations=annotations)
    # Nor can a run go on from a fold model that trained on one of the fold's test films.
    fold_config = crops_dir / "folds" / "fold0" / D.CONFIG_FILE
    config = json.loads(fold_config.read_text())
    fold_config.write_text(json.dumps({**config, "train_refnums": config["train_refnums"] + [fold.test["refnum"].iloc[0]]}))
    with pytest.raises(ConfigError, match="trained on 1 of the fold's test films"):
        D.train_experiment(exp, tmp_path / "leak", annotations=annotations)


def test_the_command_passes_its_tile_settings_and_names_the_folder_by_them(tmp_path, monkeypatch):
    from mammo_tf import cli

    calls = []
    monkeypatch.setattr(T, "run", lambda model, out, cfg, command=None: calls.append((Path(out), cfg)))
    assert cli.main(["evaluate-tiled", "--model", "models/ssd_x", "--out", str(tmp_path), "--hflip", "--vote-iou", "0.5"]) == 0
    assert calls == [(tmp_path / "tiled_ssd_x_hflip_vote0.5", T.TileConfig(hflip=True, vote_iou=0.5))]
    assert cli.main(["evaluate-tiled", "--model", "models/ssd_x", "--out", str(tmp_path), "--with", "ssd_y"]) == 0
    assert calls[-1] == (tmp_path / "tiled_ssd_x_plus_ssd_y", T.TileConfig(partners=("ssd_y",)))
    assert cli.main(["evaluate-tiled", "--model", "models/ssd_x", "--out", str(tmp_path), "--vote-iou", "0.5", "--with",
                     "ssd_y", "--agreement"]) == 0
    assert calls[-1] == (tmp_path / "tiled_ssd_x_vote0.5_plus_ssd_y_agree",
                         T.TileConfig(vote_iou=0.5, partners=("ssd_y",), agreement=True))
