"""Generated results: the README's table is exactly what the committed metrics files say."""

from __future__ import annotations

import math
from pathlib import Path

from mammo_tf import report
from mammo_tf.io import save_json

ROOT = Path(__file__).resolve().parents[1]


def test_readme_matches_committed_metrics():
    assert report.readme_block(ROOT / "models") in (ROOT / "README.md").read_text(), (
        "README results differ from models/*/metrics.json: run `mammo-tf report`"
    )


def test_readme_shows_the_main_tables_and_report_every_one():
    titles = {r["table"] for r in report.collect_rows(ROOT / "models")}
    # A renamed table would silently drop out of the README.
    assert set(report.README_TABLES) <= titles, set(report.README_TABLES) - titles
    readme = (ROOT / "README.md").read_text()
    shown = {line[5:] for line in readme.splitlines() if line.startswith("#### ")}
    assert shown & titles == set(report.README_TABLES)
    assert "Detection: two detectors on the same test lesions, found at 1 false positive per image (paired)" in titles
    full = (ROOT / "models" / "REPORT.md").read_text()
    assert all(f"#### {title}\n" in full for title in titles)
    assert full == report.report_text(ROOT / "models", ROOT / "models"), "models/REPORT.md is stale: run `mammo-tf report`"


def test_format_value():
    assert report.format_value([0.8123, 0.0456]) == "0.812 ± 0.046"
    assert report.format_value(0.5) == "0.500"
    assert report.format_value([0.5, math.nan]) == "0.500"  # one fold: no spread to show
    assert report.format_value(math.nan) == "n/a"
    assert report.format_value("leaky") == "leaky"


def test_tables_and_readme_update(tmp_path):
    models = tmp_path / "models"
    save_json(models / "a" / "metrics.json", {"results": [
        {"table": "T", "row": "cnn", "values": {"AUC": [0.7, 0.1]}, "command": "c", "hardware": "h", "date": "d"},
        {"table": "T", "row": "majority", "values": {"AUC": 0.5, "acc": 0.6}, "command": "c", "hardware": "h", "date": "d"},
    ]})
    text = report.build_tables(report.collect_rows(models))
    assert "| cnn | 0.700 ± 0.100 |  |" in text and "| majority | 0.500 | 0.600 |" in text
    assert "`models/a`: `c` — h, d" in text and "trained by" not in text
    # A re-evaluated model also names the run that trained it.
    save_json(models / "b" / "metrics.json", {
        "provenance": {"command": "e", "trained_by": {"command": "t", "date": "d0"}},
        "results": [{"table": "T", "row": "cnn b", "values": {"AUC": 0.8}, "command": "e", "hardware": "h", "date": "d1"}]})
    assert "- `models/b`: `e` — h, d1 (trained by `t` on d0)" in report.build_tables(report.collect_rows(models))
    (models / "b" / "metrics.json").unlink()
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nstale\n{report.END}\noutro\n")
    assert report.update_readme(readme, models, tables=("T",))
    assert "stale" not in readme.read_text() and readme.read_text().endswith("outro\n")
    assert "| cnn | 0.700 ± 0.100 |  |" in readme.read_text()
    assert not report.update_readme(readme, models, tables=("T",))
    # A table not chosen for the README stays out of it, and is still in REPORT.md.
    assert report.update_readme(readme, models, tables=("other",))
    assert "| cnn |" not in readme.read_text()
    assert "| cnn | 0.700 ± 0.100 |  |" in report.write_report(models).read_text()


def test_a_fact_reported_twice_is_listed_once_but_rows_with_other_notes_are_kept():
    row = {"table": "T", "row": "same", "values": {"a": 1.0}, "note": "folds 0, 1", "command": "c", "hardware": "h",
           "date": "d", "model": "models/x"}
    again = dict(row, model="models/y")
    other = dict(row, note="folds 0, 1, 2", model="models/z")
    lines = [line for line in report.build_tables([row, again, other]).splitlines() if line.startswith("| same")]
    assert lines == ["| same | 1.000 | folds 0, 1 |", "| same | 1.000 | folds 0, 1, 2 |"]


