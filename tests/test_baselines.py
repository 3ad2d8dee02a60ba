"""Baselines (MahaAD, PaDiM, PatchCore) against independent NumPy / SciPy / scikit-learn code.

Every reference below is written from the papers' definitions in float64 NumPy (np.linalg.inv,
np.cov, brute-force distance matrices), with scipy.ndimage for the blur and scikit-image for the
bilinear resize; nothing is copied from the JAX implementation.
"""

import jax
import numpy as np
import pytest
import scipy.ndimage
import scipy.spatial.distance
import skimage.transform
from sklearn.covariance import LedoitWolf

from glad_jax import baselines as bl
from glad_jax.baselines import common, mahaad, padim, patchcore

LAYERS = ("layer1", "layer2", "layer3")
SHAPES = {"layer1": (8, 8, 5), "layer2": (4, 4, 6), "layer3": (2, 2, 7)}


def _features(rng, n, outlier_at=None):
  """Toy backbone features with spatial structure (a position-dependent mean) plus noise.

  `outlier_at` (i, j) on the layer1 grid adds a large offset at that position in every layer.
  """
  feats = {}
  for name, (h, w, d) in SHAPES.items():
    yy, xx = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
    base = np.stack([np.sin(3 * yy + c) + np.cos(2 * xx - c) for c in range(d)], axis=-1)
    x = base[None] + 0.3 * rng.normal(size=(n, h, w, d))
    if outlier_at is not None:
      f = SHAPES["layer1"][0] // h
      x[:, outlier_at[0] // f, outlier_at[1] // f] += 6.0
    feats[name] = x.astype(np.float32)
  return feats


@pytest.fixture(scope="module")
def train():
  return _features(np.random.default_rng(0), 24)


@pytest.fixture(scope="module")
def test_feats():
  return _features(np.random.default_rng(1), 3)


def _f64(feats):
  return {k: np.asarray(v, np.float64) for k, v in feats.items()}


def _resize_ref(maps, size):
  """Bilinear, half-pixel centres, edge clamping (= torch align_corners=False), per map."""
  return np.stack([skimage.transform.resize(m, size, order=1, mode="edge", anti_aliasing=False,
                                            preserve_range=True) for m in maps])


def _blur_ref(maps, sigma):
  return np.stack([scipy.ndimage.gaussian_filter(m, sigma, mode="reflect", truncate=4.0)
                   for m in maps])


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,sigma", [((2, 40, 33), 4.0), ((1, 10, 6), 4.0),
                                         ((2, 12, 12), 1.5)])
def test_gaussian_blur_matches_scipy(shape, sigma):
  # (1, 10, 6) is smaller than the kernel radius (16): the reflection folds several times.
  maps = np.random.default_rng(2).normal(size=shape).astype(np.float32)
  got = np.asarray(common.gaussian_blur(maps, sigma))
  np.testing.assert_allclose(got, _blur_ref(maps.astype(np.float64), sigma), atol=1e-5)
  assert common.gaussian_blur(maps, 0.0) is maps


def test_resize_bilinear_matches_skimage():
  maps = np.random.default_rng(3).normal(size=(2, 5, 7)).astype(np.float32)
  got = np.asarray(common.resize_bilinear(maps, (16, 20)))
  np.testing.assert_allclose(got, _resize_ref(maps, (16, 20)), atol=1e-5)
  chans = np.random.default_rng(4).normal(size=(2, 4, 4, 3)).astype(np.float32)
  got = np.asarray(common.resize_bilinear(chans, (8, 8)))
  ref = np.stack([_resize_ref(chans[..., c], (8, 8)) for c in range(3)], axis=-1)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_upsample_nearest():
  x = np.random.default_rng(5).normal(size=(2, 3, 4, 2)).astype(np.float32)
  got = np.asarray(common.upsample_nearest(x, (6, 8)))
  np.testing.assert_array_equal(got, np.repeat(np.repeat(x, 2, axis=1), 2, axis=2))
  # Non-integer factor, PyTorch "nearest": output i reads input floor(i * in / out).
  got = np.asarray(common.upsample_nearest(x, (7, 5)))
  rows = np.floor(np.arange(7) * 3 / 7).astype(int)
  cols = np.floor(np.arange(5) * 4 / 5).astype(int)
  np.testing.assert_array_equal(got, x[:, rows][:, :, cols])


