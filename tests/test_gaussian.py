"""Gaussian log-densities (direct and expanded forms) against float64 SciPy/NumPy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from glad_jax.mixture import gaussian as g

# Jitted once per shape: eager dispatch would compile every one of the d slices separately.
_maha_direct = jax.jit(g.mahalanobis_sq)
_maha_expanded = jax.jit(g.mahalanobis_sq_expanded)


def _random_mixture(rng, k, d, cond=10.0, spread=3.0):
  covs = []
  for _ in range(k):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    covs.append(q @ np.diag(np.logspace(0, -np.log10(cond), d)) @ q.T)
  covs = np.stack(covs)
  means = rng.normal(size=(k, d)) * spread / np.sqrt(d)
  weights = rng.dirichlet(np.ones(k))
  return weights, means, covs


def _samples(rng, means, covs, n):
  z = rng.integers(0, len(means), n)
  chol = np.linalg.cholesky(covs)
  return means[z] + np.einsum("nij,nj->ni", chol[z], rng.normal(size=(n, means.shape[1]))), z


def _mixture(weights, means, covs):
  return g.GaussianMixture(weights=jnp.asarray(weights, jnp.float32),
                           means=jnp.asarray(means, jnp.float32),
                           cov_chol=jnp.asarray(np.linalg.cholesky(covs), jnp.float32))


def test_cholesky_helpers_match_numpy():
  rng = np.random.default_rng(0)
  _, _, covs = _random_mixture(rng, 3, 6, cond=100.0)
  chol = jnp.asarray(np.linalg.cholesky(covs), jnp.float32)
  np.testing.assert_allclose(g.cholesky_log_det(chol), np.linalg.slogdet(covs)[1], rtol=1e-5,
                             atol=1e-4)
  p = np.asarray(g.precision_cholesky(chol))
  np.testing.assert_allclose(p @ np.swapaxes(p, 1, 2), np.linalg.inv(covs), rtol=1e-3, atol=1e-3)
  assert np.allclose(np.tril(p, -1), 0)   # P = L^{-T} is upper triangular


def test_component_log_prob_matches_scipy():
  rng = np.random.default_rng(1)
  w, mu, covs = _random_mixture(rng, 4, 5, cond=50.0)
  x, _ = _samples(rng, mu, covs, 64)
  ref = np.stack([multivariate_normal(mu[k], covs[k]).logpdf(x) for k in range(4)], axis=1)
  mix = _mixture(w, mu, covs)
  got = g.component_log_prob(jnp.asarray(x, jnp.float32), mix.means,
                             g.precision_cholesky(mix.cov_chol), g.cholesky_log_det(mix.cov_chol))
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-3)


def test_expanded_log_joint_matches_scipy_and_masks():
  rng = np.random.default_rng(2)
  w, mu, covs = _random_mixture(rng, 5, 7, cond=30.0)
  w[3] = 0.0                                     # a masked component
  x, _ = _samples(rng, mu, covs, 80)
  mix = _mixture(w, mu, covs)
  lj = np.asarray(jax.jit(lambda m, x: g.log_joint(x, *g.log_joint_params(m)))(
      mix, jnp.asarray(x, jnp.float32)))
  # band by band == one matmul with the concatenated features
  wj, bj = g.log_joint_params(mix)
  whole = np.asarray(g.expanded_features(jnp.asarray(x, jnp.float32)) @ wj + bj)
  np.testing.assert_allclose(lj[:, w > 0], whole[:, w > 0], rtol=1e-5, atol=1e-3)
  ref = np.stack([np.log(w[k]) + multivariate_normal(mu[k], covs[k]).logpdf(x)
                  if w[k] > 0 else np.full(len(x), -np.inf) for k in range(5)], axis=1)
  live = w > 0
  np.testing.assert_allclose(lj[:, live], ref[:, live], rtol=1e-4, atol=3e-3)
  assert np.all(lj[:, 3] == -np.inf)


@pytest.mark.parametrize("d", [1, 5, 37])
def test_features_and_packing(d):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(6, d)).astype(np.float32)
  rows, cols = g.quadratic_pairs(d)
  f = g.quadratic_size(d)
  # every unordered pair is present; duplicates only as mirrored pairs
  pairs = {(min(i, j), max(i, j)) for i, j in zip(rows, cols)}
  assert pairs == {(i, j) for i in range(d) for j in range(i, d)}
  # the only extra columns are the mirrored pairs inside each band's diagonal block
  bands = g.feature_bands(d)
  assert f == d * (d + 1) // 2 + sum((e - s) * (e - s - 1) // 2 for s, e in bands)
  assert len(bands) <= 16 and all(e - s <= max(8, -(-d // 16)) for s, e in bands)
  feats = np.asarray(jax.jit(g.expanded_features)(jnp.asarray(x)))
  assert feats.shape == (6, g.expanded_size(d)) == (6, f + d + 1)
  np.testing.assert_allclose(feats[:, :f], x[:, rows] * x[:, cols], rtol=1e-6)
  np.testing.assert_array_equal(feats[:, f:f + d], x)
  np.testing.assert_array_equal(feats[:, -1], 1.0)
  a = rng.normal(size=(3, d, d))
  a = (a + np.swapaxes(a, 1, 2)).astype(np.float32)
  packed = np.asarray(g.pack_quadratic(jnp.asarray(a)))
  np.testing.assert_array_equal(packed, a[:, rows, cols])
  np.testing.assert_array_equal(np.asarray(g.unpack_quadratic(jnp.asarray(packed), d)), a)


def _maha64(x, means, covs):
  chol = np.linalg.cholesky(covs)
  return np.stack([np.sum(np.square(np.linalg.solve(c, (x - m).T)), axis=0)
                   for m, c in zip(means, chol)], axis=1)


@pytest.mark.parametrize("d,cond", [(8, 10.0), (32, 1e3), (96, 1e4)])
def test_mahalanobis_forms_vs_float64_on_centred_data(d, cond):
  """Both forms on centred data (what the fitters feed them) against a float64 reference."""
  rng = np.random.default_rng(d)
  _, mu, covs = _random_mixture(rng, 4, d, cond=cond)
  x, z = _samples(rng, mu, covs, 300)
  mean = x.mean(0)
  x, mu = x - mean, mu - mean
  ref = _maha64(x, mu, covs)
  xj, mj = jnp.asarray(x, jnp.float32), jnp.asarray(mu, jnp.float32)
  pj = g.precision_cholesky(jnp.asarray(np.linalg.cholesky(covs), jnp.float32))
  direct = np.asarray(_maha_direct(xj, mj, pj))
  expanded = np.asarray(_maha_expanded(xj, mj, pj))
  # Relative to maha + d (d is the size of the members' distances): float32 input rounding
  # alone moves an ill-conditioned quadratic form by ~cond * eps.
  assert np.max(np.abs(direct - ref) / (ref + d)) < 1e-5
  assert np.max(np.abs(expanded - ref) / (ref + d)) < 2e-4
  # the member's own distance is what decides an assignment: close in absolute terms too
  own = np.arange(len(z)), z
  assert np.max(np.abs(expanded[own] - ref[own])) < 1e-3 * d * math.sqrt(cond / 10)


def test_expanded_form_needs_centring():
  """Why the fitters centre the data: the expanded form's error grows with the offset."""
  rng = np.random.default_rng(7)
  d = 32
  _, mu, covs = _random_mixture(rng, 3, d, cond=1e3)
  x, _ = _samples(rng, mu, covs, 200)
  pj = g.precision_cholesky(jnp.asarray(np.linalg.cholesky(covs), jnp.float32))
  errs = {}
  for offset in (0.0, 30.0):
    ref = _maha64(x + offset, mu + offset, covs)
    xj, mj = jnp.asarray(x + offset, jnp.float32), jnp.asarray(mu + offset, jnp.float32)
    errs[offset] = (np.max(np.abs(np.asarray(_maha_direct(xj, mj, pj)) - ref) / (ref + d)),
                    np.max(np.abs(np.asarray(_maha_expanded(xj, mj, pj)) - ref)
                           / (ref + d)))
  assert errs[30.0][1] > 20 * errs[0.0][1]      # expanded: cancellation ~ eps x^T A x
  assert errs[30.0][0] < 1e-4                   # direct: stays accurate


