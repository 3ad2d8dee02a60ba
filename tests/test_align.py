"""Inverse compositional alignment: parameter algebra, warping against scikit-image, recovery of
known synthetic warps of a real image to within 0.1 px mean corner error for each motion model."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from skimage import transform as sktf

from glad_jax import align

TIRE = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec3d_tire_rgb"
        / "train" / "good" / "000.png")
SIZE = 160  # reference crop: 3 pyramid levels

TRUTH = {  # motions to recover, two per model (one batch, one compilation for all models)
    "translation": [[4.3, -2.7], [-7.6, 5.1]],
    "euclidean": [[3.1, -5.2, np.deg2rad(6.0)], [-4.0, 2.0, np.deg2rad(-9.0)]],
    "similarity": [[-2.5, 3.3, 0.04, 0.07], [3.0, 1.0, -0.05, -0.03]],
    "affine": [[2.2, -3.1, 0.03, -0.04, 0.05, -0.02], [-1.0, 4.0, -0.04, 0.03, -0.02, 0.05]],
    "homography": [[0.02, 0.05, 3.0, -0.04, 0.03, -2.0, 2e-4, -1.5e-4],
                   [-0.03, 0.02, -2.0, 0.04, -0.02, 3.0, -1e-4, 2e-4]],
}


def _skimage_matrix(m: np.ndarray, shape) -> np.ndarray:
  """Our centred-coordinate matrix as scikit-image's (col, row) pixel-index matrix."""
  h, w = shape
  c = np.array([[1.0, 0, -(w - 1) / 2], [0, 1.0, -(h - 1) / 2], [0, 0, 1]])
  return np.linalg.inv(c) @ m @ c


@pytest.fixture(scope="module")
def scene():
  """A real grayscale image in [0, 1], larger than the crop (so warps bring in real content)."""
  if TIRE.is_file():
    full = np.asarray(Image.open(TIRE).convert("L"), np.float64) / 255.0  # 400 x 300
  else:  # shared data absent: scikit-image's camera, 256 x 256
    full = sktf.rescale(skdata.camera() / 255.0, 0.5, anti_aliasing=True)
  return full


def _crop(a: np.ndarray) -> np.ndarray:
  h, w = a.shape[:2]
  r0, c0 = (h - SIZE) // 2, (w - SIZE) // 2
  return a[r0:r0 + SIZE, c0:c0 + SIZE]


def _moved(full: np.ndarray, m: np.ndarray) -> np.ndarray:
  """I2 with I2(M x) = I1(x) (so that aligning I2 on I1 recovers M), by scikit-image."""
  inv_map = sktf.ProjectiveTransform(matrix=_skimage_matrix(np.linalg.inv(m), full.shape))
  return _crop(sktf.warp(full, inv_map, order=3, mode="edge"))


def test_params_matrix_algebra():
  rng = np.random.default_rng(0)
  for model in align.MODELS:
    p = rng.normal(scale=0.05, size=(4, align.n_params(model)))
    m = align.params_to_matrix(p, model)
    assert m.shape == (4, 3, 3)
    np.testing.assert_allclose(align.matrix_to_params(m, model), p, atol=1e-12)
    inv = np.linalg.inv(m)
    np.testing.assert_allclose(align.params_to_matrix(align.invert_params(p, model), model),
                               inv / inv[:, 2:, 2:], atol=1e-12)  # homographies up to scale
    q = rng.normal(scale=0.05, size=(4, align.n_params(model)))
    prod = m @ align.params_to_matrix(q, model)
    np.testing.assert_allclose(align.params_to_matrix(align.compose_params(p, q, model), model),
                               prod / prod[:, 2:, 2:], atol=1e-12)
  # Euclidean is a rotation: orthonormal linear part.
  r = align.params_to_matrix(np.array([1.0, 2.0, 0.3]), "euclidean")[:2, :2]
  np.testing.assert_allclose(r @ r.T, np.eye(2), atol=1e-12)
  np.testing.assert_allclose(align.corner_error(np.array([1.0, 0, 0]), np.zeros(3), "euclidean",
                                                (10, 10)), 1.0)


