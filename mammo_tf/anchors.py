"""SSD default boxes (anchors), after Liu et al. (2016), "SSD: Single Shot MultiBox Detector".

Scales: the paper spreads the scales of the feature maps linearly,
``s_k = s_min + (s_max - s_min) (k - 1) / (m - 1)`` with ``s_min = 0.2``, ``s_max = 0.9``; in
SSD300 the conv4_3 map is given the smaller scale 0.1 and the linear rule covers the other maps.
The released Caffe code works in whole percent with a floored step, which gives the well-known
SSD300 sizes 30, 60, 111, 162, 213, 264 (max 315) pixels; :func:`ssd_scales` reproduces that
(``floor_percent=True``) so that the presets equal the published models, and it extends the
series by one step so that the last map also has the extra box ``sqrt(s_k s_{k+1})``.

Boxes at one location, in this order (the box index of ``docs/conventions.md``): one box per
aspect ratio ``a`` of the map, in the order given, with ``w = s_k sqrt(a)``, ``h = s_k / sqrt(a)``;
then the extra square box of scale ``sqrt(s_k s_{k+1})``. Hence
``boxes_per_location(ratios) = len(ratios) + 1``. Box centres are ``((i + 0.5) / H, (j + 0.5) / W)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mammo_tf.config import from_dict as config_from_dict

SizeLike = int | tuple[int, int]

RATIOS_4 = (1.0, 2.0, 0.5)
RATIOS_6 = (1.0, 2.0, 3.0, 0.5, 1.0 / 3.0)

# Box-encoding variances of the released SSD (centre y, x, then height, width).
VARIANCES: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)

SSD300_FEATURE_MAPS = (38, 19, 10, 5, 3, 1)
SSD512_FEATURE_MAPS = (64, 32, 16, 8, 4, 2, 1)


def _pair(size: Any, what: str) -> tuple[int, int]:
    """An int or (h, w) pair as a validated (h, w) tuple of positive ints."""
    if isinstance(size, (int, np.integer)):
        pair = (int(size), int(size))
    elif isinstance(size, Sequence) and len(size) == 2:
        pair = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"{what} must be an int or an (height, width) pair, got {size!r}")
    if min(pair) <= 0:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return pair


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    """Geometry of the default boxes of an SSD model (one entry per feature map, largest first)."""

    image_size: SizeLike
    feature_map_sizes: tuple[SizeLike, ...]
    scales: tuple[float, ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    clip: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _pair(self.image_size, "image_size"))
        sizes = tuple(_pair(s, "feature map size") for s in self.feature_map_sizes)
        object.__setattr__(self, "feature_map_sizes", sizes)
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        ratios = tuple(tuple(float(r) for r in rs) for rs in self.aspect_ratios)
        object.__setattr__(self, "aspect_ratios", ratios)
        n = len(sizes)
        if n == 0:
            raise ValueError("AnchorConfig needs at least one feature map")
        if len(self.scales) != n + 1:
            raise ValueError(f"scales needs {n + 1} values (one per map plus one), got {len(self.scales)}")
        if any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive, got {self.scales}")
        if len(ratios) != n:
            raise ValueError(f"aspect_ratios needs one tuple per feature map ({n}), got {len(ratios)}")
        if any(len(rs) == 0 or min(rs) <= 0 for rs in ratios):
            raise ValueError(f"aspect ratios must be non-empty and positive, got {ratios}")

    @property
    def boxes_per_location(self) -> tuple[int, ...]:
        """Number of default boxes at each location, per feature map."""
        return tuple(boxes_per_location(rs) for rs in self.aspect_ratios)

    @property
    def num_anchors(self) -> int:
        """Total number of default boxes."""
        return sum(h * w * k for (h, w), k in zip(self.feature_map_sizes, self.boxes_per_location))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "image_size": list(self.image_size),
            "feature_map_sizes": [list(s) for s in self.feature_map_sizes],
            "scales": list(self.scales),
            "aspect_ratios": [list(r) for r in self.aspect_ratios],
            "clip": self.clip,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnchorConfig:
        """Inverse of :meth:`to_dict`."""
        return config_from_dict(cls, d)


def boxes_per_location(aspect_ratios: Sequence[float]) -> int:
    """Default boxes per location: one per aspect ratio plus the extra square box."""
    return len(aspect_ratios) + 1


def ssd_scales(
    n_maps: int,
    s_min: float = 0.2,
    s_max: float = 0.9,
    first_scale: float | None = 0.1,
    floor_percent: bool = True,
) -> tuple[float, ...]:
    """The ``n_maps + 1`` scales of the paper's linear rule (first map optionally apart)."""
    if n_maps < 1:
        raise ValueError(f"n_maps must be >= 1, got {n_maps}")
    if not 0 < s_min <= s_max:
        raise ValueError(f"need 0 < s_min <= s_max, got s_min={s_min}, s_max={s_max}")
    head: list[float] = [] if first_scale is None else [float(first_scale)]
    m = n_maps - len(head)  # maps on the linear rule
    if m == 0:  # a single map given its own scale: the next scale is s_min
        return (float(first_scale), float(s_min))
    lo, span = 100.0 * s_min, 100.0 * (s_max - s_min)
    step = span / (m - 1) if m > 1 else span
    if floor_percent:
        lo, step = round(lo), math.floor(step + 1e-9)
    linear = [(lo + step * k) / 100.0 for k in range(m + 1)]
    return tuple(round(s, 6) for s in head + linear)


