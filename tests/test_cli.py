"""The command line: every subcommand is there, errors are clear and exit non-zero."""

from __future__ import annotations

import json

from mammo_tf import cli

SUBCOMMANDS = {"fetch", "summary", "run", "train-classifier", "evaluate-classifier", "train-detector",
               "evaluate-detector", "detect", "evaluate-cascade", "evaluate-external", "report",
               "export-detector-arrays", "train-detector-arrays", "evaluate-detector-arrays", "bilateral",
               "ensemble-classifier", "lesion-contrast"}


def test_subcommands():
    parser = cli.build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert SUBCOMMANDS <= set(choices)


def test_summary_prints_the_counts(capsys):
    assert cli.main(["summary"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 322 and out["table_rows"] == 330


def test_missing_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MAMMO_TF_CACHE", str(tmp_path / "cache"))
    assert cli.main(["fetch", "--data", str(tmp_path / "nowhere.tar.gz")]) == 2
    assert "data source not found" in capsys.readouterr().err


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [")
    assert cli.main(["train-classifier", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
