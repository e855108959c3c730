"""The full setting lists every committed run, and every config it names loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mammo_tf import candidates, classify, detector, tiled
from mammo_tf.config import from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def _full() -> dict:
    return load_config(ROOT / "configs" / "full.yaml")


def _names(cfg: dict) -> dict[str, str]:
    """Experiment name -> config path, over the full setting's classifier and detector configs."""
    names = {}
    for path in cfg["classifier"]:
        names[from_dict(classify.ClassifierExperiment, load_config(ROOT / path)).name] = path
    for path in cfg["detector"]:
        names[detector.load_experiment(ROOT / path).name] = path
    return names


def test_full_setting_configs_load_and_its_cascade_and_external_use_its_models():
    cfg = _full()
    names = _names(cfg)
    assert len(names) == len(cfg["classifier"]) + len(cfg["detector"])  # no two configs share an output folder
    assert {"data", "classifier", "detector", "cascade", "external", "report"} <= set(cfg["steps"])
    assert cfg["cascade"]["classifier"] in names and cfg["cascade"]["detector"] in names
    assert cfg["external"]["classifier"] in names and set(cfg["external"]["detector"]) <= set(names)
    exps = {e.name: e for e in map(detector.load_experiment, (ROOT / p for p in cfg["detector"]))}
    # The blob reference runs beside detectors of this setting.
    assert set(cfg.get("detector_baselines", [])) <= set(exps)
    # The tiled search uses crops detectors of this setting.
    crops = {name for name, e in exps.items() if e.protocol == "crops"}
    tiled_runs = [tiled.study_entry(e) for e in cfg.get("tiled_detectors", [])]
    assert {n for n, _ in tiled_runs} | {x for _, t in tiled_runs for x in t.partners} <= crops
    runs = set(names) | {candidates.run_name(n) for n in cfg.get("detector_baselines", [])}
    runs |= {tiled.run_name(n, t) for n, t in tiled_runs}
    # Runs of this setting, at least two (exactly two for a paired comparison).
    for group in cfg.get("ensembles", []) + cfg.get("selections", []) + cfg.get("paired_detectors", []):
        assert len(group["runs"]) >= 2 and set(group["runs"]) <= runs and group["name"] not in runs
    assert all(len(group["runs"]) == 2 for group in cfg.get("paired_detectors", []))
    # A contrast curve gathers planted-mass detectors of this setting, beside a detector of the real lesions.
    for group in cfg.get("contrast_curves", []):
        assert group["runs"] and all(exps[n].planted_contrast is not None for n in group["runs"])
        assert exps[group["real"]].planted_contrast is None and group["name"] not in runs
        # The runs compared with the real-lesion run searched whole films of this setting (tiled ones included).
        assert set(group.get("compare", [])) <= runs
        assert all(exps[n].protocol == "whole" for n in group.get("compare", []) if n in exps)
    # A group's other settings are keyword arguments of its step (`study.step_report`): a pair's min_iou, a
    # curve's real-lesion run and the runs compared with it.
    extra = {"paired_detectors": {"min_iou"}, "contrast_curves": {"real", "compare"}}
    for key in ("ensembles", "selections", "paired_detectors", "contrast_curves"):
        allowed = {"name", "runs"} | extra.get(key, set())
        assert all(set(group) <= allowed for group in cfg.get(key, [])), key


def test_every_committed_training_config_is_in_the_full_setting():
    listed = set(_names(_full()).values())
    trained = {}
    for metrics in sorted((ROOT / "models").glob("*/metrics.json")):
        prov = json.loads(metrics.read_text()).get("provenance", {})
        command = (prov.get("trained_by") or {}).get("command") or prov.get("command", "")
        found = re.search(r"--config (\S+)", command)
        if found and "train-" in command:
            trained[metrics.parent.name] = found.group(1)
    assert trained, "no committed training run found"
    missing = {name: path for name, path in trained.items() if path not in listed}
    assert not missing, f"committed runs whose config configs/full.yaml does not list: {missing}"


def test_every_committed_reference_and_comparison_is_in_the_full_setting():
    cfg = _full()
    listed = {candidates.run_name(n) for n in cfg.get("detector_baselines", [])}
    listed |= {tiled.run_name(*tiled.study_entry(e)) for e in cfg.get("tiled_detectors", [])}
    listed |= {g["name"] for key in ("ensembles", "selections", "paired_detectors", "contrast_curves")
               for g in cfg.get(key, [])}
    committed = {d.name for d in (ROOT / "models").iterdir() if d.name.startswith(("blobs_", "paired_", "replicates_",
                                                                                    "selection_", "tiled_", "contrast_"))}
    assert committed and committed <= listed, f"not in configs/full.yaml: {sorted(committed - listed)}"


def test_every_committed_external_detector_run_is_in_the_full_setting():
    listed = {f"external_ddsm_{name}" for name in _full()["external"]["detector"]}
    committed = {d.name for d in (ROOT / "models").glob("external_ddsm_*")}
    assert committed and committed <= listed, f"not in configs/full.yaml: {sorted(committed - listed)}"


def test_every_committed_classifier_run_has_its_fold_models():
    """A classifier experiment in models/ carries each fold's model (a CNN's .keras, a probe's coefficients)."""
    for path in _full()["classifier"]:
        exp = from_dict(classify.ClassifierExperiment, load_config(ROOT / path))
        run = ROOT / "models" / exp.name
        n_folds = min(exp.folds, exp.max_folds or exp.folds)
        missing = [k for k in range(n_folds) if not classify.is_trained_fold(run / f"fold{k}")]
        assert not missing, f"{run.name}: folds {missing} have no model in git"
        if exp.pretrain:  # the stack every fold started from
            assert (run / "pretrain" / "model.keras").is_file(), f"{run.name}: the pretrained model is not in git"