# ---------------------------------------------------------------------------------------------
# MahaAD
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", [(40, 6), (9, 15)])
def test_ledoit_wolf_matches_sklearn(n, d):
  x = np.random.default_rng(n).normal(size=(n, d)) @ np.diag(np.linspace(0.5, 3.0, d))
  mean, cov, rho = mahaad.ledoit_wolf(x.astype(np.float32))
  ref = LedoitWolf().fit(x)
  np.testing.assert_allclose(mean, ref.location_, atol=1e-5)
  np.testing.assert_allclose(cov, ref.covariance_, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(rho, ref.shrinkage_, rtol=1e-4, atol=1e-6)


def _maha_ref(x, mean, inv):
  diff = x - mean
  return np.sqrt(np.einsum("...i,ij,...j->...", diff, inv, diff))


def test_mahaad_matches_numpy(train, test_feats):
  config = bl.MahaADConfig(layers=LAYERS, sigma=0.0)
  state = bl.fit_mahaad(train, config)
  scores, maps = bl.score_mahaad(state, test_feats, out_size=8)
  tr, te = _f64(train), _f64(test_feats)
  ref_scores = np.zeros(3)
  ref_maps = np.zeros((3, 8, 8))
  for name in LAYERS:
    lw = LedoitWolf().fit(tr[name].mean(axis=(1, 2)))
    inv = np.linalg.inv(lw.covariance_)
    ref_scores += _maha_ref(te[name].mean(axis=(1, 2)), lw.location_, inv)
    ref_maps += _resize_ref(_maha_ref(te[name], lw.location_, inv), (8, 8))
  np.testing.assert_allclose(scores, ref_scores, rtol=2e-4)
  np.testing.assert_allclose(maps, ref_maps, rtol=2e-4, atol=1e-4)
  # Blurred maps at another size: the same maps, resized then smoothed.
  _, maps32 = bl.score_mahaad(state.replace(config=config.replace(sigma=4.0)), test_feats,
                              out_size=32)
  ref32 = 0.0
  for name in LAYERS:
    lw = LedoitWolf().fit(tr[name].mean(axis=(1, 2)))
    ref32 = ref32 + _resize_ref(_maha_ref(te[name], lw.location_,
                                          np.linalg.inv(lw.covariance_)), (32, 32))
  np.testing.assert_allclose(maps32, _blur_ref(ref32, 4.0), rtol=2e-4, atol=1e-4)


def test_mahaad_without_shrinkage_is_sample_covariance(train, test_feats):
  # d = 5..7 < N = 24: the ML covariance is invertible, no shrinkage needed.
  state = bl.fit_mahaad(train, bl.MahaADConfig(layers=LAYERS, shrinkage=False, sigma=0.0))
  scores, _ = bl.score_mahaad(state, test_feats, out_size=8)
  ref = 0.0
  for name in LAYERS:
    pooled = _f64(train)[name].mean(axis=(1, 2))
    inv = np.linalg.inv(np.cov(pooled, rowvar=False, bias=True))
    ref = ref + _maha_ref(_f64(test_feats)[name].mean(axis=(1, 2)), pooled.mean(0), inv)
  np.testing.assert_allclose(scores, ref, rtol=2e-4)
  assert all(float(r) == 0.0 for r in state.shrinkage.values())


def test_mahaad_default_is_every_stage_summed():
  """The paper's MahaAD: a Ledoit-Wolf Gaussian on the pooled features of EVERY stage, image
  score = sum of the (unsquared) Mahalanobis distances; sklearn's LedoitWolf as the oracle."""
  assert bl.MahaADConfig().layers == ("layer1", "layer2", "layer3", "layer4")
  for backbone in ("efficientnet_lite0", "wide_resnet50_2_aa", "resnet_tiny"):
    assert mahaad.mahaad_layers(backbone) == ("layer1", "layer2", "layer3", "layer4")
    assert bl.MahaADConfig.for_backbone(backbone, sigma=1.0) == bl.MahaADConfig(sigma=1.0)
  rng = np.random.default_rng(11)
  shapes = {"layer1": (4, 4, 3), "layer2": (2, 2, 5), "layer3": (2, 2, 6), "layer4": (1, 1, 8)}
  def feats(n):
    return {k: (rng.normal(size=(n, *shp)) * np.linspace(0.5, 2.0, shp[-1])).astype(np.float32)
            for k, shp in shapes.items()}
  train, test = feats(30), feats(4)
  state = bl.fit_mahaad(train)  # default config: all four stages
  scores, maps = bl.score_mahaad(state, test, out_size=4)
  assert maps.shape == (4, 4, 4)
  ref = np.zeros(4)
  for name in shapes:
    lw = LedoitWolf().fit(np.asarray(train[name], np.float64).mean(axis=(1, 2)))
    ref += _maha_ref(np.asarray(test[name], np.float64).mean(axis=(1, 2)), lw.location_,
                     np.linalg.inv(lw.covariance_))
    np.testing.assert_allclose(state.shrinkage[name], lw.shrinkage_, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(scores, ref, rtol=2e-4)
  with pytest.raises(ValueError, match=r"has no layer 'layer4'"):
    bl.fit_mahaad({k: v for k, v in train.items() if k != "layer4"})
  with pytest.raises(ValueError, match=r"unknown backbone 'nope'"):
    mahaad.mahaad_layers("nope")


# ---------------------------------------------------------------------------------------------
# PaDiM
# ---------------------------------------------------------------------------------------------


def _padim_ref(train, test, idx, epsilon=0.01):
  """Distance maps (B, 8, 8) of the PaDiM definition, position by position with np.linalg.inv."""
  def embed(feats):
    up = [np.repeat(np.repeat(feats[n], 8 // feats[n].shape[1], axis=1),
                    8 // feats[n].shape[2], axis=2) for n in LAYERS]
    return np.concatenate(up, axis=-1)[..., idx]

  e_tr, e_te = embed(_f64(train)), embed(_f64(test))
  out = np.zeros(e_te.shape[:3])
  for i in range(8):
    for j in range(8):
      x = e_tr[:, i, j]
      cov = np.cov(x, rowvar=False) + epsilon * np.eye(x.shape[1])
      out[:, i, j] = _maha_ref(e_te[:, i, j], x.mean(0), np.linalg.inv(cov))
  return out


def test_padim_matches_numpy(train, test_feats):
  config = bl.PadimConfig(n_features=10, sigma=0.0, position_chunk=24)  # 64 = 24 + 24 + 16
  state = bl.fit_padim(train, config, jax.random.key(3))
  idx = np.asarray(state.channel_idx)
  assert idx.shape == (10,) and np.all(np.diff(idx) > 0) and 0 <= idx[0] and idx[-1] < 18
  scores, maps = bl.score_padim(state, test_feats, out_size=8)
  ref = _padim_ref(train, test_feats, idx)
  np.testing.assert_allclose(maps, ref, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(scores, ref.max(axis=(1, 2)), rtol=1e-3)
  # Full map: bilinear upsampling to 20 x 20, then sigma-4 blur; the score is the maximum.
  state4 = state.replace(config=config.replace(sigma=4.0))
  scores, maps = bl.score_padim(state4, test_feats, out_size=20)
  ref20 = _blur_ref(_resize_ref(ref, (20, 20)), 4.0)
  np.testing.assert_allclose(maps, ref20, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(scores, ref20.max(axis=(1, 2)), rtol=1e-3)


def test_padim_channel_subset_is_seeded_and_capped(train):
  a = bl.fit_padim(train, bl.PadimConfig(n_features=6), jax.random.key(0))
  b = bl.fit_padim(train, bl.PadimConfig(n_features=6), jax.random.key(0))
  c = bl.fit_padim(train, bl.PadimConfig(n_features=6), jax.random.key(1))
  np.testing.assert_array_equal(a.channel_idx, b.channel_idx)
  assert not np.array_equal(a.channel_idx, c.channel_idx)
  # 5 + 6 + 7 = 18 channels: the paper's 550 (WRN50-2) is capped at what exists.
  config = bl.PadimConfig.for_backbone("wide_resnet50_2")
  assert config.n_features == 550
  assert bl.PadimConfig.for_backbone("resnet18").n_features == 100
  assert bl.PadimConfig.for_backbone("efficientnet_lite0").n_features == 100
  full = bl.fit_padim(train, config)
  np.testing.assert_array_equal(full.channel_idx, np.arange(18))
  assert full.layer_counts == (5, 6, 7)
  # Size: means (64, 18) + precision factors (64, 18, 18) + indices (18,), 4 bytes each.
  assert bl.model_size_bytes(full) == 4 * (64 * 18 + 64 * 18 * 18 + 18)


# ---------------------------------------------------------------------------------------------
# PatchCore
# ---------------------------------------------------------------------------------------------


def _patch_embedding_ref(feats):
  """3x3 zero-padded mean of layer2 and layer3, layer3 bilinearly upsampled to 4x4, concat."""
  pooled = {n: scipy.ndimage.uniform_filter(feats[n], size=(1, 3, 3, 1), mode="constant")
            for n in ("layer2", "layer3")}
  l3 = pooled["layer3"]
  up = np.stack([_resize_ref(l3[..., c], (4, 4)) for c in range(l3.shape[-1])], axis=-1)
  return np.concatenate([pooled["layer2"], up], axis=-1)


def test_patch_embedding_matches_numpy(test_feats):
  got = patchcore.patch_embedding({k: np.asarray(v) for k, v in test_feats.items()},
                                  ("layer2", "layer3"), 3)
  np.testing.assert_allclose(got, _patch_embedding_ref(_f64(test_feats)), atol=1e-5)


def _greedy_ref(x, n, start):
  chosen = [start]
  min_d = np.sum((x - x[start]) ** 2, axis=1)
  for _ in range(n - 1):
    nxt = int(np.argmax(min_d))
    chosen.append(nxt)
    min_d = np.minimum(min_d, np.sum((x - x[nxt]) ** 2, axis=1))
  return np.array(chosen)


def test_greedy_coreset_matches_numpy():
  x = np.random.default_rng(6).normal(size=(200, 5)).astype(np.float32)
  got = np.asarray(bl.greedy_coreset(x, 25, 7))
  np.testing.assert_array_equal(got, _greedy_ref(x.astype(np.float64), 25, 7))


def test_nearest_neighbors_matches_bruteforce():
  rng = np.random.default_rng(7)
  q = rng.normal(size=(37, 6)).astype(np.float32)
  bank = rng.normal(size=(53, 6)).astype(np.float32)
  # Chunks that divide neither 37 nor 53 exercise the padding of queries and bank.
  dist, idx = bl.nearest_neighbors(q, bank, k=4, query_chunk=8, bank_chunk=16)
  full = scipy.spatial.distance.cdist(q.astype(np.float64), bank.astype(np.float64))
  ref_idx = np.argsort(full, axis=1)[:, :4]
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(dist, np.take_along_axis(full, ref_idx, axis=1), atol=1e-5)


def test_patchcore_matches_numpy(train, test_feats):
  config = bl.PatchcoreConfig(coreset_ratio=0.25, num_neighbors=3, sigma=0.0, query_chunk=16,
                              bank_chunk=32, projection_dim=4)
  state = bl.fit_patchcore(train, config, jax.random.key(0))
  bank = np.asarray(state.memory_bank, np.float64)
  all_patches = _patch_embedding_ref(_f64(train)).reshape(-1, 13)
  assert bank.shape == (96, 13)  # 25% of 24 images x 16 patches
  # The bank is a coreset: distinct rows of the training patches.
  d_bank = scipy.spatial.distance.cdist(bank, all_patches)
  assert np.all(d_bank.min(axis=1) < 1e-4)
  assert len(set(np.argmin(d_bank, axis=1))) == 96

  scores, maps = bl.score_patchcore(state, test_feats, out_size=4)
  emb = _patch_embedding_ref(_f64(test_feats)).reshape(3, 16, 13)
  ref_scores = []
  for b in range(3):
    dist = scipy.spatial.distance.cdist(emb[b], bank)  # (16, M)
    s_patch = dist.min(axis=1)
    np.testing.assert_allclose(maps[b].ravel(), s_patch, rtol=1e-4, atol=1e-5)
    worst = int(np.argmax(s_patch))
    m_star = int(np.argmin(dist[worst]))
    support = np.argsort(scipy.spatial.distance.cdist(bank[m_star][None], bank)[0])[:3]
    assert support[0] == m_star
    ex = np.exp(dist[worst, support])
    ref_scores.append((1.0 - np.exp(s_patch[worst]) / ex.sum()) * s_patch[worst])
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-4)
  # b = 1: no re-weighting, the image score is the largest patch score.
  plain = state.replace(config=config.replace(num_neighbors=1))
  scores1, _ = bl.score_patchcore(plain, test_feats, out_size=4)
  np.testing.assert_allclose(scores1, np.asarray(maps).max(axis=(1, 2)), rtol=1e-5)


def test_patchcore_full_bank_and_projection_shapes(train):
  state = bl.fit_patchcore(train, bl.PatchcoreConfig(coreset_ratio=1.0))
  np.testing.assert_allclose(state.memory_bank,
                             _patch_embedding_ref(_f64(train)).reshape(-1, 13), atol=1e-5)
  x = np.random.default_rng(8).normal(size=(50, 40)).astype(np.float32)
  z = patchcore.random_projection(x, jax.random.key(0), 16)
  assert z.shape == (50, 16)
  assert patchcore.random_projection(x, jax.random.key(0), None) is x


# ---------------------------------------------------------------------------------------------
# All methods: interface, outliers, validation
# ---------------------------------------------------------------------------------------------

_SMALL = {
    "mahaad": bl.MahaADConfig(layers=LAYERS),
    "padim": bl.PadimConfig(n_features=12),
    "patchcore": bl.PatchcoreConfig(coreset_ratio=0.5),
}


@pytest.fixture(scope="module")
def fitted(train):
  return {name: bl.get_baseline(name).fit(train, _SMALL[name], jax.random.key(0))
          for name in bl.BASELINES}


@pytest.mark.parametrize("name", sorted(_SMALL))
def test_outlier_patch_scores_higher(name, fitted):
  method = bl.get_baseline(name)
  rng = np.random.default_rng(9)
  normal = _features(rng, 1)
  outlier = _features(np.random.default_rng(9), 1, outlier_at=(5, 2))
  feats = {k: np.concatenate([normal[k], outlier[k]]) for k in LAYERS}
  scores, maps = method.score(fitted[name], feats, out_size=32)
  assert scores.shape == (2,) and maps.shape == (2, 32, 32)
  assert np.all(np.isfinite(scores)) and np.all(np.isfinite(maps))
  assert scores[1] > scores[0]
  # The hottest pixel sits on the outlier. Its coarsest trace, layer3 cell (1, 0), covers pixels
  # [16, 32) x [0, 16) (PatchCore's 3x3 pooling spreads it that far); allow 2 pixels of blur.
  i, j = np.unravel_index(int(np.argmax(maps[1])), (32, 32))
  assert i >= 14 and j < 18, (i, j)
  # ... and the map of the clean image is lower everywhere near it.
  assert maps[1, 16:, :16].mean() > maps[0, 16:, :16].mean()


def test_registry_and_sizes(fitted):
  assert set(bl.BASELINES) == {"mahaad", "padim", "patchcore"}
  for name, method in bl.BASELINES.items():
    assert method.name == name and isinstance(method.config_cls(), method.config_cls)
    assert bl.model_size_bytes(fitted[name]) > 0
  assert bl.model_size_bytes(fitted["patchcore"]) == 4 * 192 * 13
  with pytest.raises(ValueError, match=r"unknown baseline 'glad'.*mahaad"):
    bl.get_baseline("glad")


def test_scoring_does_not_retrace(fitted, test_feats):
  state = fitted["padim"]
  bl.score_padim(state, test_feats, out_size=16)
  size = padim._score._cache_size()
  other = {k: v + 0.1 for k, v in test_feats.items()}
  bl.score_padim(state, other, out_size=16)
  assert padim._score._cache_size() == size


def test_invalid_inputs_raise(train, fitted):
  with pytest.raises(ValueError, match=r"has no layer 'layer3'"):
    bl.fit_padim({k: train[k] for k in ("layer1", "layer2")})
  with pytest.raises(ValueError, match=r"features\['layer2'\] should have shape \(N, h, w, d\)"):
    bl.fit_mahaad({**train, "layer2": train["layer2"][0]})
  with pytest.raises(ValueError, match=r"features\['layer3'\] has 24 samples but "
                                       r"features\['layer2'\] has 5"):
    bl.fit_patchcore({**train, "layer2": train["layer2"][:5]}, bl.PatchcoreConfig())
  with pytest.raises(ValueError, match=r"holds 1 sample\(s\); this method needs at least 2"):
    bl.fit_padim({k: v[:1] for k, v in train.items()})
  with pytest.raises(ValueError, match=r"should be a dict"):
    bl.fit_mahaad([train["layer1"]])
  with pytest.raises(ValueError, match=r"coreset_ratio should be in \(0, 1\], got 0.0"):
    bl.fit_patchcore(train, bl.PatchcoreConfig(coreset_ratio=0.0))
  with pytest.raises(ValueError, match=r"n_features should be >= 1 or None, got 0"):
    bl.fit_padim(train, bl.PadimConfig(n_features=0))
  with pytest.raises(ValueError, match=r"should be a MahaADConfig, got PadimConfig"):
    bl.fit_mahaad(train, bl.PadimConfig())
  bad = {**train, "layer1": train["layer1"][:, :4]}
  with pytest.raises(ValueError, match=r"\(h, w, d\) = \(4, 8, 5\) but the model was fitted on "
                                       r"\(8, 8, 5\)"):
    bl.score_padim(fitted["padim"], bad)
  with pytest.raises(ValueError, match=r"out_size should be a positive int.*got 0"):
    bl.score_mahaad(fitted["mahaad"], train, out_size=0)
  with pytest.raises(ValueError, match=r"k should be in \[1, 3\] \(the bank size\), got 5"):
    bl.nearest_neighbors(np.zeros((2, 4)), np.zeros((3, 4)), k=5)
  with pytest.raises(ValueError, match=r"not positive definite"):
    bl.fit_mahaad({k: np.zeros_like(v) for k, v in train.items()},
                  bl.MahaADConfig(layers=LAYERS, shrinkage=False))
