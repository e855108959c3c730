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


STEPS: dict[str, Callable[[dict, Path], dict]] = {
    "data": step_data,
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
