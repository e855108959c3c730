"""Bootstrap CI of an AUC difference: scikit-learn's roc_auc_score against the rank identity, same draws.

    python benchmarks/bench_bootstrap.py [--run models/cnn128_grid_keep_e60] [--draws 300] [--repeats 3]
                                         [--json FILE]

On a committed classifier run's out-of-fold patch predictions (every fold's `patch_predictions.csv`:
thousands of test patches of some 160 patients), `bootstrap_auc_ci` computes the paired CI of
CNN minus logistic abnormal AUC, test patients resampled within each fold, as `classify.paired_bootstrap`
does, once with each AUC function and the same seed, the two interleaved within each repeat. Prints
the median seconds of each, their ratio, and the largest difference between the two CIs' ends (the
two functions compute the same AUC, so it should be at rounding level).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import report  # noqa: E402  (benchmarks/ is the script's own folder)


def main(argv: list[str] | None = None) -> dict:
    """Time both AUC functions inside the bootstrap and print the results (also returned)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "models" / "cnn128_grid_keep_e60")
    parser.add_argument("--draws", type=int, default=300, help="bootstrap resamples per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from mammo_tf.metrics.classification import bootstrap_auc_ci, rank_auc

    paths = sorted(args.run.glob("fold*/patch_predictions.csv"))
    if not paths:
        raise SystemExit(f"{args.run}: no fold*/patch_predictions.csv (a committed classifier run is needed)")
    frame = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    inputs = dict(y_true=frame["label_id"].to_numpy() != 0, score=frame["score_cnn"], n_boot=args.draws,
                  groups=frame["patient_id"].to_numpy(), baseline=frame["score_logistic"],
                  strata=frame["fold"].to_numpy(), seed=0)
    functions = {"roc_auc_score": roc_auc_score, "rank_auc": rank_auc}
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    cis: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, auc in functions.items():
            t0 = time.perf_counter()
            cis[name] = bootstrap_auc_ci(**inputs, auc=auc)
            seconds[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    gap = max(abs(cis["roc_auc_score"][k] - cis["rank_auc"][k]) for k in ("auc_difference", "ci_low", "ci_high"))
    result = {
        "run": args.run.name, "patches": len(frame), "patients": int(cis["rank_auc"]["n_units"]),
        "folds": len(paths), "draws": args.draws, "repeats": args.repeats,
        "roc_auc_score_seconds": round(median["roc_auc_score"], 3), "rank_auc_seconds": round(median["rank_auc"], 3),
        "speed_ratio": round(median["roc_auc_score"] / median["rank_auc"], 1), "largest_ci_difference": gap,
    }
    report(result, "bench_bootstrap.py", argv, args.json,
           table="Benchmark: bootstrap CI of an AUC difference, roc_auc_score against the rank identity (same process)",
           row=f"{args.run.name}: {len(frame)} test patches of {result['patients']} patients, {args.draws} draws",
           values={"roc_auc_score s": result["roc_auc_score_seconds"], "rank_auc s": result["rank_auc_seconds"],
                   "ratio": result["speed_ratio"], "largest CI difference": f"{gap:.1e}"},
           note=f"median of {args.repeats} interleaved repeats; ratio > 1: the rank identity is faster")
    return result


if __name__ == "__main__":
    main()
