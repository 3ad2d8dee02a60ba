"""Tests of glad_jax.scoring against SciPy/NumPy references (log-pdf, logsumexp, bilinear
resize, quantile), plus the structural cost claim of sparse scoring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from glad_jax import local, scoring
from glad_jax.mixture.gaussian import GaussianMixture


def _mixture(rng, k, d):
  means = rng.standard_normal((k, d))
  a = rng.standard_normal((k, d, d)) * 0.4
  covs = 0.5 * np.eye(d)[None] + a @ np.swapaxes(a, 1, 2)
  weights = rng.dirichlet(np.ones(k))
  mix = GaussianMixture(weights=jnp.asarray(weights, jnp.float32),
                        means=jnp.asarray(means, jnp.float32),
                        cov_chol=jnp.asarray(np.linalg.cholesky(covs), jnp.float32))
  return mix, means, covs, weights


def _random_sparse_log_weights(rng, h, w, k, density=0.3):
  """Random local weights, each position with >= 1 non-zero, normalised; (h, w, K)."""
  keep = rng.uniform(size=(h, w, k)) < density
  keep[np.arange(h)[:, None], np.arange(w)[None], rng.integers(0, k, (h, w))] = True
  pi = np.where(keep, rng.uniform(0.05, 1.0, (h, w, k)), 0.0)
  pi /= pi.sum(-1, keepdims=True)
  with np.errstate(divide="ignore"):
    return np.log(pi).astype(np.float32)


def _scipy_ll(x, means, covs, log_w):
  """logsumexp_k log pi_k + log N_k with scipy; x (N, d), log_w (N, K) or (K,)."""
  dens = np.stack([stats.multivariate_normal(means[k], covs[k]).logpdf(x)
                   for k in range(len(means))], axis=1)
  return special.logsumexp(dens + log_w, axis=1)


def _bilinear_np(img, size):
  """Half-pixel-centre bilinear resize with clamped borders, (B, h, w) -> (B, H, W)."""
  def axis_weights(n_in, n_out):
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    mat = np.zeros((n_out, n_in))
    mat[np.arange(n_out), i0] += 1 - (src - i0)
    mat[np.arange(n_out), i1] += src - i0
    return mat
  ry, rx = axis_weights(img.shape[1], size[0]), axis_weights(img.shape[2], size[1])
  return np.einsum("Hh,bhw,Ww->bHW", ry, img, rx)


@pytest.fixture(scope="module")
def layer_setup():
  rng = np.random.default_rng(0)
  h, w, k, d, b = 5, 6, 7, 3, 3
  mix, means, covs, weights = _mixture(rng, k, d)
  log_w = _random_sparse_log_weights(rng, h, w, k)
  sparse = local.sparsify(log_w, tile_size=4)
  layer = scoring.make_layer_model(mix, (h, w), sparse)
  feats = (1.5 * rng.standard_normal((b, h, w, d))).astype(np.float32)
  return dict(layer=layer, log_w=log_w, feats=feats, means=means, covs=covs, weights=weights)


def test_sparse_equals_dense_and_scipy(layer_setup):
  s = layer_setup
  b, h, w, d = s["feats"].shape
  feats = jnp.asarray(s["feats"])
  sparse_ll = np.asarray(scoring.sparse_log_likelihood(s["layer"], feats))
  # Several blocks of tiles (the lax.map path) must give the same map.
  blocked_ll = np.asarray(scoring.sparse_log_likelihood(s["layer"], feats,
                                                        max_elements=b * 4 * d * 3))
  dense_ll = np.asarray(scoring.dense_log_likelihood(s["layer"], feats, jnp.asarray(s["log_w"]),
                                                     max_elements=7 * d * 11))
  ref = _scipy_ll(s["feats"].reshape(-1, d), s["means"], s["covs"],
                  np.tile(s["log_w"].reshape(h * w, -1), (b, 1))).reshape(b, h, w)
  np.testing.assert_allclose(sparse_ll, dense_ll, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(blocked_ll, sparse_ll, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sparse_ll, ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dense_ll, ref, rtol=1e-4, atol=1e-4)


def test_global_only_equals_scipy(layer_setup):
  s = layer_setup
  b, h, w, d = s["feats"].shape
  ll = np.asarray(scoring.global_log_likelihood(s["layer"], jnp.asarray(s["feats"]),
                                                max_elements=7 * d * 10))
  ref = _scipy_ll(s["feats"].reshape(-1, d), s["means"], s["covs"], np.log(s["weights"]))
  np.testing.assert_allclose(ll, ref.reshape(b, h, w), rtol=1e-4, atol=1e-4)
  # layer_log_likelihood dispatches on the presence of local weights.
  no_local = s["layer"].replace(local=None)
  np.testing.assert_allclose(np.asarray(scoring.layer_log_likelihood(no_local, s["feats"])), ll,
                             rtol=1e-5, atol=1e-5)


def test_fusion_matches_numpy_bilinear():
  rng = np.random.default_rng(1)
  maps = [rng.standard_normal((2, 4, 4)), rng.standard_normal((2, 8, 6)),
          rng.standard_normal((2, 16, 12))]
  fused = scoring.fuse_log_likelihoods([jnp.asarray(m, jnp.float32) for m in maps], (16, 12))
  ref = sum(_bilinear_np(m, (16, 12)) for m in maps)
  np.testing.assert_allclose(np.asarray(fused), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q", [0.0, 0.005, 0.013, 0.5, 0.7, 0.995, 1.0])
def test_top_k_quantile_matches_numpy(q):
  """The top-k quantile equals np.quantile's linear rule at both ends, with ties, under a mask
  (traced, inside jit) and with integer h = q (n - 1)."""
  rng = np.random.default_rng(7)
  ll = rng.standard_normal((2, 32, 25)).astype(np.float32)
  ll[1, :4] = 0.25                                   # ties
  mask = rng.uniform(size=(32, 25)) < 0.6
  score = jax.jit(scoring.image_score, static_argnums=2)
  np.testing.assert_allclose(np.asarray(score(jnp.asarray(ll), None, q)),
                             [-np.quantile(x, q) for x in ll], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(score(jnp.asarray(ll), jnp.asarray(mask), q)),
                             [-np.quantile(x[mask], q) for x in ll], rtol=1e-6, atol=1e-6)


def test_top_k_quantile_gradient_matches_interpolation_weights():
  """d score / d ll puts weights (1 - t, t) on the two order statistics (what PGD relies on)."""
  rng = np.random.default_rng(8)
  ll = rng.permutation(np.arange(200, dtype=np.float32)).reshape(1, 10, 20)
  q = 0.013                                          # h = 2.587: order statistics 2 and 3
  grad = np.asarray(jax.grad(lambda x: scoring.image_score(x, None, q)[0])(jnp.asarray(ll)))
  expected = np.zeros_like(ll)
  expected[ll == 2.0] = -(1 - 0.587)
  expected[ll == 3.0] = -0.587
  np.testing.assert_allclose(grad, expected, atol=1e-5)


def test_quantile_score_and_mask():
  rng = np.random.default_rng(2)
  ll = rng.standard_normal((3, 10, 12)).astype(np.float32)
  q = 0.05
  score = np.asarray(scoring.image_score(jnp.asarray(ll), None, q))
  np.testing.assert_allclose(score, [-np.quantile(x, q) for x in ll], rtol=1e-6)
  mask = rng.uniform(size=(10, 12)) < 0.5
  ll[:, ~mask] = -50.0  # very anomalous background that the mask must hide
  score = np.asarray(scoring.image_score(jnp.asarray(ll), jnp.asarray(mask), q))
  np.testing.assert_allclose(score, [-np.quantile(x[mask], q) for x in ll], rtol=1e-6)
  amap = np.asarray(scoring.anomaly_map(jnp.asarray(ll), jnp.asarray(mask)))
  np.testing.assert_array_equal(amap[:, mask], -ll[:, mask])
  for a, x in zip(amap, ll):
    np.testing.assert_array_equal(a[~mask], np.min(-x[mask]))
  np.testing.assert_array_equal(np.asarray(scoring.anomaly_map(jnp.asarray(ll))), -ll)


def test_score_end_to_end_two_layers(layer_setup):
  s = layer_setup
  rng = np.random.default_rng(3)
  mix2, means2, covs2, weights2 = _mixture(rng, 4, 2)
  layer2 = scoring.make_layer_model(mix2, (3, 3))  # global-only layer
  feats2 = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
  layers = {"a": s["layer"], "b": layer2}
  mask = np.zeros((10, 12), bool)
  mask[2:8, 3:11] = True
  out = scoring.score(layers, {"a": s["feats"], "b": feats2}, size=(10, 12), mask=mask,
                      quantile=0.1)

  b, h, w, d = s["feats"].shape
  ref_a = _scipy_ll(s["feats"].reshape(-1, d), s["means"], s["covs"],
                    np.tile(s["log_w"].reshape(h * w, -1), (b, 1))).reshape(b, h, w)
  ref_b = _scipy_ll(feats2.reshape(-1, 2), means2, covs2, np.log(weights2)).reshape(3, 3, 3)
  fused = _bilinear_np(ref_a, (10, 12)) + _bilinear_np(ref_b, (10, 12))
  np.testing.assert_allclose(np.asarray(out.log_likelihood), fused, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out.image_score),
                             [-np.quantile(f[mask], 0.1) for f in fused], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out.anomaly_map)[:, mask], -fused[:, mask],
                             rtol=1e-4, atol=1e-4)

  # Same model and shapes, new values: no new compilation.
  before = scoring.score_unchecked._cache_size()
  scoring.score(layers, {"a": s["feats"] + 0.1, "b": feats2}, size=(10, 12), mask=mask,
                quantile=0.1)
  assert scoring.score_unchecked._cache_size() == before


def test_score_validation_messages(layer_setup):
  s = layer_setup
  layers = {"layer1": s["layer"]}
  feats = s["feats"]
  with pytest.raises(ValueError, match=r"missing for layer\(s\) \['layer1'\]"):
    scoring.score(layers, {"layer2": feats})
  with pytest.raises(ValueError, match=r"unknown layer\(s\) \['layer9'\]"):
    scoring.score(layers, {"layer1": feats, "layer9": feats})
  with pytest.raises(ValueError,
                     match=r"layer 'layer1': features have shape \(3, 5, 6, 4\), expected .* "
                           r"\(5, 6, 3\)"):
    scoring.score(layers, {"layer1": np.zeros((3, 5, 6, 4), np.float32)})
  with pytest.raises(ValueError, match=r"layer 'layer1': features have shape \(5, 6, 3\)"):
    scoring.score(layers, {"layer1": feats[0]})
  bad = feats.copy()
  bad[0, 1, 1, 0] = np.nan
  with pytest.raises(ValueError, match="layer 'layer1': features contain NaN"):
    scoring.score(layers, {"layer1": bad})
  two = {"layer1": s["layer"], "layer2": s["layer"]}
  with pytest.raises(ValueError, match="layer 'layer2' has batch size 2 but layer 'layer1' has 3"):
    scoring.score(two, {"layer1": feats, "layer2": feats[:2]})
  with pytest.raises(ValueError, match=r"mask has shape \(8, 8\) .* size \(16, 16\)"):
    scoring.score(layers, {"layer1": feats}, size=(16, 16), mask=np.ones((8, 8), bool))
  with pytest.raises(ValueError, match="boolean"):
    scoring.score(layers, {"layer1": feats}, size=(16, 16), mask=np.ones((16, 16)))
  with pytest.raises(ValueError, match="mask is empty"):
    scoring.score(layers, {"layer1": feats}, size=(16, 16), mask=np.zeros((16, 16), bool))
  with pytest.raises(ValueError, match="quantile .* got 1.5"):
    scoring.score(layers, {"layer1": feats}, quantile=1.5)
  with pytest.raises(ValueError, match="size should be two positive integers"):
    scoring.score(layers, {"layer1": feats}, size=(0, 16))
  mix, *_ = _mixture(np.random.default_rng(5), 3, 3)
  with pytest.raises(ValueError, match=r"grid shape \(5, 6\), expected \(4, 4\)"):
    scoring.make_layer_model(mix, (4, 4), s["layer"].local)
  with pytest.raises(ValueError, match="K=7 components but the mixture has K=3"):
    scoring.make_layer_model(mix, (5, 6), s["layer"].local)


def test_sparse_cost_follows_nonzeros_not_k():
  """Tiles = sum_k ceil(nnz_k / T), and the compiled FLOPs do not grow with K."""
  rng = np.random.default_rng(6)
  h, w, d, t = 4, 4, 3, 4
  # Same non-zero pattern on the first 5 components, whatever K.
  pattern = _random_sparse_log_weights(rng, h, w, 5, density=0.4)
  feats = jnp.asarray(rng.standard_normal((2, h, w, d)), jnp.float32)
  flops, tiles = {}, {}
  for k in (8, 64):
    mix, *_ = _mixture(rng, k, d)
    log_w = np.full((h, w, k), -np.inf, np.float32)
    log_w[..., :5] = pattern
    sparse = local.sparsify(log_w, tile_size=t)
    nnz_k = np.isfinite(log_w).reshape(-1, k).sum(0)
    assert sparse.n_tiles == int(np.sum(-(-nnz_k // t)))
    tiles[k] = sparse.n_tiles
    layer = scoring.make_layer_model(mix, (h, w), sparse)
    cost = scoring.sparse_log_likelihood.lower(layer, feats).compile().cost_analysis()
    flops[k] = cost["flops"]
    dense = scoring.dense_log_likelihood.lower(layer, feats, jnp.asarray(log_w))
    flops[("dense", k)] = dense.compile().cost_analysis()["flops"]
  assert tiles[8] == tiles[64]
  assert flops[8] == flops[64]
  assert flops[("dense", 64)] > 4 * flops[("dense", 8)]  # the dense path does scale with K


def test_segment_logsumexp_empty_and_neg_inf_segments():
  values = np.array([[0.5, -1.0], [2.0, 3.0], [-np.inf, -np.inf], [1.0, -np.inf]], np.float32)
  segments = np.array([0, 0, 2, 3])
  out = np.asarray(scoring._segment_logsumexp(jnp.asarray(values), jnp.asarray(segments), 4))
  np.testing.assert_allclose(out[0], special.logsumexp(values[:2], axis=0), rtol=1e-6)
  np.testing.assert_array_equal(out[1], -np.inf)  # empty segment
  np.testing.assert_array_equal(out[2], -np.inf)  # only -inf
  np.testing.assert_array_equal(out[3], [1.0, -np.inf])
