"""Synthetic defects: determinism, exact masks, areas in range, what each kind pastes, and the errors."""

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from conftest import texture
from glad_jax import synthetic as S


def _images(n=4, size=64, seed=0):
  rng = np.random.default_rng(seed)
  return np.stack([texture(rng, size) for _ in range(n)])


def _changed(out, originals):
  return np.any(out != originals, axis=-1)


@pytest.mark.parametrize("kind", S.KINDS)
def test_deterministic_and_seed_dependent(kind):
  x = _images()
  a, ma = S.add_defects(x, kind, seed=3, n_per_image=2)
  b, mb = S.add_defects(x, kind, seed=3, n_per_image=2)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ma, mb)
  c, mc = S.add_defects(x, kind, seed=4, n_per_image=2)
  assert not np.array_equal(ma, mc)
  assert a.shape == (8, 64, 64, 3) and a.dtype == np.uint8 and ma.shape == (8, 64, 64) and ma.dtype == bool
  # A Generator seed is accepted and gives the same result as the base seed it draws.
  g1, g2 = np.random.default_rng(7), np.random.default_rng(7)
  base = int(g2.integers(2**31))
  np.testing.assert_array_equal(S.add_defects(x, kind, seed=g1)[1], S.add_defects(x, kind, seed=base)[1])


def test_a_defect_does_not_depend_on_the_other_images():
  x = _images(5)
  full, mfull = S.add_defects(x, "scratch", seed=1, n_per_image=2)
  part, mpart = S.add_defects(x[:2], "scratch", seed=1, n_per_image=2)
  np.testing.assert_array_equal(full[:4], part)
  np.testing.assert_array_equal(mfull[:4], mpart)


@pytest.mark.parametrize("kind", S.KINDS)
@pytest.mark.parametrize("area", [S.DEFAULT_AREA, (0.01, 0.1), (0.05, 0.06)])
def test_mask_covers_every_change_and_area_in_range(kind, area):
  x = _images(4, 64)
  cfg = S.DefectConfig(area=area)
  out, masks = S.add_defects(x, kind, seed=0, n_per_image=5, config=cfg)
  originals = np.repeat(x, 5, axis=0)
  changed = _changed(out, originals)
  assert not np.any(changed & ~masks)  # outside the mask, every pixel is unchanged
  np.testing.assert_array_equal(out[~masks], originals[~masks])
  hw = 64 * 64
  counts = masks.sum(axis=(1, 2))
  assert np.all(counts >= max(1, math.ceil(area[0] * hw))) and np.all(counts <= math.floor(area[1] * hw))
  # The defects are real: most masked pixels changed (textured images, contrasting content).
  assert changed.sum() >= 0.6 * masks.sum()


@pytest.mark.parametrize("kind", S.KINDS)
def test_default_range_includes_small_defects(kind):
  x = _images(4, 128)
  _, masks = S.add_defects(x, kind, seed=0, n_per_image=10)
  frac = masks.sum(axis=(1, 2)) / 128**2
  assert frac.min() >= 0.0005 - 1e-9 and frac.max() <= 0.02
  assert np.mean(frac < 0.002) >= 0.2  # log-uniform: a good share below 0.2% of the image


@pytest.mark.parametrize("kind", S.KINDS)
def test_defects_stay_in_the_allowed_region(kind):
  x = _images(3, 64)
  allowed = np.zeros((64, 64), bool)
  allowed[8:40, 20:60] = True
  out, masks = S.add_defects(x, kind, seed=2, n_per_image=4, allowed=allowed,
                             config=S.DefectConfig(area=(0.005, 0.05)))
  assert not np.any(masks & ~allowed)
  assert not np.any(_changed(out, np.repeat(x, 4, axis=0)) & ~allowed)


def test_bilinear_matches_scipy_map_coordinates():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
  y, x = rng.uniform(0, 12, 50), rng.uniform(0, 16, 50)
  y[:3], x[:3] = [0, 12, 5], [16, 0, 7]  # corners and integer points
  ours = S._bilinear(img, y, x)
  ref = np.stack([ndi.map_coordinates(img[..., c].astype(np.float64), [y, x], order=1) for c in range(3)], 1)
  np.testing.assert_allclose(ours, ref, atol=1e-9)