def test_warp_matches_skimage(scene):
  img = _crop(scene).astype(np.float32)
  p = np.array(TRUTH["homography"][0], np.float32)
  m = np.asarray(align.params_to_matrix(p.astype(np.float64), "homography"))
  out = np.asarray(align.warp(img[None], p[None], "homography", order=1))[0]
  ref = sktf.warp(img, sktf.ProjectiveTransform(matrix=_skimage_matrix(m, img.shape)), order=1,
                  mode="edge")
  inner = (slice(8, -8), slice(8, -8))
  np.testing.assert_allclose(out[inner], ref[inner], atol=2e-4)
  # Masks: bool in, bool out, nearest neighbour like scikit-image's order 0.
  mask = img > np.median(img)
  out_m = np.asarray(align.warp(mask[None], p[None], "homography"))[0]
  ref_m = sktf.warp(mask.astype(float), sktf.ProjectiveTransform(
      matrix=_skimage_matrix(m, img.shape)), order=0, mode="edge") > 0.5
  assert out_m.dtype == bool
  assert np.mean(out_m[inner] == ref_m[inner]) > 0.999
  # uint8 stays uint8; identity is exact.
  u8 = (img * 255).astype(np.uint8)[None]
  np.testing.assert_array_equal(align.warp(u8, np.zeros((1, 8)), "homography"), u8)


def test_recovers_known_warps_for_every_model(scene):
  ref = _crop(scene).astype(np.float32)
  before = align._estimate._cache_size()
  for model, truth in TRUTH.items():
    truth = np.array(truth)
    moved = np.stack([_moved(scene, align.params_to_matrix(t, model)) for t in truth])
    est = np.asarray(align.estimate_motion(ref, moved.astype(np.float32), model))
    err = align.corner_error(est, truth, model, ref.shape)
    assert est.shape == truth.shape
    assert np.all(err < 0.1), (model, err)
  assert align._estimate._cache_size() - before <= 1  # one compilation serves all five models


def test_align_moves_masks_with_images():
  # A bright rectangle on a textured background, shifted and rotated; its mask rides along.
  rng = np.random.default_rng(0)
  base = rng.normal(0.3, 0.02, (96, 96)).astype(np.float32)
  base[30:70, 25:60] += 0.5
  base = np.clip(base, 0, 1)
  truth = np.array([[3.0, -2.0, np.deg2rad(5.0)]], np.float32)
  moved = np.asarray(align.warp(base[None], align.invert_params(truth, "euclidean"), "euclidean"))
  mask = moved > 0.55
  res = align.align(moved, "euclidean", reference=base, masks=mask,
                    settings=align.AlignSettings(n_scales=2))
  assert align.corner_error(res.params, truth, "euclidean", (96, 96))[0] < 0.1
  aligned_mask = np.asarray(res.masks[0])
  expected = base > 0.55
  inner = (slice(6, -6), slice(6, -6))
  assert np.mean(aligned_mask[inner] == expected[inner]) > 0.99
  # IPOL's "first scale": stopping at half resolution is still sub-pixel.
  half = align.estimate_motion(base, moved, "euclidean",
                               settings=align.AlignSettings(n_scales=2, first_scale=1))
  assert align.corner_error(half, truth, "euclidean", (96, 96))[0] < 0.3


def test_errors_name_the_problem():
  img = np.zeros((32, 32), np.float32)
  with pytest.raises(ValueError, match="unknown motion model 'rigid'"):
    align.estimate_motion(img, img[None], "rigid")
  with pytest.raises(ValueError, match=r"images are 16x32 \(HxW\) but the reference is 32x32"):
    align.estimate_motion(img, np.zeros((1, 16, 32)), "translation")
  with pytest.raises(ValueError, match=r"images should have shape \(B, H, W\)"):
    align.estimate_motion(img, np.zeros(5), "translation")
  with pytest.raises(ValueError, match="n_scales=6 is too many"):
    align.estimate_motion(img, img[None], "translation", settings=align.AlignSettings(n_scales=6))
  with pytest.raises(ValueError, match=r"params should have shape \(1, 3\)"):
    align.warp(img[None], np.zeros((1, 2)), "euclidean")
  with pytest.raises(ValueError, match=r"first_scale must be in \[0, n_scales=2\)"):
    align.estimate_motion(img, img[None], "affine",
                          settings=align.AlignSettings(n_scales=2, first_scale=2))
  with pytest.raises(ValueError, match="robust function 'huber'"):
    align.estimate_motion(img, img[None], "affine", settings=align.AlignSettings(robust="huber"))
