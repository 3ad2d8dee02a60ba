"""Rd- randomisation (seeded, images and masks moved alike) and contaminated training."""

import math
from pathlib import Path

import numpy as np
import pytest

from glad_jax import align
from glad_jax.data import mvtec, perturb
from glad_jax.data.mvtec import Category, ImageRecord

TIRE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec3d_tire_rgb"


def _scene(n=4, size=64):
  """Images with a bright off-centre rectangle on a dark textured background, and its mask."""
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
  masks = np.zeros((n, size, size), bool)
  masks[:, 14:34, 20:50] = True
  imgs[masks] = 230
  return imgs, masks


def test_rd_params_ranges_and_reproducibility():
  key = perturb.rd_key(0, 1, "train")
  p = perturb.rd_params(key, 200, (100, 80))
  assert p.shape == (200, 3)
  assert np.all(np.abs(p[:, 0]) <= 0.05 * 80) and np.all(np.abs(p[:, 1]) <= 0.05 * 100)
  assert np.all(np.abs(p[:, 2]) <= math.radians(10))
  assert np.abs(p[:, 2]).max() > math.radians(8)  # the range is used, not a sliver of it
  np.testing.assert_array_equal(p, perturb.rd_params(perturb.rd_key(0, 1, "train"), 200, (100, 80)))
  # Image i's motion depends on its index only: chunks give the same motions.
  np.testing.assert_array_equal(p[50:60], perturb.rd_params(key, 10, (100, 80), start=50))
  others = [perturb.rd_params(perturb.rd_key(s, v, sp), 200, (100, 80))
            for s, v, sp in ((0, 2, "train"), (0, 1, "test"), (1, 1, "train"))]
  for o in others:
    assert not np.allclose(o, p)
  with pytest.raises(ValueError, match="numbered from 1"):
    perturb.rd_key(0, 0, "train")


def test_rd_perturb_moves_images_and_masks_alike():
  imgs, masks = _scene()
  out, out_m, params = perturb.rd_perturb(imgs, masks, version=3, split="test", seed=7)
  assert out.shape == imgs.shape and out.dtype == np.uint8 and out_m.dtype == bool
  bright = out.mean(axis=-1) > 145  # where the rectangle went in the image ...
  for i in range(len(imgs)):
    inter = (bright[i] & out_m[i]).sum()
    union = (bright[i] | out_m[i]).sum()
    assert inter / union > 0.95  # ... is where its mask went
    assert not np.array_equal(out_m[i], masks[i])  # and it did move
  # Same version, same seed: identical; the masks are exactly the warp of the masks.
  again = perturb.rd_perturb(imgs, masks, version=3, split="test", seed=7)
  np.testing.assert_array_equal(again[0], out)
  np.testing.assert_array_equal(again[1], out_m)
  np.testing.assert_array_equal(np.asarray(align.warp(masks, params, "euclidean",
                                                      mode="constant")), out_m)
  # Undoing the motion brings the rectangle back (up to interpolation at its edges).
  back = np.asarray(align.warp(out_m, align.invert_params(params, "euclidean"), "euclidean",
                               mode="constant"))
  assert np.mean(back == masks) > 0.98


def _toy_category(n_bad=12):
  recs = [ImageRecord(Path(f"test/bad/{i}.png"), 1, "bad", Path(f"gt/{i}.png"))
          for i in range(n_bad)]
  recs += [ImageRecord(Path(f"test/good/{i}.png"), 0, "good", None) for i in range(5)]
  train = tuple(ImageRecord(Path(f"train/{i}.png"), 0, "good", None) for i in range(8))
  return Category("toy", Path("."), "mvtec_ad", train, (), tuple(recs))


def test_contaminate_moves_records_out_of_test():
  cat = _toy_category()
  c10 = perturb.contaminate(cat, 10, seed=1)
  moved = set(c10.train) - set(cat.train)
  assert len(moved) == 10 and perturb.n_contaminated(c10) == 10
  assert all(r.label == 1 for r in moved)
  assert not moved & set(c10.test)  # really out of the test split
  assert set(c10.test) | moved == set(cat.test) and len(c10.test) == len(cat.test) - 10
  assert cat.train == _toy_category().train  # the clean category is untouched
  assert perturb.contaminate(cat, 10, seed=1) == c10
  assert set(perturb.contaminate(cat, 10, seed=2).train) != set(c10.train)
  # 40 asked, 12 anomalous: all but min_test_anomalous move.
  c40 = perturb.contaminate(cat, 40, seed=1)
  assert perturb.n_contaminated(c40) == 11 and sum(r.label for r in c40.test) == 1
  with pytest.raises(ValueError, match=">= 0"):
    perturb.contaminate(cat, -1)


@pytest.mark.skipif(not TIRE.is_dir(), reason=f"shared tire data absent ({TIRE})")
def test_contaminate_tire_protocol():
  cat = mvtec.read_category(TIRE)
  for n in (10, 40):
    c = perturb.contaminate(cat, n, seed=0)
    assert len(c.train) == 210 + n and len(c.test) == 112 - n
    assert perturb.n_contaminated(c) == n
    assert not {r.path for r in c.train if r.label == 1} & {r.path for r in c.test}
