"""The study's steps, in order: the same functions the notebooks call, driven by one config."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from mammo_tf.config import provenance, save_config
from mammo_tf.io import save_figure, save_json


def step_data(cfg: dict, out: Path) -> dict:
    """Fetch, verify and parse mini-MIAS; write the data summary, fold table and figures."""
    from mammo_tf.data import mias, splits
    from mammo_tf.plots import data as data_plots

    data = cfg.get("data")
    mias.fetch(data)
    ann = mias.load_annotations(data)
    summary = mias.summary(ann)
    folds = splits.fold_table(ann, n_splits=cfg.get("folds", 5), seed=cfg.get("seed", 0))
    summary["folds"] = folds.reset_index().to_dict(orient="records")
    save_json(out / "data_summary.json", summary)
    save_figure(data_plots.distributions(ann), out / "figures" / "mias_distributions.png")
    # Pictures of the films themselves are licensed derivatives: kept out of git (images/ is ignored).
    grid = data_plots.film_grid(ann, cfg.get("example_films", ["mdb028", "mdb184", "mdb005", "mdb001"]),
                                load=lambda r: mias.load_image(r, data))
    save_figure(grid, out / "images" / "mias_films_with_lesions.png")
    return summary


def step_patches(cfg: dict, out: Path) -> dict:
    """Patch counts per strategy and size (and broken lesions), the strategies figure, class weights."""
    from mammo_tf import patches as P
    from mammo_tf.data import mias
    from mammo_tf.plots import patches as PP

    opts = cfg.get("patches", {})
    ann = mias.load_annotations(cfg.get("data"))
    films = P.FilmCache(P.film_loader(cfg.get("data")))
    refnums = None
    if opts.get("films_per_label"):
        refnums = sorted(mias.images_table(ann).groupby("label").head(opts["films_per_label"])["refnum"])
    table = P.patch_table(ann, films=films, refnums=refnums, seed=cfg.get("seed", 0))
    (out / "patches").mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "patches" / "patch_table.csv")
    ref = opts.get("example_film", "mdb028")
    recs = {s: P.cut_patches(ann, s, 128, refnums=[ref], films=films, drop_excluded=False) for s in P.STRATEGIES}
    save_figure(PP.strategies(films.image(ref), recs, P.film_lesions(ann, ref), films.mask(ref)),
                out / "patches" / "images" / "strategies_128.png")
    print(table.to_string(), flush=True)
    return {"patch_table": table.reset_index().to_dict(orient="records")}


def step_classifier(cfg: dict, out: Path) -> dict:
    """Cross-validate the depthwise CNN classifier (the configs listed under `classifier`)."""
    from mammo_tf import classify
    from mammo_tf.config import from_dict, load_config

    results = {}
    for path in cfg.get("classifier", []):
        exp = from_dict(classify.ClassifierExperiment, load_config(path))
        metrics = classify.run_experiment(exp, out / "models" / exp.name, command=f"study step classifier ({path})")
        results[exp.name] = metrics["results"]
    return results


def step_detector(cfg: dict, out: Path) -> dict:
    """Train and evaluate the SSD detectors (`detector`), the blob reference beside those in `detector_baselines`,
    and the crops detectors in `tiled_detectors` searching whole films tile by tile."""
    from mammo_tf import candidates, detector, tiled

    results = {}
    baselines = set(cfg.get("detector_baselines", []))
    for path in cfg.get("detector", []):
        exp = detector.load_experiment(path)
        metrics = detector.run_experiment(exp, out / "models" / exp.name, command=f"study step detector ({path})",
                                          verbose=2)
        results[exp.name] = metrics["results"]
        if exp.name in baselines:  # the blob-candidate reference on the same samples and folds (seconds)
            name = candidates.run_name(exp.name)
            blobs = candidates.run(exp, out / "models" / name, command=f"study step detector ({path}, blobs)")
            results[name] = blobs["results"]
    for entry in cfg.get("tiled_detectors", []):  # once every detector is trained: they need the crops runs
        name, tiles = tiled.study_entry(entry)
        run = tiled.run(out / "models" / name, out / "models" / tiled.run_name(name, tiles), tiles,
                        command=f"study step detector ({name}, tiled{tiles.suffix()})")
        results[tiled.run_name(name, tiles)] = run["results"]
    return results


def step_cascade(cfg: dict, out: Path) -> dict:
    """Cascade (classifier gate, then SSD) against SSD on every film, and the speed benchmark."""
    import importlib.util

    from mammo_tf import cascade

    opts = cfg.get("cascade", {})
    models = out / "models"
    name = f"cascade_{opts['classifier']}_{opts['detector']}"
    metrics = cascade.evaluate_cascade(models / opts["classifier"], models / opts["detector"], models / name,
                                       command="study step cascade")
    # The benchmark script is run as is, so that `make run` and `make bench` measure the same thing.
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cascade.py"
    if bench.is_file() and opts.get("benchmark", True):
        spec = importlib.util.spec_from_file_location("bench_cascade", bench)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(["--classifier", str(models / opts["classifier"]), "--detector", str(models / opts["detector"]),
                     "--cascade-dir", str(models / name), "--films", str(opts.get("films", 4)),
                     "--repeats", str(opts.get("repeats", 1)), "--out", str(models / name / "benchmark.md")])
    return {"results": metrics.get("results", [])}


def step_external(cfg: dict, out: Path) -> dict:
    """The trained classifier on rsna-640 and the detector on the mini-DDSM sample (external validation)."""
    from mammo_tf import external_eval

    opts = cfg.get("external", {})
    models = out / "models"
    results = {}
    # `detector` may name several detectors (a crops-trained one searches the films in tiles).
    detectors = opts.get("detector") or []
    jobs = [("classifier", opts.get("classifier"), opts.get("rsna"), "folder")]
    detectors = [detectors] if isinstance(detectors, str) else detectors
    jobs += [("detector", name, opts.get("ddsm"), "ddsm") for name in detectors]
    for kind, model, data, adapter in jobs:
        if not model or not data or not Path(data).is_dir():
            print(f"[mammo-tf] external {kind}: skipped (no model or no data folder {data!r})", flush=True)
            continue
        evaluate = (external_eval.evaluate_classifier_external if kind == "classifier"
                    else external_eval.evaluate_detector_external)
        run = evaluate(models / model, data, adapter=adapter, out_dir=models / f"external_{adapter}_{model}",
                       max_images=opts.get("max_images"), command="study step external", n_boot=200)
        results[f"{kind} {model}"] = run.get("results", [])
    return results


def step_report(cfg: dict, out: Path) -> dict:
    """Tables and figures of this run's models, in `<out>/REPORT.md`."""
    from mammo_tf import report

    models = out / "models"
    if not models.is_dir():
        return {}
    from mammo_tf import bilateral, ensemble, paired_detection, planted_curve, selection

    if any(models.glob("*/fold*/film_predictions.csv")):  # the classifier runs' films, read bilaterally
        bilateral.evaluate(models, models / "bilateral_films", command="study step report (bilateral)")
    # Replicates of one recipe, a recipe per fold chosen on validation patients, two detectors on the same
    # test lesions, and planted-mass runs against contrast, once every run is trained.
    groups = (("ensembles", ensemble), ("selections", selection), ("paired_detectors", paired_detection),
              ("contrast_curves", planted_curve))
    for key, module in groups:
        for group in cfg.get(key, []):
            runs = [models / name for name in group["runs"]]
            settings = {k: v for k, v in group.items() if k not in ("name", "runs")}  # e.g. a pair's min_iou
            # A curve's real-lesion run and the runs compared with it are folders beside the others, needed too.
            if "real" in settings:
                settings["real"] = models / settings["real"]
            if "compare" in settings:
                settings["compare"] = [models / name for name in settings["compare"]]
            inputs = runs + ([settings["real"]] if "real" in settings else []) + settings.get("compare", [])
            if all((run / "metrics.json").is_file() for run in inputs):
                module.evaluate(runs, models / group["name"], command=f"study step report ({key} {group['name']})",
                                **settings)
    path = report.write_report(models)
    print(report.build_tables(report.collect_rows(models)), flush=True)
    return {"report": str(path)}


STEPS: dict[str, Callable[[dict, Path], dict]] = {
    "data": step_data,
    "patches": step_patches,
    "classifier": step_classifier,
    "detector": step_detector,
    "cascade": step_cascade,
    "external": step_external,
    "report": step_report,
}


def run(cfg: dict, out_root: str | Path = "runs", steps: list[str] | None = None, command: str | None = None) -> dict:
    """Run the configured steps in order into `out_root/<config name>/`, saving the config beside them."""
    out = Path(out_root) / cfg["name"]
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    results = {}
    for name in steps or cfg.get("steps", list(STEPS)):
        if name not in STEPS:
            raise KeyError(f"unknown step {name!r} (known: {list(STEPS)})")
        t0 = time.perf_counter()
        print(f"[mammo-tf] step {name} ...", flush=True)
        results[name] = STEPS[name](cfg, out)
        print(f"[mammo-tf] step {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    save_json(out / "provenance.json", provenance(command))
    return results