def test_cut_paste_without_rotation_is_a_shifted_rectangle_of_the_source():
  rng = np.random.default_rng(5)
  img, src = texture(rng, 64), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  cfg = S.DefectConfig(area=(0.02, 0.05), rotate=False, scale=(1.0, 1.0), jitter=0.0)
  out, mask = S.cut_paste(img, src, np.random.default_rng(1), cfg)
  ys, xs = np.nonzero(mask)
  box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  assert box.sum() >= box.size - (box.shape[0] + box.shape[1])  # a rectangle (ties only on one edge)
  # Without rotation or zoom, every pasted pixel is the source at one sub-pixel offset (bilinear):
  # find it by least squares over integer offsets and check the residual of the interpolation.
  best = min(((np.abs(out[mask].astype(float) - src[np.clip(ys + dy, 0, 63), np.clip(xs + dx, 0, 63)]).mean(),
               dy, dx) for dy in range(-63, 64) for dx in range(-63, 64)
              if 0 <= ys.min() + dy and ys.max() + dy < 64 and 0 <= xs.min() + dx and xs.max() + dx < 64))
  assert best[0] < 64  # random source pixels: a wrong offset gives a mean error of about 85


def test_blob_content_comes_from_another_image_at_one_offset():
  x = np.stack([np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8) for i in range(3)])
  cfg = S.DefectConfig(area=(0.01, 0.03), opacity=(1.0, 1.0))
  out, masks = S.add_defects(x, "blob", seed=0, n_per_image=2, config=cfg)
  for row in range(6):
    i = row // 2
    ys, xs = np.nonzero(masks[row])
    found = [(k, dy, dx) for k in range(3) if k != i
             for dy in range(-ys.min(), 48 - ys.max()) for dx in range(-xs.min(), 48 - xs.max())
             if np.array_equal(out[row][ys, xs], x[k][ys + dy, xs + dx])]
    assert found, f"copy {row}: blob content is no shifted region of another image"
  # The blob is one irregular but compact region around its centre.
  lab, n = ndi.label(masks[0])
  assert n <= 3


def test_scratch_is_thin_and_contrasted():
  x = _images(3, 128)
  cfg = S.DefectConfig(area=(0.002, 0.004), scratch_width=(1.0, 2.0))
  out, masks = S.add_defects(x, "scratch", seed=0, n_per_image=3, config=cfg)
  originals = np.repeat(x, 3, axis=0).astype(float)
  for row in range(9):
    m = masks[row]
    # Thin: eroding once removes most of a line at most 2 px wide.
    assert ndi.binary_erosion(m).sum() <= 0.3 * m.sum()
    # Contrast: alpha >= 0.7 times a grey-level gap >= 48 from the local mean.
    delta = abs(out[row][m].astype(float).mean() - originals[row][m].mean())
    assert delta >= 0.7 * 48 - 1


def test_pixel_range():
  assert S.pixel_range((64, 64), (0.0005, 0.02)) == (3, 81)  # 2.05 .. 81.92 pixels
  assert S.pixel_range((10, 10), (0.0001, 0.015)) == (1, 1)  # at least one pixel
  assert S.pixel_range((64, 64), (0.05, 0.05)) == (205, 205)  # no integer in [204.8, 204.8]: the nearest


def test_errors_name_the_bad_value():
  x = _images(2, 32)
  with pytest.raises(ValueError, match="unknown defect kind 'dent'; choose among cutpaste, scratch, blob"):
    S.add_defects(x, "dent")
  too_small = r"images of 8x8 pixels are too small for defects of 0\.050% to 1\.000% of the image \(at most 0\.64"
  with pytest.raises(ValueError, match=too_small):
    S.add_defects(np.zeros((1, 8, 8, 3), np.uint8), "blob", config=S.DefectConfig(area=(0.0005, 0.01)))
  with pytest.raises(ValueError, match=r"area must be \(low, high\) fractions of the image"):
    S.add_defects(x, "blob", config=S.DefectConfig(area=(0.02, 0.01)))
  with pytest.raises(ValueError, match=r"must be a uint8 array of shape \(N, H, W, 3\), got float64"):
    S.add_defects(x.astype(float), "blob")
  with pytest.raises(ValueError, match="images is empty"):
    S.add_defects(x[:0], "blob")
  with pytest.raises(ValueError, match="n_per_image must be a positive integer, got 0"):
    S.add_defects(x, "scratch", n_per_image=0)
  with pytest.raises(ValueError, match="the allowed region has 2 pixels, fewer than the smallest defect"):
    allowed = np.zeros((32, 32), bool)
    allowed[0, :2] = True
    S.add_defects(x, "scratch", allowed=allowed, config=S.DefectConfig(area=(0.01, 0.02)))
  with pytest.raises(ValueError, match="sources must have the images' shape"):
    S.add_defects(x, "cutpaste", sources=_images(1, 16))
  with pytest.raises(ValueError, match="defect kinds named more than once"):
    S.defect_set(x, ["blob", "blob"])
