"""Replicates of one recipe: configs and predictions checked, hand-worked AUCs of members and their mean."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mammo_tf import classify, cli
from mammo_tf import ensemble as E

LABELS = [0, 0, 1, 2]
LOGISTIC = [0.2, 0.4, 0.3, 0.5]           # AUC 3/4 in each fold
MEMBER0 = {0: [0.1, 0.6, 0.5, 0.9], 1: [0.1, 0.6, 0.5, 0.9]}   # 3/4, 3/4
MEMBER1 = {0: [0.6, 0.1, 0.9, 0.5], 1: [0.1, 0.2, 0.9, 0.8]}   # 3/4, 1
# Mean of the two: fold 0 [0.35, 0.35, 0.7, 0.7] and fold 1 [0.1, 0.4, 0.7, 0.85]: AUC 1 in both.


def _run(root, name: str, replicate: int, scores: dict, **changes) -> str:
    run = root / name
    for k in (0, 1):
        (run / f"fold{k}").mkdir(parents=True)
        refnums = [f"mdb{4 * k + i + 1:03d}" for i in range(4)]
        base = {"refnum": refnums, "label_id": LABELS, "fold": k, "score_logistic": changes.get("logistic", LOGISTIC)}
        pd.DataFrame({**base, "score_cnn": scores[k]}).to_csv(run / f"fold{k}" / "patch_predictions.csv", index=False)
        pd.DataFrame({**base, "abnormal_score": scores[k]}).to_csv(run / f"fold{k}" / "film_predictions.csv",
                                                                   index=False)
    exp = {"name": name, "strategy": "grid_keep", "seed": 0, "replicate": replicate, "classifier": "cnn",
           "train": {"epochs": changes.get("epochs", 60)}}
    (run / "metrics.json").write_text(json.dumps({"experiment": exp, "results": []}))
    return str(run)


def test_members_and_their_mean_by_hand(tmp_path):
    runs = [_run(tmp_path, "a", 0, MEMBER0), _run(tmp_path, "a_r1", 1, MEMBER1)]
    metrics = E.evaluate(runs, tmp_path / "out", command="pytest", n_boot=50)
    patch = metrics["summary"]["patch"]
    assert patch["a"]["fold_auc"] == pytest.approx([0.75, 0.75])
    assert patch["a_r1"]["fold_auc"] == pytest.approx([0.75, 1.0])
    assert patch["ensemble"]["fold_auc"] == pytest.approx([1.0, 1.0])
    assert patch["logistic"]["fold_auc"] == pytest.approx([0.75, 0.75])
    assert patch["ensemble"]["minus_logistic"]["mean"] == pytest.approx(0.25)
    assert patch["ensemble"]["minus_logistic"]["ahead"] == 2
    rows = {r["row"]: r for r in metrics["results"]}
    mean_row = rows["mean score of the 2 replicates (rule fixed in advance)"]
    assert mean_row["table"] == E.TABLE and mean_row["command"] == "pytest"
    assert mean_row["values"]["whole mammogram, max rule: abnormal AUC"] == pytest.approx([1.0, 0.0])
    assert mean_row["values"]["grid_keep test patches: Δ 95 % CI"].startswith("[")
    assert "Δ vs logistic" not in " ".join(rows["logistic, intensity (the replicates' shared baseline)"]["values"])
    pair = rows["a_r1 minus a"]["values"]
    assert pair["grid_keep test patches: Δ abnormal AUC"][0] == pytest.approx(0.125)
    assert pair["grid_keep test patches: largest |Δ| in a fold"] == pytest.approx(0.25)
    assert pair["grid_keep test patches: folds ahead"] == "1/2"
    assert all((tmp_path / "out" / f"replicate_folds_{level}.png").is_file() for level in ("patch", "film"))
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["runs"] == ["a", "a_r1"]


def test_runs_that_are_not_replicates_are_refused(tmp_path):
    a = _run(tmp_path, "a", 0, MEMBER0)
    with pytest.raises(ValueError, match=r"configs differ in \['train'\]"):
        E.evaluate([a, _run(tmp_path, "b", 1, MEMBER1, epochs=120)], tmp_path / "out")
    with pytest.raises(ValueError, match="differ in their training seed"):
        E.evaluate([a, _run(tmp_path, "c", 0, MEMBER1)], tmp_path / "out")
    with pytest.raises(ValueError, match="logistic baseline scores differ"):
        E.evaluate([a, _run(tmp_path, "d", 1, MEMBER1, logistic=[0.2, 0.4, 0.3, 0.6])], tmp_path / "out")
    with pytest.raises(ValueError, match="at least two runs"):
        E.evaluate([a], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written on refusal


def test_cli_prints_the_rows(tmp_path, capsys):
    runs = [_run(tmp_path, "a", 0, MEMBER0), _run(tmp_path, "a_r1", 1, MEMBER1)]
    assert cli.main(["ensemble-classifier", "--models", *runs, "--out", str(tmp_path / "out")]) == 0
    assert "mean score of the 2 replicates" in capsys.readouterr().out


def test_replicate_moves_only_the_training_seed(tmp_path, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_dataset(frame, training, seed=None, **kw):
        if training:
            seen["shuffle_seed"] = seed
        return type("DS", (), {"repeat": lambda self, n: self})()

    def fake_fit(build, compile_args, train_ds, val_ds, cfg, fold_dir, **kw):
        seen["train_seed"] = cfg.seed
        raise Stop

    monkeypatch.setattr(classify.pipelines, "patch_dataset", fake_dataset)
    monkeypatch.setattr(classify.pipelines, "class_weights", lambda frame: None)
    monkeypatch.setattr(classify.training, "fit", fake_fit)
    frame = pd.DataFrame({"label_id": [0, 1, 2]})
    for replicate, expected in ((0, 3), (1, 1003)):
        exp = classify.ClassifierExperiment(seed=1, replicate=replicate)
        with pytest.raises(Stop):
            classify._fit_cnn(exp, 2, frame, frame, None, tmp_path / f"r{replicate}")
        assert seen == {"shuffle_seed": expected, "train_seed": expected}
