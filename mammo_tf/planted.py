"""Synthetic masses planted in mini-MIAS's normal films: a detection-limit check of known difficulty.

Half of the normal films (drawn with the seed) get one mass: a Gaussian bump of standard
deviation r / 2 added to the film, centred in the breast at least r / 2 from its edge and the
film's, r drawn from the radii of the real located lesions. ``contrast`` is in grey levels as
:func:`lesion_contrast` measures it on a real lesion (mean within r / 2 of the centre minus the
mean of the breast ring between 1.5 r and 2 r), so a planted mass can be matched to the real
ones. Each is annotated as a circumscribed benign mass (CIRC, B) of radius r, in the table layout
of :func:`mammo_tf.data.mias.load_annotations`; the other films stay normal. The raw films are
never modified: masses are added to the loaded copy.
"""

from __future__ import annotations

from typing import Any, Callable

import cv2
import numpy as np
import pandas as pd

from mammo_tf import patches as P
from mammo_tf.data import mias

PLANTED_SHARE = 0.5
# A mass that adds under this share of its contrast counts as clipped at 255 by bright tissue.
KEPT_SHARE = 0.97
# Mean of exp(-d^2 / (2 sigma^2)), sigma = r / 2, over the disc d <= r / 2: 2 (1 - e^(-1/2)). The
# bump's tail adds about 0.4 % of that to the ring, so a mass measures within 1 % of its contrast.
_INNER_MEAN = 2.0 * (1.0 - np.exp(-0.5))


def lesion_contrast(image: np.ndarray, x: float, y: float, r: float, mask: np.ndarray) -> float:
    """A lesion's contrast in grey levels: mean within r/2 of (x, y) minus the mean of the breast ring 1.5 r..2 r."""
    yy, xx = np.ogrid[: image.shape[0], : image.shape[1]]
    d = np.hypot(xx - x, yy - y)
    ring = (d >= 1.5 * r) & (d <= 2.0 * r) & mask
    if not ring.any():
        raise ValueError(f"no breast pixels in the ring around ({x}, {y}), r {r}")
    return float(image[d <= r / 2].mean() - image[ring].mean())


def plant_mass(image: np.ndarray, x: float, y: float, r: float, contrast: float) -> np.ndarray:
    """A copy of a uint8 film with a Gaussian mass of `lesion_contrast` `contrast` centred at (x, y)."""
    yy, xx = np.ogrid[: image.shape[0], : image.shape[1]]
    bump = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2.0 * (r / 2.0) ** 2))
    out = image.astype(np.float32) + (contrast / _INNER_MEAN) * bump
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _centre(mask: np.ndarray, r: float, rng: np.random.Generator) -> tuple[float, float]:
    """A random breast pixel at least r / 2 from the breast's and the film's edge (the deepest one when none is)."""
    inside = mask.astype(np.uint8)
    inside[[0, -1], :] = inside[:, [0, -1]] = 0  # the film's edge bounds the breast too (the chest wall side)
    inside = cv2.distanceTransform(inside, cv2.DIST_L2, 5)
    ys, xs = np.nonzero(inside >= r / 2.0)
    if len(ys) == 0:
        ys, xs = np.unravel_index([int(np.argmax(inside))], inside.shape)
    i = int(rng.integers(len(ys)))
    return float(xs[i]), float(ys[i])


def lesion_contrasts(annotations: pd.DataFrame, films: P.FilmCache,
                     read: Callable[[str], np.ndarray] | None = None) -> pd.DataFrame:
    """The located lesions' annotation rows with their `lesion_contrast`, films read by `read` (default `films`).

    A lesion without breast pixels in its ring cannot be measured and is left out.
    """
    from mammo_tf.detector import lesion_numbers

    read = read or films.image
    # `lesion` (its place among the film's located lesions) keys it to a detector run's lesions_found.csv.
    located = annotations[annotations["has_location"]].assign(lesion=lesion_numbers(annotations)).reset_index(drop=True)
    contrasts = []
    for row in located.itertuples():
        try:
            contrasts.append(lesion_contrast(read(row.refnum), row.x, row.y, row.radius, films.mask(row.refnum)))
        except ValueError:
            contrasts.append(np.nan)
    return located.assign(contrast=contrasts).dropna(subset=["contrast"]).reset_index(drop=True)


