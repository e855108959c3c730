"""Cascade benchmark: time per mammogram, FLOPs and parameters of SSD-VGG16, SSD-cnn and the gated cascades.

    python benchmarks/bench_cascade.py [--classifier DIR] [--detector DIR] [--cascade-dir DIR]
                                       [--vgg16-detector DIR] [--vgg16-cascade-dir DIR]
                                       [--films 8] [--repeats 3] [--out FILE.md]

In one process on this machine, every variant runs end to end from the image file (read, breast
mask, classifier, breast crop and resize, SSD forward pass, NMS: `mammo_tf.cascade.run_cascade_on_image`)
on the same films, warm (each model traced first), variants interleaved within each repeat:

* ``SSD-VGG16, every film`` (the reference of the ratios), ``SSD-cnn, every film``,
* ``cascade + SSD-cnn``, ``cascade + SSD-VGG16``: the whole-mammogram classifier gates the detector.

Time per film: median over repeats per film, then median over films. The cascades' time depends on
the share of films passing the gate: it is measured on these films and printed, and, when an
`evaluate_cascade` folder is given, the time at its test pass rate is estimated as
``median(load + preprocess + classifier) + pass rate x median(detector + NMS)``.

Models: a detector folder (`--detector`, `--vgg16-detector`) or, without one, a freshly built SSD
with random weights (speed does not depend on the weights, except that an untrained head sends more
boxes to NMS; its quality columns read "not trained"). The classifier is fold `--classifier-fold` of
`--classifier`, or a fresh random small CNN. Gate threshold: `--gate-threshold`, else the
`gate.json` of `--cascade-dir`, else chosen at `--sensitivity` on the classifier's out-of-fold film
predictions (for timing only), else (untrained classifier) the median score of the timed films.

FLOPs: TensorFlow's graph profiler (`tf.compat.v1.profiler`, float_operation) on the frozen
concrete function of each model, batch of one (a multiply-add counts 2); the classifier's per film is
its per-patch count times the mean number of breast patches per film. Parameters: `count_params()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VGG = "SSD-VGG16, every film"
CNN = "SSD-cnn, every film"
CASCADE_CNN = "cascade + SSD-cnn"
CASCADE_VGG = "cascade + SSD-VGG16"
DETECTOR_CONFIG = ROOT / "configs" / "detector" / "cnn300_whole.yaml"


def build_detectors(args: argparse.Namespace) -> dict:
    """{"cnn": (model, exp, anchors, source), "vgg16": ...}: trained folders, or fresh random SSDs."""
    from mammo_tf import detector as D
    from mammo_tf.models.ssd import build_ssd

    base = D.load_experiment(DETECTOR_CONFIG)
    out = {}
    for key, folder in (("cnn", args.detector), ("vgg16", args.vgg16_detector)):
        if folder:
            model, exp, anchors = D.load_detector(folder)
            if exp.ssd_config().backbone != key:
                raise SystemExit(f"{folder}: a {exp.ssd_config().backbone} detector, expected {key}")
            out[key] = (model, exp, anchors, f"trained: {folder}")
        else:
            exp = dataclasses.replace(base, name=f"ssd_{key}300_untrained", ssd={**base.ssd, "backbone": key, "weights": "random"})
            model, anchors = build_ssd(exp.ssd_config())
            out[key] = (model, exp, anchors, f"fresh, random weights ({DETECTOR_CONFIG.name} with backbone {key})")
    return out


def build_classifier(args: argparse.Namespace):
    """(model, source): fold `classifier_fold` of `--classifier`, or a fresh random small CNN (128 px)."""
    from mammo_tf import cascade as C

    if args.classifier:
        return C.load_classifier_fold(args.classifier, args.classifier_fold), f"trained: {args.classifier} fold {args.classifier_fold}"
    from mammo_tf.models import classifier as clf

    return clf.build_classifier(clf.ClassifierConfig(input_size=128)), "fresh, random weights (128 px)"


def pick_films(args: argparse.Namespace) -> list[str]:
    """Films to time: the classifier fold's test films (their gate is honest), else a seeded draw of mini-MIAS."""
    import numpy as np
    import pandas as pd

    from mammo_tf.data import mias

    if args.classifier:
        pool = sorted(pd.read_csv(Path(args.classifier) / f"fold{args.classifier_fold}" / "film_predictions.csv")["refnum"])
    else:
        pool = list(mias.REFNUMS)
    rng = np.random.default_rng(args.seed)
    return sorted(rng.choice(pool, size=min(args.films, len(pool)), replace=False).tolist())


