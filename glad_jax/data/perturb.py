"""Robustness protocols on the data: Rd- randomisation and contaminated training sets.

Rd- (paper Section 4.4, after PaDiM's Rd-MVTec AD): every image of a category, training and
test alike, gets a small random position jitter and a random rotation about the image centre;
its mask gets the very same motion (nearest neighbour). Ranges chosen here (PaDiM rotates by
U(-10, 10) degrees and random-crops 256 -> 224 pixels, a shift of up to 6.25%):

* rotation angle uniform in [-10, 10] degrees;
* translation uniform in [-5%, 5%] of the width (x) and of the height (y);
* uncovered borders replicate the edge pixels (``mode='edge'``), so no black corners appear
  that a model could learn.

Five versions (``version`` = 1..5) are drawn from one seed; each image's motion depends only on
(seed, version, split, index), so a version is reproducible whatever the batching.

Contaminated training (robustness suite): N anomalous test images are moved into the training
set and out of the test set (N = 10 and 40, or as many as the category allows while leaving
``min_test_anomalous`` anomalous images to test on), chosen with a seed.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from glad_jax import align
from glad_jax.data.mvtec import Category

N_RD_VERSIONS = 5


@dataclasses.dataclass(frozen=True)
class RdSettings:
  """Ranges of the Rd- randomisation.

  Attributes:
    max_rotation: rotation angle uniform in [-max_rotation, max_rotation] degrees.
    max_shift: translation uniform in [-max_shift, max_shift] times the width (x) / height (y).
    mode: border handling of the image warp, 'edge' or 'constant' (0).
  """

  max_rotation: float = 10.0
  max_shift: float = 0.05
  mode: str = "edge"


def rd_key(seed: int, version: int, split: str) -> jax.Array:
  """The PRNG key of one (seed, version, split); split names are hashed with CRC32 (stable)."""
  if version < 1:
    raise ValueError(f"Rd- versions are numbered from 1 (the protocol uses 1..{N_RD_VERSIONS}), "
                     f"got {version}")
  key = jax.random.fold_in(jax.random.key(seed), version)
  return jax.random.fold_in(key, zlib.crc32(split.encode()) & 0x7FFFFFFF)


def rd_params(key: jax.Array, n: int, shape: tuple[int, int],
              settings: RdSettings = RdSettings(), *, start: int = 0) -> np.ndarray:
  """Random euclidean motions of ``n`` images (`glad_jax.align` convention).

  Args:
    key: from `rd_key`.
    n: number of images.
    shape: (height, width) of the images (translations are fractions of it).
    settings: `RdSettings`.
    start: index of the first image (image i uses ``fold_in(key, i)``).

  Returns:
    array of shape (n, 3): (tx, ty, theta) in pixels and radians.
  """
  h, w = shape
  scale = jnp.array([settings.max_shift * w, settings.max_shift * h,
                     math.radians(settings.max_rotation)], jnp.float32)
  return np.asarray(_uniform_per_index(key, jnp.arange(start, start + n)) * scale, np.float32)


@jax.jit
def _uniform_per_index(key: jax.Array, indices: jax.Array) -> jax.Array:
  """U(-1, 1) draws of shape (n, 3), image i from ``fold_in(key, i)``."""
  return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (3,), minval=-1.0,
                                               maxval=1.0))(indices)


def rd_perturb(images, masks=None, *, version: int, split: str, seed: int = 0,
               settings: RdSettings = RdSettings(), start: int = 0):
  """Applies Rd- version ``version`` to a split's images and masks (one shared motion each).

  Args:
    images: array of shape (N, H, W) or (N, H, W, C) (e.g. ``ImageBatch.images``).
    masks: optional bool array of shape (N, H, W), moved exactly like the images.
    version: 1..5.
    split: split name ('train', 'test', ...): each split draws its own motions.
    seed: base seed of the five versions.
    settings: `RdSettings`.
    start: index of ``images[0]`` within the split (when perturbing a split in chunks).

  Returns:
    (images, masks, params): perturbed arrays (same shape/dtype, masks None if not given) and
    the motions, array of shape (N, 3) (euclidean, `glad_jax.align` convention).
  """
  a = np.asarray(images)
  if a.ndim not in (3, 4):
    raise ValueError(f"images should have shape (N, H, W) or (N, H, W, C), got {a.shape}")
  if masks is not None and np.shape(masks) != a.shape[:3]:
    raise ValueError(f"masks should have shape {a.shape[:3]}, got {np.shape(masks)}")
  params = rd_params(rd_key(seed, version, split), a.shape[0], a.shape[1:3], settings,
                     start=start)
  out = np.asarray(align.warp(a, params, "euclidean", mode=settings.mode))
  out_masks = None
  if masks is not None:
    out_masks = np.asarray(align.warp(np.asarray(masks, bool), params, "euclidean",
                                      mode="constant"))
  return out, out_masks, params


def contaminate(category: Category, n: int, *, seed: int = 0,
                min_test_anomalous: int = 1) -> Category:
  """Moves ``n`` anomalous test images into the training set (contaminated training).

  Args:
    category: the clean category.
    n: images to move (the protocol uses 10 and 40); fewer when the category does not have
      ``n + min_test_anomalous`` anomalous test images.
    seed: seeds which images move.
    min_test_anomalous: anomalous images that must stay in the test split.

  Returns:
    A new `Category`: train = clean train + the moved records (which keep label 1, so that
    reports can count them; fitting ignores labels), test = the test records minus those.
  """
  if n < 0:
    raise ValueError(f"the number of contaminating images must be >= 0, got {n}")
  if min_test_anomalous < 0:
    raise ValueError(f"min_test_anomalous must be >= 0, got {min_test_anomalous}")
  anomalous = [i for i, r in enumerate(category.test) if r.label == 1]
  n_move = max(0, min(n, len(anomalous) - min_test_anomalous))
  rng = np.random.default_rng(seed)
  moved = set(rng.choice(anomalous, size=n_move, replace=False).tolist()) if n_move else set()
  train = category.train + tuple(category.test[i] for i in sorted(moved))
  test = tuple(r for i, r in enumerate(category.test) if i not in moved)
  return category.replace(train=train, test=test)


def n_contaminated(category: Category) -> int:
  """Number of anomalous records in the training split."""
  return sum(1 for r in category.train if r.label == 1)


__all__ = [
    "N_RD_VERSIONS",
    "RdSettings",
    "contaminate",
    "n_contaminated",
    "rd_key",
    "rd_params",
    "rd_perturb",
]