def default_aspect_ratios(n_maps: int) -> tuple[tuple[float, ...], ...]:
    """SSD's pattern: {1, 2, 1/2} on the first and the last two maps, {1, 2, 3, 1/2, 1/3} between."""
    return tuple(RATIOS_4 if k == 0 or k >= n_maps - 2 else RATIOS_6 for k in range(n_maps))


def anchor_config_for(
    image_size: SizeLike,
    feature_map_sizes: Sequence[SizeLike],
    s_min: float = 0.2,
    s_max: float = 0.9,
    first_scale: float | None = 0.1,
    aspect_ratios: Sequence[Sequence[float]] | None = None,
    clip: bool = True,
) -> AnchorConfig:
    """An SSD-style anchor configuration for any list of feature maps."""
    n = len(feature_map_sizes)
    ratios = default_aspect_ratios(n) if aspect_ratios is None else tuple(tuple(r) for r in aspect_ratios)
    return AnchorConfig(
        image_size=image_size,
        feature_map_sizes=tuple(feature_map_sizes),
        scales=ssd_scales(n, s_min, s_max, first_scale),
        aspect_ratios=ratios,
        clip=clip,
    )


def ssd300_anchor_config(clip: bool = True) -> AnchorConfig:
    """SSD300: maps 38, 19, 10, 5, 3, 1; scales 0.1, 0.2, 0.37, ..., 0.88 (+1.05); 8732 boxes."""
    return anchor_config_for(300, SSD300_FEATURE_MAPS, 0.2, 0.9, 0.1, clip=clip)


def ssd512_anchor_config(clip: bool = True) -> AnchorConfig:
    """SSD512: maps 64, 32, 16, 8, 4, 2, 1; scales 0.07, 0.15, 0.3, ..., 0.9 (+1.05); 24564 boxes."""
    return anchor_config_for(512, SSD512_FEATURE_MAPS, 0.15, 0.9, 0.07, clip=clip)


def default_boxes(cfg: AnchorConfig) -> np.ndarray:
    """All default boxes, (N, 4) float32 ``[cy, cx, h, w]`` normalised, in the documented order."""
    img_h, img_w = cfg.image_size
    # Scales are relative to the image; on a non-square image keep boxes square in pixels.
    aspect = img_h / img_w
    out = []
    for k, ((fh, fw), ratios) in enumerate(zip(cfg.feature_map_sizes, cfg.aspect_ratios)):
        s, s_next = cfg.scales[k], cfg.scales[k + 1]
        hw = [(s / math.sqrt(r), s * math.sqrt(r)) for r in ratios]
        extra = math.sqrt(s * s_next)
        hw.append((extra, extra))
        hw_arr = np.asarray(hw, dtype=np.float64)  # (k, 2) as (h, w), relative to the shorter side
        hw_arr = hw_arr * np.array([min(1.0, 1.0 / aspect), min(1.0, aspect)])
        cy, cx = np.meshgrid((np.arange(fh) + 0.5) / fh, (np.arange(fw) + 0.5) / fw, indexing="ij")
        centres = np.stack([cy.ravel(), cx.ravel()], axis=-1)  # (fh*fw, 2), row-major
        n_loc, n_box = centres.shape[0], hw_arr.shape[0]
        boxes = np.concatenate(
            [np.repeat(centres, n_box, axis=0), np.tile(hw_arr, (n_loc, 1))], axis=-1
        )
        out.append(boxes)
    anchors = np.concatenate(out, axis=0)
    if cfg.clip:
        ymin_xmin = np.clip(anchors[:, :2] - anchors[:, 2:] / 2, 0.0, 1.0)
        ymax_xmax = np.clip(anchors[:, :2] + anchors[:, 2:] / 2, 0.0, 1.0)
        anchors = np.concatenate([(ymin_xmin + ymax_xmax) / 2, ymax_xmax - ymin_xmin], axis=-1)
    return anchors.astype(np.float32)
