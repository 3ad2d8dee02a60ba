"""Decisions a person can read: normalised image scores and the anomalous regions of a map.

    n = regions.normalise_scores(scores, image_threshold, good_score_median)   # threshold -> 0.5
    found = regions.find_regions(anomaly_map, pixel_threshold)                  # list[Region]

Normalised score (anomalib's convention: the calibrated threshold maps to 0.5). GLAD's image score is an unbounded
negative log-likelihood, so we use a logistic curve anchored on the two numbers calibration sees, the image threshold
t (the (1 - fpr)-quantile of held-out good scores) and the median m of those same good scores:

    n(s) = 1 / (1 + exp(-(s - t) / (t - m)))

so n(t) = 0.5, the median good image gets n(m) = 1 / (1 + e) ~ 0.27, and each further spread (t - m) above the
threshold moves n to 0.73, 0.88, 0.95. Unlike anomalib's clipped min-max it keeps the ranking of every score
(strictly increasing, in (0, 1)), and it needs no anomalous image to set. A higher n means more anomalous, n > 0.5
exactly when the raw decision says anomalous. When t <= m (degenerate calibration: all good scores equal) the
spread falls back to max(|t|, 1) * 1e-3, which keeps n(t) = 0.5 and the decisions.

Regions: connected components (8-connectivity, as the MVTec ground truth) of ``map > pixel_threshold``, each with
its bounding box, area and peak score, in the pixels of the S x S map (the image as it was scored, resized to S x S).
This module is NumPy/SciPy only: the CLI and the HTML report both use it.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from typing import Any, NamedTuple, Sequence

import numpy as np
from scipy import ndimage as ndi

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
REGION_FIELDS = ("region", "x", "y", "width", "height", "area_px", "peak_score", "peak_x", "peak_y",
                 "mean_score")


class Region(NamedTuple):
  """One connected anomalous region of a map (pixel coordinates of the map; x = column, y = row).

  Attributes:
    region: 1-based index, in decreasing order of peak score.
    x, y: top-left corner of the bounding box (inclusive).
    width, height: bounding-box size in pixels.
    area_px: number of pixels of the region (<= width * height).
    peak_score: the largest map value inside the region.
    peak_x, peak_y: where it is.
    mean_score: mean map value over the region.
  """

  region: int
  x: int
  y: int
  width: int
  height: int
  area_px: int
  peak_score: float
  peak_x: int
  peak_y: int
  mean_score: float

  def as_dict(self) -> dict[str, Any]:
    return self._asdict()


def spread(image_threshold: float, good_score_median: float) -> float:
  """The scale (t - m) of `normalise_scores`, with the documented fallback when t <= m."""
  t, m = float(image_threshold), float(good_score_median)
  s = t - m
  return s if s > 0 else max(abs(t), 1.0) * 1e-3


def normalise_scores(scores, image_threshold: float | None, good_score_median: float | None) -> np.ndarray | None:
  """Normalised image scores in (0, 1), threshold -> 0.5 (see the module docstring).

  Args:
    scores: array of shape (N,), raw image scores (higher = more anomalous).
    image_threshold: the calibrated image threshold t, or None.
    good_score_median: median image score m of the held-out good images used to calibrate t, or None.

  Returns:
    float64 array of shape (N,), or None when the model is not calibrated (t or m is None).
  """
  if image_threshold is None or good_score_median is None:
    return None
  s = np.asarray(scores, np.float64)
  z = (s - float(image_threshold)) / spread(image_threshold, good_score_median)
  # exp of a large positive argument overflows to inf, 1/(1+inf) = 0: the right limit, without a warning.
  with np.errstate(over="ignore"):
    return 1.0 / (1.0 + np.exp(-z))


def find_regions(anomaly_map, pixel_threshold: float, *, min_area: int = 1) -> list[Region]:
  """Connected components of ``anomaly_map > pixel_threshold`` (8-connectivity), most anomalous first.

  Args:
    anomaly_map: array of shape (H, W), higher = more anomalous.
    pixel_threshold: the calibrated pixel threshold.
    min_area: regions with fewer pixels are left out.

  Returns:
    The regions sorted by decreasing peak score, numbered 1, 2, ... in that order.
  """
  a = np.asarray(anomaly_map, np.float64)
  if a.ndim != 2:
    raise ValueError(f"anomaly_map should have shape (H, W), got {a.shape}")
  labels, n = ndi.label(a > pixel_threshold, structure=EIGHT_CONNECTED)
  if n == 0:
    return []
  index = np.arange(1, n + 1)
  areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
  peaks = np.atleast_1d(ndi.maximum(a, labels, index))
  means = np.atleast_1d(ndi.mean(a, labels, index))
  peak_pos = ndi.maximum_position(a, labels, index)
  boxes = ndi.find_objects(labels)
  found = []
  for j in range(n):
    if areas[j] < min_area:
      continue
    ys, xs = boxes[j]
    found.append((float(peaks[j]), int(xs.start), int(ys.start), int(xs.stop - xs.start), int(ys.stop - ys.start),
                  int(areas[j]), int(peak_pos[j][1]), int(peak_pos[j][0]), float(means[j])))
  found.sort(key=lambda r: -r[0])
  return [Region(i + 1, x, y, w, h, area, peak, px, py, mean)
          for i, (peak, x, y, w, h, area, px, py, mean) in enumerate(found)]


def decision_rows(names: Sequence[str], image_scores, anomaly_maps, *, image_threshold: float | None,
                  pixel_threshold: float | None, good_score_median: float | None,
                  extra: Sequence[dict] | None = None) -> list[dict[str, Any]]:
  """One record per image: raw and normalised score, decision, and (when a pixel threshold exists) its regions.

  Args:
    names: N image names (e.g. paths relative to the scored folder).
    image_scores: array of shape (N,).
    anomaly_maps: array of shape (N, H, W).
    image_threshold, pixel_threshold, good_score_median: from calibration (None when not calibrated).
    extra: optional N dicts of further columns (e.g. the full path), placed after the name.

  Returns:
    N dicts: image, [extra...], score, normalised_score, anomalous, threshold, n_regions, regions (list of dicts).
    Uncalibrated values are None.
  """
  scores = np.asarray(image_scores, np.float64)
  norm = normalise_scores(scores, image_threshold, good_score_median)
  rows = []
  for i, name in enumerate(names):
    row: dict[str, Any] = {"image": str(name)}
    if extra is not None:
      row.update(extra[i])
    row["score"] = float(scores[i])
    row["normalised_score"] = None if norm is None else float(norm[i])
    row["anomalous"] = None if image_threshold is None else bool(scores[i] > image_threshold)
    row["threshold"] = image_threshold
    found = [] if pixel_threshold is None else find_regions(anomaly_maps[i], pixel_threshold)
    row["n_regions"] = None if pixel_threshold is None else len(found)
    row["regions"] = [r.as_dict() for r in found]
    rows.append(row)
  return rows


def write_decisions(out: str | os.PathLike, rows: list[dict[str, Any]], stem: str = "scores") -> list[pathlib.Path]:
  """Writes `decision_rows` as OUT/scores.json (nested: regions per image), OUT/scores.csv (one line per image)
  and OUT/regions.csv (one line per region); each through a temporary file and a rename (no half-written file).

  Returns:
    The three paths.
  """
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  if not rows:
    raise ValueError("no scored image to write")
  image_cols = [c for c in rows[0] if c != "regions"]
  region_rows = [{"image": r["image"], **reg} for r in rows for reg in r["regions"]]
  paths = [out / f"{stem}.json", out / f"{stem}.csv", out / "regions.csv"]
  _atomic_write(paths[0], lambda f: json.dump(rows, f, indent=2))
  _atomic_write(paths[1], lambda f: _csv(f, image_cols, ({c: r[c] for c in image_cols} for r in rows)))
  _atomic_write(paths[2], lambda f: _csv(f, ("image",) + REGION_FIELDS, region_rows))
  return paths


def _csv(f, fields, rows) -> None:
  writer = csv.DictWriter(f, fieldnames=list(fields))
  writer.writeheader()
  for r in rows:
    writer.writerow({k: "" if v is None else v for k, v in r.items()})


def _atomic_write(path: pathlib.Path, write) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  with open(tmp, "w", newline="") as f:
    write(f)
  os.replace(tmp, path)
