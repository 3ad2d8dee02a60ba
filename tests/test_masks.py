"""Crude masks: texture margin, object masks from (aligned) training images, resizing."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glad_jax import masks

TIRE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec3d_tire_rgb"


def test_margin_mask_is_one_sixteenth():
  m = masks.margin_mask((256, 128))
  expected = np.zeros((256, 128), bool)
  expected[16:240, 8:120] = True  # 256 / 16 = 16 rows, 128 / 16 = 8 columns each side
  np.testing.assert_array_equal(m, expected)
  assert masks.margin_mask((10, 10), 0.0).all()
  with pytest.raises(ValueError, match="margin fraction"):
    masks.margin_mask((10, 10), 0.5)


def _disk_scene(n=6, size=96, seed=0):
  """Noisy grey background with a textured disk (radius 25) whose colour differs."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  disk = (yy - 50) ** 2 + (xx - 45) ** 2 <= 25**2
  imgs = rng.normal(100, 6, (n, size, size, 3))
  texture = 40 * np.sin(xx / 3.0)[..., None] * np.array([1.0, 0.5, 0.2])
  imgs[:, disk] = 60 + texture[disk] + rng.normal(0, 6, (n, disk.sum(), 3))
  return np.clip(imgs, 0, 255).astype(np.uint8), disk


def test_object_mask_covers_the_object_generously():
  imgs, disk = _disk_scene()
  m = masks.object_mask(imgs)
  assert m.shape == disk.shape and m.dtype == bool
  assert m[disk].mean() == 1.0  # the whole object is in
  yy, xx = np.mgrid[:96, :96]
  # Generous but local: the contrast window (sigma 1.5 px) and the dilation (2 px) widen it
  # by a few pixels, nothing more.
  near = (yy - 50) ** 2 + (xx - 45) ** 2 <= 33**2
  assert not m[~near].any()
  convex = masks.object_mask(imgs, masks.ObjectMaskSettings(fill="convex"))
  assert (convex >= m).all()
  score = masks.object_score(imgs)
  assert np.median(score[disk]) > 5 * np.median(score[~near])


def test_object_mask_fails_clearly_without_object():
  rng = np.random.default_rng(1)
  flat = rng.normal(100, 5, (4, 64, 64)).clip(0, 255).astype(np.uint8)
  with pytest.raises(ValueError, match="no object found .*margin mask"):
    masks.object_mask(flat, masks.ObjectMaskSettings(threshold=3.0))
  with pytest.raises(ValueError, match=r"images should have shape \(N, H, W\)"):
    masks.object_mask(np.zeros((64, 64)))


@pytest.mark.skipif(not TIRE.is_dir(), reason=f"shared tire data absent ({TIRE})")
def test_object_mask_on_tire_images():
  paths = sorted((TIRE / "train" / "good").glob("*.png"))[:12]
  imgs = np.stack([np.asarray(Image.open(p).convert("RGB").resize((96, 128))) for p in paths])
  m = masks.object_mask(imgs)  # the tyres are nearly aligned already
  assert m[64, 48]  # centre of the tyre
  assert not m[:4, :4].any() and not m[-4:, -4:].any()  # background corners
  assert 0.2 < m.mean() < 0.7


def test_resize_mask_area_rule_and_nearest():
  rng = np.random.default_rng(2)
  m = rng.random((3, 12, 18)) < 0.5
  down = masks.resize_mask(m, (4, 6))
  blocks = m.reshape(3, 4, 3, 6, 3).mean(axis=(2, 4))  # independent: 3x3 block means
  np.testing.assert_array_equal(down, blocks >= 0.5)
  up = masks.resize_mask(m[0], (24, 36))
  np.testing.assert_array_equal(up, np.kron(m[0], np.ones((2, 2), bool)))
  np.testing.assert_array_equal(masks.resize_mask(m[0], (12, 18)), m[0])


def test_mask_from_array():
  a = np.zeros((8, 8, 3), np.uint8)
  a[2:4, 2:6, 1] = 7  # any non-zero channel counts
  m = masks.mask_from_array(a)
  assert m.sum() == 8 and m[2, 2] and not m[0, 0]
  assert masks.mask_from_array(a, (4, 4)).shape == (4, 4)
  with pytest.raises(ValueError, match="empty"):
    masks.mask_from_array(np.zeros((4, 4)))