def gate_threshold(args: argparse.Namespace, classifier, paths) -> tuple[float, str]:
    """The gate threshold and where it comes from (see the module docstring)."""
    import numpy as np
    import pandas as pd

    from mammo_tf import cascade as C
    from mammo_tf.classify import score_image
    from mammo_tf.imageio import read_image

    if args.gate_threshold is not None:
        return args.gate_threshold, "given (--gate-threshold)"
    if args.cascade_dir and (Path(args.cascade_dir) / C.GATE_FILE).is_file():
        gate = C.load_gate(args.cascade_dir)
        return float(gate["threshold"]), f"{args.cascade_dir}/{C.GATE_FILE} (sensitivity {gate['sensitivity']})"
    if args.classifier:
        oof = pd.concat(pd.read_csv(p) for p in sorted(Path(args.classifier).glob("fold*/film_predictions.csv")))
        t = C.choose_gate_threshold(oof["abnormal_score"], oof["label_id"], args.sensitivity)
        return t, f"out-of-fold film predictions of {args.classifier}, sensitivity {args.sensitivity} (timing only)"
    scores = [1.0 - score_image(classifier, read_image(p))[0][0] for p in paths]
    return float(np.median(scores)), "untrained classifier: median score of the timed films (about half pass)"


def quality(cascade_dir: str | None, sensitivity: float | None) -> dict:
    """mAP and sens@1FP (mean ± std over folds) and test pass rate of one variant from an evaluate_cascade folder."""
    from mammo_tf import cascade as C
    from mammo_tf.io import load_json
    from mammo_tf.report import format_value

    if not cascade_dir or not (Path(cascade_dir) / "metrics.json").is_file():
        return {"mAP": "not trained", "sens@1FP": "not trained", "test_pass_rate": None, "map": math.nan, "sens": math.nan}
    summary = load_json(Path(cascade_dir) / "metrics.json")["summary"][C.variant_name(sensitivity)]

    def cell(key: str):
        s = summary[key]
        return [s["mean"], s["std"]] if s["n"] > 1 else s["mean"]

    return {"mAP": format_value(cell("map")), "sens@1FP": format_value(cell("sens_at_1fp")),
            "test_pass_rate": summary["pass_rate"]["mean"], "map": summary["map"]["mean"],
            "sens": summary["sens_at_1fp"]["mean"]}