def test_tables_go_by_section_with_the_planted_ones_closing_theirs():
    base = {"values": {"a": 1.0}, "command": "c", "hardware": "h", "date": "d", "model": "models/x"}
    titles = ["Detection, whole films [PLANTED]", "Detection (real)", "Classification (patches)",
              "Detection (planted) [PLANTED]", "Detection, by type", "Cascade"]
    rows = [dict(base, table=t, row=f"r{i}") for i, t in enumerate(titles)]
    headings = [line[5:] for line in report.build_tables(rows).splitlines() if line.startswith("#### ")]
    assert headings == ["Classification (patches)", "Detection (real)", "Detection, by type",
                        "Detection, whole films [PLANTED]", "Detection (planted) [PLANTED]", "Cascade"]


def test_the_report_step_passes_a_groups_own_settings_to_its_step_once_its_runs_are_there(tmp_path, monkeypatch):
    from mammo_tf import ensemble, paired_detection, planted_curve, study

    models = tmp_path / "models"
    for name in ("a", "b", "real", "tiled"):
        save_json(models / name / "metrics.json", {})
    calls = []
    for module in (ensemble, paired_detection, planted_curve):
        monkeypatch.setattr(module, "evaluate", lambda runs, out, command, _m=module.__name__, **kw:
                            calls.append((_m, [r.name for r in runs], out.name, kw)))
    monkeypatch.setattr(report, "write_report", lambda models: models / "REPORT.md")
    monkeypatch.setattr(report, "collect_rows", lambda models: [])
    cfg = {"paired_detectors": [{"name": "p", "runs": ["a", "b"], "min_iou": 0.5}, {"name": "q", "runs": ["a", "b"]}],
           "ensembles": [{"name": "e", "runs": ["a", "missing"]}],
           "contrast_curves": [{"name": "c", "runs": ["a", "b"], "real": "real", "compare": ["tiled"]},
                               {"name": "d", "runs": ["a"], "real": "missing"},
                               {"name": "f", "runs": ["a"], "real": "real", "compare": ["tiled", "missing"]}]}
    assert study.step_report(cfg, tmp_path) == {"report": str(models / "REPORT.md")}
    # The ensemble and two curves wait for their missing runs; each pair gets its own settings, and only those; a
    # curve's real-lesion run and the runs it compares are folders beside the others, not among its runs.
    assert calls == [("mammo_tf.paired_detection", ["a", "b"], "p", {"min_iou": 0.5}),
                     ("mammo_tf.paired_detection", ["a", "b"], "q", {}),
                     ("mammo_tf.planted_curve", ["a", "b"], "c", {"real": models / "real", "compare": [models / "tiled"]})]


def test_report_check_fails_when_the_readme_or_report_is_stale(tmp_path, capsys):
    from mammo_tf import cli

    models = tmp_path / "models"
    save_json(models / "a" / "metrics.json", {"results": [
        {"table": report.README_TABLES[0], "row": "cnn", "values": {"params": 100}, "command": "c", "hardware": "h",
         "date": "d"}]})
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\n{report.END}\n")
    args = ["report", "--models", str(models), "--readme", str(readme)]
    assert cli.main(args + ["--check"]) == 1
    assert cli.main(args) == 0 and "| cnn | 100 |" in readme.read_text()
    assert cli.main(args + ["--check"]) == 0
    save_json(models / "a" / "metrics.json", {"results": [
        {"table": report.README_TABLES[0], "row": "cnn", "values": {"params": 101}, "command": "c", "hardware": "h",
         "date": "d"}]})
    capsys.readouterr()
    assert cli.main(args + ["--check"]) == 1
    err = capsys.readouterr().err
    assert "results block differs" in err and "REPORT.md differs" in err