def contrast_summary(contrasts: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Count and quartiles of the contrast, over all lesions and per abnormality class."""
    def quartiles(values: pd.Series) -> dict[str, float]:
        q = values.quantile([0.25, 0.5, 0.75])
        return {"n": int(len(values)), "q25": float(q[0.25]), "median": float(q[0.5]), "q75": float(q[0.75])}

    return {"all": quartiles(contrasts["contrast"]),
            **{a: quartiles(g["contrast"]) for a, g in contrasts.groupby("abnormality")}}


def add_cli(sub: Any) -> None:
    """The ``lesion-contrast`` subcommand."""
    p = sub.add_parser("lesion-contrast",
                       help="the contrast of mini-MIAS's located lesions, as planted masses are measured")
    p.add_argument("--data", default=None)
    p.add_argument("--planted", type=float, nargs="*", default=[],
                   help="also measure the planted masses of these contrasts where they sit, tissue included")
    p.set_defaults(func=_cli)


def _cli(args: Any) -> int:
    films = P.FilmCache(P.film_loader(args.data))
    annotations = mias.load_annotations(args.data)
    summaries = contrast_summary(lesion_contrasts(annotations, films))
    notes = {}
    tissue = planted_lesion_contrasts(annotations, films, 0.0)["contrast"] if args.planted else None
    for contrast in args.planted:
        measured = planted_lesion_contrasts(annotations, films, contrast)
        summaries[f"planted {contrast:g}"] = contrast_summary(measured)["all"]
        clipped = int(((measured["contrast"] - tissue) < KEPT_SHARE * contrast).sum())
        notes[f"planted {contrast:g}"] = (f"  (bright tissue clips {clipped} at 255 to under {KEPT_SHARE:.0%} "
                                          f"of {contrast:g})")
    for name, q in summaries.items():
        print(f"{name:11s} n {q['n']:3d}  median {q['median']:5.1f}  "
              f"quartiles {q['q25']:5.1f} .. {q['q75']:5.1f} grey levels{notes.get(name, '')}")
    return 0


def planted_annotations(annotations: pd.DataFrame, films: P.FilmCache, seed: int = 0) -> pd.DataFrame:
    """The normal films' annotations, half of them (seeded) given one planted mass (CIRC, B) each."""
    radii = annotations.loc[annotations["has_location"], "radius"].to_numpy(float)
    if len(radii) == 0:
        raise ValueError("planted masses draw their radii from located lesions, and there are none")
    images = mias.images_table(annotations)
    normal = annotations[annotations["refnum"].isin(images.loc[images["label"] == "normal", "refnum"])]
    rng = np.random.default_rng(seed)
    refnums = sorted(normal["refnum"].unique())
    chosen = set(rng.choice(refnums, size=int(round(PLANTED_SHARE * len(refnums))), replace=False))
    rows = []
    for row in normal.sort_values("refnum").to_dict("records"):
        if row["refnum"] in chosen:
            r = float(rng.choice(radii))
            x, y = _centre(films.mask(row["refnum"]), r, rng)
            row.update(abnormality="CIRC", severity="B", x=x, y=y, radius=r, has_location=True,
                       label="benign", label_id=mias.CLASSES.index("benign"))
        rows.append(row)
    return pd.DataFrame(rows, columns=annotations.columns).reset_index(drop=True)


def planted_loader(load: Callable[[str], np.ndarray], planted: pd.DataFrame,
                   contrast: float) -> Callable[[str], np.ndarray]:
    """A film reader that returns each film with its planted mass (if `planted` gives it one) added."""
    masses = {r.refnum: (r.x, r.y, r.radius) for r in planted[planted["has_location"]].itertuples()}

    def read(refnum: str) -> np.ndarray:
        image = load(refnum)
        if refnum not in masses:
            return image
        x, y, r = masses[refnum]
        return plant_mass(image, x, y, r, contrast)

    return read


def planted_lesion_contrasts(annotations: pd.DataFrame, films: P.FilmCache, contrast: float,
                             seed: int = 0) -> pd.DataFrame:
    """`lesion_contrasts` of the planted masses where they sit (the tissue's own contrast there included)."""
    planted = planted_annotations(annotations, films, seed)
    return lesion_contrasts(planted, films, planted_loader(films.image, planted, contrast))


def _nearest(table: pd.DataFrame, column: str, value: float) -> pd.Series:
    """The row of `table` whose `column` is nearest `value`."""
    return table.iloc[int((table[column] - value).abs().to_numpy().argmin())]


def example_panels(annotations: pd.DataFrame, films: P.FilmCache, contrasts: tuple[float, ...] = (27, 54, 81),
                   seed: int = 0, half_width: float = 3.0) -> list[dict[str, Any]]:
    """`draw_detection_grid` panels: the real lesion of median contrast, then one planted mass at each contrast.

    Every crop spans `half_width` radii either side of its centre. The planted panels show one mass at
    each contrast, so they differ only in contrast: of the masses with a radius in the middle half that
    no clipping at 255 flattens, the one whose tissue has the median contrast of its own (before any mass
    is added).
    """
    real = lesion_contrasts(annotations, films)
    if real.empty:
        raise ValueError("no located lesion could be measured, so there is no real lesion to show")
    lesion = _nearest(real, "contrast", real["contrast"].median())
    tissue = planted_lesion_contrasts(annotations, films, 0.0, seed)
    strongest = planted_lesion_contrasts(annotations, films, max(contrasts), seed)
    # Bright tissue clips a mass at 255, so it adds less than asked: show one that keeps its contrast.
    kept = (strongest["contrast"] - tissue["contrast"]) >= KEPT_SHARE * max(contrasts)
    q25, q75 = tissue["radius"].quantile([0.25, 0.75])
    middle = tissue[tissue["radius"].between(q25, q75) & kept]
    if middle.empty:
        raise ValueError(f"no planted mass of middle radius keeps a contrast of {max(contrasts):g} unclipped")
    mass = _nearest(middle, "contrast", middle["contrast"].median())

    def panel(image: np.ndarray, row: Any, title: str) -> dict[str, Any]:
        r = float(row["radius"])
        top = int(np.clip(round(row["y"] - half_width * r), 0, max(image.shape[0] - 1, 0)))
        left = int(np.clip(round(row["x"] - half_width * r), 0, max(image.shape[1] - 1, 0)))
        size = int(round(2 * half_width * r))
        box = [[row["y"] - r - top, row["x"] - r - left, row["y"] + r - top, row["x"] + r - left]]
        return {"image": image[top: top + size, left: left + size], "gt_boxes": box,
                "gt_labels": [int(row["label_id"])], "det_boxes": np.zeros((0, 4)), "det_labels": [],
                "det_scores": [], "title": title}

    panels = [panel(films.image(lesion.refnum), lesion,
                    f"{lesion.refnum} {lesion.abnormality} {lesion.severity}, real\nmeasures {lesion.contrast:.1f}")]
    for contrast in contrasts:
        image = plant_mass(films.image(mass.refnum), mass.x, mass.y, mass.radius, contrast)
        measured = lesion_contrast(image, mass.x, mass.y, mass.radius, films.mask(mass.refnum))
        panels.append(panel(image, mass, f"{mass.refnum}, planted +{contrast:g}\nmeasures {measured:.1f}"))
    return panels
