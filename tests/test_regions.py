"""Normalised scores and connected anomalous regions (glad_jax.regions) against hand-made maps and skimage."""

import csv
import json
import math
import warnings

import numpy as np
import pytest
from skimage import measure

from glad_jax import regions


def two_blobs() -> np.ndarray:
  """A 32 x 40 map with two regions above 1.0: a 4 x 5 rectangle (peak 5 at row 4, col 7) and a diagonal line of
  three pixels that touch only by their corners (one region under 8-connectivity, three under 4)."""
  a = np.zeros((32, 40), np.float32)
  a[3:7, 5:10] = 2.0
  a[4, 7] = 5.0
  for k in range(3):
    a[20 + k, 20 + k] = 3.0
  a[10, 30] = 1.0  # exactly at the threshold: not above it
  return a


def test_find_regions_on_two_blobs_by_hand():
  found = regions.find_regions(two_blobs(), 1.0)
  assert len(found) == 2
  rect, diag = found
  assert rect == regions.Region(region=1, x=5, y=3, width=5, height=4, area_px=20, peak_score=5.0, peak_x=7,
                                peak_y=4, mean_score=(19 * 2.0 + 5.0) / 20)
  assert diag == regions.Region(region=2, x=20, y=20, width=3, height=3, area_px=3, peak_score=3.0, peak_x=20,
                                peak_y=20, mean_score=3.0)


def test_find_regions_matches_skimage_regionprops():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(48, 48))
  from scipy import ndimage as ndi

  a = ndi.gaussian_filter(a, 2.0)
  thr = np.quantile(a, 0.9)
  found = regions.find_regions(a, thr)
  lab = measure.label(a > thr, connectivity=2)
  props = sorted(measure.regionprops(lab, intensity_image=a), key=lambda p: -p.intensity_max)
  assert len(found) == len(props) >= 3
  for r, p in zip(found, props):
    y0, x0, y1, x1 = p.bbox
    assert (r.x, r.y, r.width, r.height) == (x0, y0, x1 - x0, y1 - y0)
    assert r.area_px == p.area
    assert r.peak_score == pytest.approx(p.intensity_max)
    assert r.mean_score == pytest.approx(p.intensity_mean)
    assert a[r.peak_y, r.peak_x] == pytest.approx(p.intensity_max)


def test_find_regions_empty_min_area_and_shape_error():
  assert regions.find_regions(np.zeros((8, 8)), 0.5) == []
  assert [r.area_px for r in regions.find_regions(two_blobs(), 1.0, min_area=4)] == [20]
  with pytest.raises(ValueError, match=r"anomaly_map should have shape \(H, W\), got \(2, 8, 8\)"):
    regions.find_regions(np.zeros((2, 8, 8)), 0.5)


def test_normalised_scores_anchor_and_formula():
  t, m = 2.0, 1.0
  s = np.array([m, t, t + (t - m), -1e6, 1e6])
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no overflow warning at the extremes
    n = regions.normalise_scores(s, t, m)
  np.testing.assert_allclose(n[:3], [1 / (1 + math.e), 0.5, 1 / (1 + math.exp(-1))], rtol=1e-12)
  assert n[3] == 0.0 and n[4] == 1.0
  many = np.linspace(-5, 9, 101)
  nm = regions.normalise_scores(many, t, m)
  assert np.all(np.diff(nm) > 0)  # strictly increasing: the ranking of the raw scores is kept
  np.testing.assert_array_equal(nm > 0.5, many > t)
  assert regions.normalise_scores(s, None, m) is None and regions.normalise_scores(s, t, None) is None


def test_normalised_scores_degenerate_spread_keeps_the_threshold_at_one_half():
  n = regions.normalise_scores(np.array([3.0, 3.0 + 3e-2, 3.0 - 3e-2]), 3.0, 3.0)
  assert n[0] == 0.5 and n[1] > 0.99 and n[2] < 0.01
  assert regions.spread(3.0, 5.0) == pytest.approx(3e-3)


def test_decision_rows_and_files(tmp_path):
  maps = np.stack([two_blobs(), np.zeros((32, 40), np.float32)])
  rows = regions.decision_rows(["bad/a.png", "good/b.png"], [4.0, 0.5], maps, image_threshold=2.0,
                               pixel_threshold=1.0, good_score_median=1.0, extra=[{"path": "x/a"}, {"path": "x/b"}])
  assert [r["image"] for r in rows] == ["bad/a.png", "good/b.png"]
  assert list(rows[0])[:3] == ["image", "path", "score"]
  assert rows[0]["anomalous"] is True and rows[1]["anomalous"] is False
  assert rows[0]["n_regions"] == 2 and rows[1]["n_regions"] == 0
  assert rows[0]["normalised_score"] == pytest.approx(1 / (1 + math.exp(-2.0)))
  paths = regions.write_decisions(tmp_path / "out", rows)
  assert [p.name for p in paths] == ["scores.json", "scores.csv", "regions.csv"]
  assert json.loads(paths[0].read_text())[0]["regions"][1]["area_px"] == 3
  with open(paths[1]) as f:
    per_image = list(csv.DictReader(f))
  assert [r["n_regions"] for r in per_image] == ["2", "0"] and "regions" not in per_image[0]
  with open(paths[2]) as f:
    per_region = list(csv.DictReader(f))
  assert [(r["image"], r["region"], r["x"], r["y"], r["width"], r["height"], r["area_px"]) for r in per_region] == [
      ("bad/a.png", "1", "5", "3", "5", "4", "20"), ("bad/a.png", "2", "20", "20", "3", "3", "3")]
  assert not list((tmp_path / "out").glob(".*.tmp"))


def test_decision_rows_uncalibrated():
  rows = regions.decision_rows(["a"], [1.0], np.zeros((1, 4, 4)), image_threshold=None, pixel_threshold=None,
                               good_score_median=None)
  assert rows[0]["anomalous"] is None and rows[0]["normalised_score"] is None and rows[0]["n_regions"] is None
  with pytest.raises(ValueError, match="no scored image to write"):
    regions.write_decisions("unused", [])