def test_covariances_property():
  rng = np.random.default_rng(4)
  w, mu, covs = _random_mixture(rng, 2, 3)
  np.testing.assert_allclose(_mixture(w, mu, covs).covariances, covs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [1, 6, 24])
def test_packed_log_joint_matches_scipy(d):
  """Packed features (each pair once, one matmul) give the float64 log pi_k + log N(x; k)."""
  rng = np.random.default_rng(7)
  w, mu, covs = _random_mixture(rng, 6, d, cond=20.0)
  w[2] = 0.0                                     # a masked component
  x, _ = _samples(rng, mu, covs, 50)
  x = x - x.mean(0)                              # the fitters centre their data
  mu = mu - x.mean(0)
  mix = _mixture(w, mu, covs)
  xj = jnp.asarray(x, jnp.float32)
  feats = np.asarray(g.packed_features(xj), np.float64)
  rows, cols = g.packed_pairs(d)
  assert feats.shape == (50, g.packed_size(d)) == (50, d * (d + 1) // 2 + d + 1)
  assert {(i, j) for i, j in zip(rows, cols)} == {(i, j) for i in range(d) for j in range(i, d)}
  np.testing.assert_allclose(feats[:, :len(rows)], x[:, rows] * x[:, cols], rtol=1e-5, atol=1e-6)
  lj = np.asarray(jax.jit(lambda m, x: g.joint_scorer(m)(x))(mix, xj))
  ref = np.stack([np.log(w[k]) + multivariate_normal(mu[k], covs[k]).logpdf(x)
                  if w[k] > 0 else np.full(len(x), -np.inf) for k in range(6)], axis=1)
  live = w > 0
  np.testing.assert_allclose(lj[:, live], ref[:, live], rtol=1e-4, atol=3e-3)
  assert np.all(lj[:, 2] == -np.inf)
  wp, bp = g.log_joint_params(mix, packed=True)
  np.testing.assert_allclose(np.asarray(g.packed_features(xj) @ wp + bp)[:, live], ref[:, live],
                             rtol=1e-4, atol=3e-3)


def test_best_component_is_the_first_argmax_and_logsumexp_matches_scipy():
  from scipy.special import logsumexp
  rng = np.random.default_rng(8)
  s = rng.normal(size=(200, 37)).astype(np.float32) * 5
  s[:, 30:] = -np.inf                            # masked components
  s[7, [3, 11, 20]] = 100.0                      # exact ties: the first index wins
  s[8, :] = -np.inf                              # no live component at all
  z, best = jax.jit(g.best_component)(jnp.asarray(s))
  np.testing.assert_array_equal(np.asarray(z), np.argmax(s, axis=1))
  np.testing.assert_array_equal(np.asarray(best), np.max(s, axis=1))
  assert int(z[7]) == 3
  lse = np.asarray(jax.jit(g.logsumexp_from_max)(jnp.asarray(s), best))
  with np.errstate(divide="ignore"):
    ref = logsumexp(s.astype(np.float64), axis=1)
  np.testing.assert_allclose(lse[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-6)
  assert lse[8] == -np.inf
