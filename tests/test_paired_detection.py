"""Two detectors on the same test lesions: pairing by key, exact McNemar, the table and its checks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mammo_tf import detector as D
from mammo_tf import paired_detection as PD


def test_sign_test_is_mcnemar_for_single_pairs_and_counts_a_lesion_once_over_its_crops():
    a = np.array([1, 1, 1, 1, 1, 0, 0], bool)
    b = np.array([1, 0, 0, 0, 0, 1, 0], bool)
    r = PD.sign_test(a, b)
    assert (r["n"], r["found_a"], r["found_b"], r["only_a"], r["only_b"]) == (7, 5, 2, 4, 1)
    assert (r["n_lesions"], r["a_more"], r["b_more"]) == (7, 4, 1)
    assert r["p"] == pytest.approx(2 * (5 + 1) / 32)          # two-sided: 2 P(X >= 4), X ~ Bin(5, 1/2)
    assert PD.sign_test(a, a)["p"] == 1.0                      # no discordant pair: nothing to test
    assert PD.sign_test(b, a)["p"] == r["p"]                   # symmetric
    # The first four pairs are crops of one lesion: it is one trial, won by the first run (3 of 4 crops).
    lesion = np.array(["L1", "L1", "L1", "L1", "L2", "L3", "L4"])
    c = PD.sign_test(a, b, lesion)
    assert (c["only_a"], c["only_b"]) == (4, 1) and (c["n_lesions"], c["a_more"], c["b_more"]) == (4, 2, 1)
    assert c["p"] == pytest.approx(1.0)                        # 2 vs 1 of 3: 2 P(X >= 2) capped at 1
    tie = PD.sign_test(np.array([1, 0], bool), np.array([0, 1], bool), np.array(["L1", "L1"]))
    assert (tie["a_more"], tie["b_more"], tie["p"]) == (0, 0, 1.0)   # one crop each: the lesion is a tie



def test_sign_test_over_patients_counts_each_patient_once():
    # Five lesions of three patients: P1's two lesions both go to the first run, P2's split one each
    # way (a tie), P3's one lesion to the second run. Lesions: 3 vs 2; patients: 1 vs 1.
    a = np.array([1, 1, 1, 0, 0], bool)
    b = np.array([0, 0, 0, 1, 1], bool)
    lesion = np.array(["L1", "L2", "L3", "L4", "L5"])
    patient = np.array([1, 1, 2, 2, 3])
    r = PD.sign_test(a, b, lesion, patient)
    assert (r["a_more"], r["b_more"], r["p"]) == (3, 2, 1.0)
    assert (r["n_patients"], r["a_more_patients"], r["b_more_patients"]) == (3, 1, 1)
    assert r["p_patients"] == 1.0
    # Nine lesions in one patient, all to the first run: p 2/2^9 over lesions, but a single trial over patients.
    one = PD.sign_test(np.ones(9, bool), np.zeros(9, bool), np.arange(9), np.zeros(9, int))
    assert one["p"] == pytest.approx(2 / 2**9) and (one["a_more_patients"], one["p_patients"]) == (1, 1.0)
    with pytest.raises(ValueError, match="two patients"):
        PD.sign_test(a[:2], b[:2], np.array(["L1", "L1"]), np.array([1, 2]))

def _lesions(annotations: pd.DataFrame, folds: dict[int, list[str]], found: dict[str, bool] | None = None):
    """A `lesions_found.csv` frame: every located lesion of these films, in these folds (whole films)."""
    located = annotations[annotations["has_location"]]
    rows = [{"fold": k, "refnum": r, "crop_top": 0, "crop_left": 0, "lesion": i,
             "found": (found or {}).get(r, False), "found_random": False}
            for k, films in folds.items() for r in films for i in range(int((located["refnum"] == r).sum()))]
    return pd.DataFrame(rows)


def test_pairs_keep_the_shared_folds_and_refuse_other_samples(annotations):
    a = _lesions(annotations, {0: ["mdb001", "mdb005"], 1: ["mdb010"], 2: ["mdb012"]})
    b = _lesions(annotations, {0: ["mdb001", "mdb005"], 1: ["mdb010"]})
    pairs = PD.pair_lesions(a, b)
    assert sorted(set(pairs["fold"])) == [0, 1] and len(pairs) == len(b)
    moved = b.assign(crop_top=np.where(b["refnum"] == "mdb010", 8, 0))   # another crop of the same film
    with pytest.raises(ValueError, match="do not cut the same test samples"):
        PD.pair_lesions(a, moved)
    with pytest.raises(ValueError, match="share no fold"):
        PD.pair_lesions(a, b.assign(fold=7))
    with pytest.raises(ValueError, match="lists a lesion twice"):
        PD.pair_lesions(pd.concat([a, a.iloc[:1]]), b)


def _run(tmp_path, name: str, protocol: str, lesions: pd.DataFrame):
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"experiment": {"name": name, "protocol": protocol}}))
    if lesions is not None:
        lesions.to_csv(run / D.LESIONS_FILE, index=False)
    return run


def test_evaluate_tables_both_runs_per_group_with_the_paired_test(tmp_path, annotations):
    films = {0: ["mdb001", "mdb005", "mdb010", "mdb012"], 1: ["mdb015", "mdb017", "mdb019", "mdb021"]}
    a = _lesions(annotations, films, found={"mdb001": True, "mdb005": True, "mdb015": True, "mdb021": True})
    b = _lesions(annotations, films, found={"mdb001": True})
    first, second = _run(tmp_path, "first", "whole", a), _run(tmp_path, "second", "whole", b)
    m = PD.evaluate([first, second], tmp_path / "pair", command="test")
    every = m["table"][PD.ALL][PD.ALL]
    assert (every["n"], every["found_a"], every["found_b"]) == (len(a), int(a["found"].sum()), int(b["found"].sum()))
    assert every["only_b"] == 0 and every["only_a"] == int(a["found"].sum()) - int(b["found"].sum())
    assert every["a_more"] == every["only_a"] and every["n_lesions"] == len(a)   # whole films: one pair a lesion
    assert sum(c["n"] for c in m["table"]["severity"].values()) == len(a)   # every lesion in one group
    assert m["folds"] == [0, 1] and [r["row"] for r in m["results"]][:2] == ["first: found", "second: found"]
    assert m["results"][2]["values"][PD.ALL].endswith(f"({every['a_more']} / 0)")
    # Benjamini-Hochberg over the group cells, by hand: q_(i) = min over j >= i of p_(j) m / j.
    cells = [c for g, v in m["table"].items() if g != PD.ALL for c in v.values()]
    ps = np.array([c["p"] for c in cells])
    order = np.argsort(ps)
    ranked = ps[order] * len(ps) / np.arange(1, len(ps) + 1)
    expected = np.empty_like(ps)
    expected[order] = np.minimum(1, np.minimum.accumulate(ranked[::-1])[::-1])
    assert [c["q"] for c in cells] == pytest.approx(expected.tolist())
    assert "q" not in every and m["results"][3]["values"].keys() == {v for g, c in m["table"].items() if g != PD.ALL for v in c}
    # Patients: these four films of fold 0 and four of fold 1 are eight patients; mdb001's is found by both.
    assert every["n_patients"] == len({(int(r[3:]) + 1) // 2 for r in a["refnum"]})
    assert m["results"][4]["values"][PD.ALL] == f"{every['p_patients']:.3g} ({every['a_more_patients']} / 0)"
    assert (tmp_path / "pair" / "paired_lesions.png").stat().st_size > 0
    with pytest.raises(ValueError, match="not the same test samples"):
        PD.evaluate([first, _run(tmp_path, "crops", "crops", b)], tmp_path / "x")
    with pytest.raises(ValueError, match="evaluate-detector"):
        PD.evaluate([first, _run(tmp_path, "old", "whole", None)], tmp_path / "y")
    with pytest.raises(ValueError, match="takes two detector runs"):
        PD.evaluate([first], tmp_path / "z")


def test_with_min_iou_a_lesion_counts_only_when_its_hit_box_overlaps_it_enough(tmp_path, annotations):
    films = {0: ["mdb001", "mdb005", "mdb010", "mdb012"]}
    found = {"mdb001": True, "mdb005": True, "mdb010": True}
    a = _lesions(annotations, films, found=found)
    # mdb001's box fits (IoU 0.7), mdb005's is too loose (0.3); mdb010's hits exactly at the bar.
    iou = {"mdb001": 0.7, "mdb005": 0.3, "mdb010": 0.5}
    a["hit_iou"] = a["refnum"].map(iou)
    b = a.assign(hit_iou=a["hit_iou"].where(a["refnum"] != "mdb005", 0.9))
    first, second = _run(tmp_path, "first", "whole", a), _run(tmp_path, "second", "whole", b)
    assert PD.load_lesions(first, 0.5).groupby("refnum")["found"].first().to_dict() == {
        "mdb001": True, "mdb005": False, "mdb010": True, "mdb012": False}
    plain = PD.evaluate([first, second], tmp_path / "plain")["table"][PD.ALL][PD.ALL]
    boxed = PD.evaluate([first, second], tmp_path / "boxed", min_iou=0.5)
    every = boxed["table"][PD.ALL][PD.ALL]
    assert (plain["only_a"], plain["only_b"]) == (0, 0)
    n005 = int((a["refnum"] == "mdb005").sum())
    assert (every["only_a"], every["only_b"], every["found_b"] - every["found_a"]) == (0, n005, n005)
    assert boxed["min_iou"] == 0.5 and boxed["results"][0]["row"] == "first: boxed at IoU >= 0.5"
    assert {r["table"] for r in boxed["results"]} == {
        "Detection: two detectors on the same test lesions, boxed at IoU >= 0.5 at 1 false positive per image (paired)"}
    assert "IoU >= 0.5 with it" in boxed["results"][0]["note"]
    from mammo_tf import cli

    assert cli.main(["compare-detectors", "--models", str(first), str(second), "--out", str(tmp_path / "cli"),
                     "--min-iou", "0.5"]) == 0
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["table"][PD.ALL][PD.ALL] == every
    with pytest.raises(ValueError, match="no hit_iou"):
        PD.evaluate([first, _run(tmp_path, "old", "whole", a.drop(columns="hit_iou"))], tmp_path / "x", min_iou=0.5)
    with pytest.raises(ValueError, match="min_iou"):
        PD.load_lesions(first, 1.5)


def test_lesion_numbers_count_within_each_film_and_survive_filtering(annotations):
    numbers = D.lesion_numbers(annotations)
    located = annotations[annotations["has_location"]]
    several = located["refnum"].value_counts()
    film = several.index[0]                                    # a film with the most located lesions
    assert numbers[located["refnum"] == film].tolist() == list(range(several.iloc[0])) and several.iloc[0] >= 2
    kept = annotations[annotations["refnum"] != "mdb001"].reset_index(drop=True)   # as usable_annotations does
    again = D.lesion_numbers(kept)
    assert again.tolist() == numbers[located["refnum"] != "mdb001"].tolist()
