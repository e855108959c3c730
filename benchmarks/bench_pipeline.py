"""Input-pipeline throughput vs training-step throughput of a small CNN, on this machine.

    python benchmarks/bench_pipeline.py [--films 60] [--size 128] [--batch 64] [--max-angle 15]

Prints patches/s of the training pipeline (slice + scale + shuffle + augmentation, batched),
patches/s of training steps on a fixed in-memory batch, and their ratio: a ratio above 1 means
the pipeline feeds the model faster than it trains, so the input is not the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import report  # noqa: E402  (benchmarks/ is the script's own folder)


def small_cnn(size: int = 128, n_classes: int = 3):
    """The project's small classifier (`mammo_tf.models.classifier`), or an inline copy of its layout."""
    try:
        from mammo_tf.models import classifier as clf
    except ImportError:  # benchmarking a checkout that predates the classifier module
        clf = None
    if clf is not None:
        config = clf.ClassifierConfig(input_size=size, num_classes=n_classes)
        return clf.build_classifier(config), "mammo_tf.models.classifier.build_classifier"
    import keras

    model = keras.Sequential([
        keras.Input((size, size, 1)),
        keras.layers.Conv2D(32, 5, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu"),
        keras.layers.SeparableConv2D(128, 3, strides=2, padding="same", activation="relu"),
        keras.layers.SeparableConv2D(256, 3, strides=2, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(n_classes, activation="softmax"),
    ], name="small_cnn")
    return model, "inline"


def bench_pipeline(ds, batches: int) -> float:
    """Patches per second drawn from a batched dataset (after one warm-up batch)."""
    it = iter(ds.repeat())
    next(it)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(it)
        n += int(x.shape[0])
    return n / (time.perf_counter() - start)


def bench_training(model, x, y, steps: int) -> float:
    """Patches per second of training steps on one in-memory batch (after warm-up)."""
    for _ in range(2):  # trace and compile
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return steps * int(x.shape[0]) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    """Run both benchmarks and print the results (also returned)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--films", type=int, default=60, help="number of films to cut patches from")
    parser.add_argument("--strategy", default="grid_drop")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-angle", type=float, default=15.0)
    parser.add_argument("--batches", type=int, default=40, help="pipeline batches timed")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from mammo_tf import patches as P
    from mammo_tf import pipelines as PL
    from mammo_tf.data import mias

    tf.keras.utils.set_random_seed(0)
    annotations = mias.load_annotations()
    films = P.FilmCache()
    t0 = time.perf_counter()
    records = P.cut_patches(annotations, args.strategy, args.size, refnums=mias.REFNUMS[: args.films], films=films)
    t_records = time.perf_counter() - t0
    ds = PL.patch_dataset(records, training=True, batch_size=args.batch, max_angle=args.max_angle, films=films)
    pipeline = bench_pipeline(ds, args.batches)

    model, source = small_cnn(args.size)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y = next(iter(ds))
    training = bench_training(model, x, y, args.steps)

    gpus = tf.config.list_physical_devices("GPU")
    result = {
        "device": gpus[0].name if gpus else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "films": args.films, "patches": len(records), "strategy": args.strategy, "size": args.size,
        "batch": args.batch, "max_angle": args.max_angle, "model": source, "model_params": int(model.count_params()),
        "records_seconds": round(t_records, 2),
        "pipeline_patches_per_s": round(pipeline, 1),
        "training_patches_per_s": round(training, 1),
        "pipeline_to_training_ratio": round(pipeline / training, 2),
    }
    report(result, "bench_pipeline.py", argv, args.json,
           table="Benchmark: input pipeline vs training step (same process)",
           row=f"{args.strategy} {args.size} px, batch {args.batch}",
           values={"pipeline patches/s": result["pipeline_patches_per_s"],
                   "training patches/s": result["training_patches_per_s"],
                   "ratio": result["pipeline_to_training_ratio"]},
           note="ratio > 1: the input pipeline is not the bottleneck")
    return result


if __name__ == "__main__":
    main()