def classifier_patches(paths, classifier) -> tuple[float, float]:
    """(mean breast patches per film, median seconds of a bare forward pass on one film's patches).

    The patches follow `score_image`'s rule; the bare pass (``model(batch)``, warm) shows how much
    of the classifier stage is the network itself rather than the call around it.
    """
    import time

    import numpy as np

    from mammo_tf import patches as P
    from mammo_tf.imageio import read_image

    size = int(classifier.input_shape[1])
    counts, seconds = [], []
    for p in paths:
        image = read_image(p)
        tops, lefts = P.grid_positions(image.shape, size, keep_edge=True)
        keep = P.window_fraction(P.breast_mask(image), tops, lefts, size) > 0
        batch = np.stack([image[t:t + size, l:l + size] for t, l in zip(tops[keep], lefts[keep])])[..., None] / np.float32(255)
        counts.append(len(batch))
        classifier(batch, training=False)  # warm for this batch shape
        t0 = time.perf_counter()
        np.asarray(classifier(batch, training=False))
        seconds.append(time.perf_counter() - t0)
    return float(np.mean(counts)), float(np.median(seconds))


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, write it (Markdown + JSON) when --out is given; return the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", default=None, help="classifier experiment folder (fold<k>/model.keras)")
    parser.add_argument("--classifier-fold", type=int, default=0)
    parser.add_argument("--detector", default=None, help="trained SSD-cnn detector folder (default: fresh, random)")
    parser.add_argument("--cascade-dir", default=None, help="evaluate_cascade folder of --detector (gate.json, quality)")
    parser.add_argument("--vgg16-detector", default=None, help="trained SSD-VGG16 folder (default: fresh, random)")
    parser.add_argument("--vgg16-cascade-dir", default=None, help="evaluate_cascade folder of --vgg16-detector")
    parser.add_argument("--gate-threshold", type=float, default=None)
    parser.add_argument("--sensitivity", type=float, default=0.95, help="gate sensitivity when no gate.json is given")
    parser.add_argument("--films", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the table here (Markdown) and beside it as .json")
    args = parser.parse_args(argv)

    import keras
    import numpy as np
    import pandas as pd

    from mammo_tf import cascade as C
    from mammo_tf.config import provenance
    from mammo_tf.data import mias
    from mammo_tf.io import atomic_write_text, save_figure, save_json

    keras.utils.set_random_seed(args.seed)
    folder = mias.fetch()
    films = pick_films(args)
    paths = [folder / f"{r}.pgm" for r in films]
    detectors = build_detectors(args)
    classifier, classifier_source = build_classifier(args)
    threshold, threshold_source = gate_threshold(args, classifier, paths)
    variants = {
        VGG: C.Cascade(*detectors["vgg16"][:3]),
        CNN: C.Cascade(*detectors["cnn"][:3]),
        CASCADE_CNN: C.Cascade(*detectors["cnn"][:3], classifier=classifier, threshold=threshold),
        CASCADE_VGG: C.Cascade(*detectors["vgg16"][:3], classifier=classifier, threshold=threshold),
    }
    print(f"[bench_cascade] {len(paths)} films x {args.repeats} repeats, 4 variants; gate threshold {threshold:.4f} "
          f"({threshold_source})", flush=True)
    timings = C.benchmark_variants(variants, paths, repeats=args.repeats)
    table = C.timing_table(timings, reference=VGG)

    # FLOPs and parameters.
    det_flops = {k: C.count_flops(v[0]) for k, v in detectors.items()}
    n_patches, bare_forward = classifier_patches(paths, classifier)
    clf_flops = C.count_flops(classifier) * n_patches
    gate_sens = args.sensitivity
    if args.cascade_dir and (Path(args.cascade_dir) / C.GATE_FILE).is_file() and args.gate_threshold is None:
        gate_sens = float(C.load_gate(args.cascade_dir)["sensitivity"])
    qual = {VGG: quality(args.vgg16_cascade_dir, None), CNN: quality(args.cascade_dir, None),
            CASCADE_CNN: quality(args.cascade_dir, gate_sens), CASCADE_VGG: quality(args.vgg16_cascade_dir, gate_sens)}
    if qual[CASCADE_VGG]["test_pass_rate"] is None:
        # The gate's pass rate depends on the classifier and threshold only, not on the detector behind it.
        qual[CASCADE_VGG]["test_pass_rate"] = qual[CASCADE_CNN]["test_pass_rate"]
    det_part = {k: float((timings[timings["variant"] == v]["detector"] + timings[timings["variant"] == v]["nms"]).median())
                for k, v in (("cnn", CNN), ("vgg16", VGG))}
    rows = []
    for name in variants:
        key = "vgg16" if "VGG16" in name else "cnn"
        gated = name.startswith("cascade")
        t = table.loc[name]
        pass_rate = float(t["pass_rate"])
        row = {
            "variant": name, "detector": detectors[key][3],
            "params_M": (detectors[key][0].count_params() + (classifier.count_params() if gated else 0)) / 1e6,
            "GFLOPs_per_film": (det_flops[key] * (pass_rate if gated else 1.0) + (clf_flops if gated else 0.0)) / 1e9,
            "s_per_film": float(t["total_s"]), "ratio_vs_vgg16_every_film": float(t["ratio"]),
            "films_to_detector": pass_rate, "mAP": qual[name]["mAP"], "sens@1FP": qual[name]["sens@1FP"],
            "test_pass_rate": qual[name]["test_pass_rate"],
            **{f"{s}_s": float(t[f"{s}_s"]) for s in C.STAGES},
        }
        if gated and qual[name]["test_pass_rate"] is not None:
            rest = timings[timings["variant"] == name]
            gate_part = float((rest["load"] + rest["preprocess"] + rest["classifier"]).median())
            row["s_per_film_at_test_pass_rate"] = gate_part + qual[name]["test_pass_rate"] * det_part[key]
        rows.append(row)
    frame = pd.DataFrame(rows).set_index("variant")
    fastest = frame["s_per_film"].idxmin()
    fastest_cascade = frame.loc[[CASCADE_CNN, CASCADE_VGG], "s_per_film"].idxmin()
    breakdown = {name: {s: float(frame.loc[name, f"{s}_s"]) for s in C.STAGES} for name in dict.fromkeys([fastest, fastest_cascade])}
    prov = provenance("python benchmarks/bench_cascade.py " + " ".join(sys.argv[1:] if argv is None else argv))
    hw = prov["hardware"]
    hardware = f"{hw['cpu']} ({hw['cpu_count']} cores), GPU: {hw['gpus'] if isinstance(hw['gpus'], str) else ', '.join(hw['gpus'])}"
    text = _markdown(frame, fastest, breakdown, hardware, prov, len(paths), args.repeats, threshold, threshold_source,
                     classifier_source, n_patches, C.count_flops(classifier), classifier.count_params(), bare_forward)
    print(text)
    result = {"table": frame.reset_index().to_dict("records"), "fastest": fastest, "breakdown_s": breakdown,
              "films": films, "repeats": args.repeats, "gate_threshold": threshold, "gate_source": threshold_source,
              "classifier": classifier_source, "classifier_patches_per_film": n_patches,
              "classifier_bare_forward_s": bare_forward,
              "detector_flops": det_flops, "classifier_flops_per_patch": C.count_flops(classifier),
              "flops_method": "tf.compat.v1.profiler float_operation on the frozen concrete function, batch of 1",
              "timings": timings.to_dict("records"), "hardware": hardware, "provenance": prov}
    if args.out:
        atomic_write_text(args.out, text)
        save_json(args.out.with_suffix(".json"), result)
        points = _points(frame, det_part, timings, args)
        if len(points):
            from mammo_tf.plots.cascade import plot_tradeoff

            save_figure(plot_tradeoff(points), args.out.with_name(args.out.stem + "_tradeoff.png"))
        result["points"] = points.to_dict("records")
        save_json(args.out.with_suffix(".json"), result)
    return result


def _points(frame, det_part: dict, timings, args) -> "pd.DataFrame":
    """Trade-off points per detector: every film (measured) and each evaluated gate (time at its test pass rate)."""
    import pandas as pd

    from mammo_tf import cascade as C
    from mammo_tf.io import load_json

    points = []
    for key, every, gated, cdir in (("cnn", CNN, CASCADE_CNN, args.cascade_dir), ("vgg16", VGG, CASCADE_VGG, args.vgg16_cascade_dir)):
        q = quality(cdir, None)
        points.append({"detector": f"SSD-{key}", "variant": "every film", "time_s": frame.loc[every, "s_per_film"],
                       "map": q["map"], "sens_at_1fp": q["sens"], "pass_rate": 1.0})
        rest = timings[timings["variant"] == gated]
        gate_part = float((rest["load"] + rest["preprocess"] + rest["classifier"]).median())
        sens = []
        if cdir and (Path(cdir) / "metrics.json").is_file():
            sens = load_json(Path(cdir) / "metrics.json")["sensitivities"]
        if not sens and args.cascade_dir and (Path(args.cascade_dir) / "metrics.json").is_file():
            # No evaluation behind this detector: the gate's pass rates (detector-independent), quality unknown.
            sens = load_json(Path(args.cascade_dir) / "metrics.json")["sensitivities"]
            cdir_rates, known = args.cascade_dir, False
        else:
            cdir_rates, known = cdir, True
        for s in sens:
            q, rate = quality(cdir, s), quality(cdir_rates, s)["test_pass_rate"]
            points.append({"detector": f"SSD-{key}", "variant": C.variant_name(s), "pass_rate": rate,
                           "time_s": gate_part + rate * det_part[key], "map": q["map"] if known else math.nan,
                           "sens_at_1fp": q["sens"] if known else math.nan})
        if not sens:
            points.append({"detector": f"SSD-{key}", "variant": "cascade (timed films)", "time_s": frame.loc[gated, "s_per_film"],
                           "map": math.nan, "sens_at_1fp": math.nan, "pass_rate": frame.loc[gated, "films_to_detector"]})
    return pd.DataFrame(points)


def _markdown(frame, fastest: str, breakdown: dict[str, dict], hardware: str, prov: dict, n_films: int, repeats: int,
              threshold: float, threshold_source: str, classifier_source: str, n_patches: float, clf_flops: int,
              clf_params: int, bare_forward: float) -> str:
    def fmt(v, spec: str) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    lines = [
        f"Cascade benchmark: {n_films} films x {repeats} repeats, end to end from the PGM file, warm; "
        f"median over films of the median over repeats.",
        f"Hardware: {hardware}. TensorFlow {prov['versions']['tensorflow']}, Keras {prov['versions']['keras']}. {prov['date']}.",
        f"Gate: classifier {classifier_source}; {clf_params / 1e6:.3f} M parameters, {clf_flops / 1e6:.1f} MFLOPs per "
        f"128-px patch x {n_patches:.1f} breast patches per film; threshold {threshold:.4f} ({threshold_source}).",
        "",
        "| variant | params (M) | GFLOPs/film | s/film | vs SSD-VGG16 every film | films to detector | "
        "s/film at test pass rate | mAP | sens@1FP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in frame.iterrows():
        est = r.get("s_per_film_at_test_pass_rate", math.nan)
        tpr = f" ({r['test_pass_rate']:.0%})" if not (est is None or math.isnan(est)) else ""
        lines.append(f"| {name} | {r['params_M']:.2f} | {r['GFLOPs_per_film']:.2f} | {r['s_per_film']:.3f} | "
                     f"{r['ratio_vs_vgg16_every_film']:.3f}x | {r['films_to_detector']:.0%} | {fmt(est, '.3f')}{tpr} | "
                     f"{r['mAP']} | {r['sens@1FP']} |")
    lines.append("")
    gated = frame.loc[[CASCADE_CNN, CASCADE_VGG], "classifier_s"].median()
    lines.append(f"Classifier stage (score_image: patch cutting, Keras predict, heat map): median {gated * 1000:.1f} ms "
                 f"per film; the bare forward pass on the same patches (model call): {bare_forward * 1000:.1f} ms.")
    lines.append("Detectors: " + "; ".join(sorted({f"{'VGG16' if 'VGG16' in n else 'cnn'}: {r['detector']}" for n, r in frame.iterrows()})) + ".")
    for name, stages in breakdown.items():
        total = sum(stages.values())
        which = "fastest variant" if name == fastest else "fastest cascade"
        lines.append(f"Where the time goes, {which} ({name}, median per stage): " + ", ".join(
            f"{s} {v * 1000:.1f} ms ({v / total:.0%})" for s, v in stages.items()) + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
