"""K-MLE (paper Eq. 1-3, 9) against a float64 NumPy transcription; planted mixtures; validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from glad_jax.mixture import (EMConfig, GaussianMixture, KMLEConfig, fit_em, fit_kmle, kmle_init,
                              kmle_step)
from glad_jax.mixture.fit import resize_mixture
from glad_jax.mixture import kmle
from glad_jax.mixture.kmle import SufficientStats, cluster_moments, m_step


# ---------------------------------------------------------------------------------------------
# float64 NumPy transcription of the paper
# ---------------------------------------------------------------------------------------------


def _eq9(s, n):
  d = s.shape[0]
  tr, tr_s2 = np.trace(s), np.trace(s @ s)
  den = (n + 1 - 2 / d) * (tr_s2 - tr**2 / d)
  rho = 1.0 if den <= 1e-12 * tr_s2 else min(((1 - 2 / d) * tr_s2 + tr**2) / den, 1.0)
  return (1 - rho) * s + rho * tr / d * np.eye(d)


def _log_joint64(w, mu, cov, x):
  """log pi_k + log N(x; mu_k, Sigma_k), -inf for dropped components (w = 0)."""
  return np.stack([np.log(w[k]) + multivariate_normal(mu[k], cov[k]).logpdf(x) if w[k] > 0
                   else np.full(len(x), -np.inf) for k in range(len(w))], axis=1)


def _ref_step(w, mu, cov, x, *, use_oas, reg, min_size=2):
  """One K-MLE iteration written from Eq. 1-3 (+ Eq. 9); dropped clusters keep weight 0."""
  k, d = mu.shape
  score = np.full((len(x), k), np.inf)
  for j in range(k):
    if w[j] > 0:
      diff = x - mu[j]
      maha = np.einsum("nd,de,ne->n", diff, np.linalg.inv(cov[j]), diff)
      # Eq. 1 with the likelihood-correct sign of the weight term.
      score[:, j] = maha + np.linalg.slogdet(cov[j])[1] - 2 * np.log(w[j])
  z = np.argmin(score, axis=1)
  lj = _log_joint64(w, mu, cov, x)
  counts = np.bincount(z, minlength=k).astype(float)
  new_w, new_mu, new_cov = np.zeros(k), np.zeros((k, d)), np.tile(np.eye(d), (k, 1, 1))
  for j in range(k):
    c = x[z == j]
    if len(c) < min_size:
      continue                                           # "Gaussians with no samples are dropped"
    new_w[j] = len(c)
    new_mu[j] = c.mean(0)                                # Eq. 2
    s = (c - new_mu[j]).T @ (c - new_mu[j]) / len(c)     # Eq. 3
    new_cov[j] = (_eq9(s, len(c)) if use_oas else s) + reg * np.eye(d)
  new_w /= new_w.sum()                                   # Eq. 2, over the clusters kept
  stats = dict(counts=counts, loglik=logsumexp(lj, axis=1).mean(), class_loglik=lj.max(1).mean(),
               labels=z)
  return (new_w, new_mu, new_cov), stats


def _ref_fit(w, mu, cov, x, *, use_oas, reg, tol, max_iter):
  prev = None
  for _ in range(max_iter):
    (w, mu, cov), stats = _ref_step(w, mu, cov, x, use_oas=use_oas, reg=reg)
    cur = stats["class_loglik"]
    if prev is not None and abs(cur - prev) <= tol * abs(prev):
      break
    prev = cur
  live = w > 0
  return w[live], mu[live], cov[live]


def _to_np(mix):
  return (np.asarray(mix.weights, np.float64), np.asarray(mix.means, np.float64),
          np.asarray(mix.covariances, np.float64))


def _mixture(w, mu, cov):
  return GaussianMixture(weights=jnp.asarray(w, jnp.float32), means=jnp.asarray(mu, jnp.float32),
                         cov_chol=jnp.asarray(np.linalg.cholesky(cov), jnp.float32))


def _planted(seed, d=4, sizes=(100, 150, 200, 250, 300), sep=10.0):
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(len(sizes), d)) * sep
  xs, labels = [], []
  for j, (m, n) in enumerate(zip(means, sizes)):
    a = np.eye(d) + 0.3 * rng.normal(size=(d, d))
    xs.append(rng.normal(size=(n, d)) @ a.T + m)
    labels.append(np.full(n, j))
  return np.concatenate(xs), np.concatenate(labels)


# ---------------------------------------------------------------------------------------------
# one step
# ---------------------------------------------------------------------------------------------


def _step_problem():
  """3 clusters, one outlier captured by a narrow component (1 sample), one empty component."""
  rng = np.random.default_rng(0)
  x, _ = _planted(0, d=3, sizes=(60, 80, 62), sep=6.0)
  outlier = np.array([[40.0, 40.0, 40.0]])
  x = np.concatenate([x, outlier])
  mu = np.concatenate([x[[5, 70, 150]] + rng.normal(size=(3, 3)), outlier,
                       [[-100.0, 0.0, 0.0]]])
  cov = np.stack([np.eye(3) * 4, np.eye(3) * 3, np.eye(3) * 5, np.eye(3) * 0.01, np.eye(3)])
  w = np.array([0.3, 0.3, 0.3, 0.05, 0.05])
  return x, (w, mu, cov)


_step_jit = jax.jit(functools.partial(kmle_step, chunk_size=64), static_argnames=("use_oas",))


def _with_junk_rows(x):
  """x plus 53 far-away rows that the mask switches off (they must contribute nothing)."""
  junk = np.concatenate([x, np.full((53, x.shape[1]), 1e3)])
  return jnp.asarray(junk, jnp.float32), jnp.arange(len(junk)) < len(x)


@pytest.mark.parametrize("use_oas", [True, False])
def test_step_matches_numpy_transcription(use_oas):
  x, params = _step_problem()
  reg = 1e-3
  (w_ref, mu_ref, cov_ref), stats_ref = _ref_step(*params, x, use_oas=use_oas, reg=reg)
  new, stats = _step_jit(_mixture(*params), *_with_junk_rows(x), use_oas=use_oas, reg_covar=reg)
  w, mu, cov = _to_np(new)
  np.testing.assert_array_equal(stats.counts, stats_ref["counts"])
  assert list(stats_ref["counts"][3:]) == [1, 0]          # the 1-sample and the empty cluster
  np.testing.assert_array_equal(w > 0, [True, True, True, False, False])   # both dropped
  assert int(stats.n_live) == 3
  np.testing.assert_allclose(w, w_ref, rtol=1e-6)
  np.testing.assert_allclose(mu[:3], mu_ref[:3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cov[:3], cov_ref[:3], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats.loglik, stats_ref["loglik"], rtol=1e-5)
  np.testing.assert_allclose(stats.class_loglik, stats_ref["class_loglik"], rtol=1e-5)


def test_step_jit_equals_eager():
  x, params = _step_problem()
  mix = _mixture(*params)
  xj, mask = _with_junk_rows(x)
  jitted = _step_jit(mix, xj, mask, use_oas=True, reg_covar=1e-3)
  eager = kmle_step(mix, xj, mask, use_oas=True, reg_covar=1e-3, chunk_size=64)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cluster_moments_match_numpy_with_ignored_rows_and_empty_clusters():
  rng = np.random.default_rng(3)
  n, d, k = 203, 3, 7
  x = (1e3 + 0.01 * rng.normal(size=(n, d))).astype(np.float32)   # far from the origin
  z = rng.integers(0, k + 1, size=n).astype(np.int32)             # k = ignored row
  z[z == 4] = 5                                                   # an empty cluster
  shift = (1e3 + 0.01 * rng.normal(size=(k, d))).astype(np.float32)
  counts, sums, scatter = jax.jit(cluster_moments)(jnp.asarray(x), jnp.asarray(z),
                                                   jnp.asarray(shift))
  x64, s64 = x.astype(np.float64), shift.astype(np.float64)
  for j in range(k):
    diff = x64[z == j] - s64[j]
    assert counts[j] == len(diff)
    np.testing.assert_allclose(sums[j], diff.sum(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scatter[j], diff.T @ diff, rtol=1e-4, atol=1e-8)
  # Eq. 3 through the shifted sums stays accurate 1e5 standard deviations from the origin.
  stats = SufficientStats(counts=counts, sums=sums, scatter=scatter, loglik=jnp.zeros(()),
                          class_loglik=jnp.zeros(()), n_samples=jnp.float32(n),
                          n_fallback=jnp.zeros((), jnp.int32))
  new, _ = m_step(stats, jnp.asarray(shift), use_oas=False, reg_covar=0.0, min_cluster_size=2)
  for j in range(k):
    if (z == j).sum() >= 2:
      np.testing.assert_allclose(new.covariances[j], np.cov(x64[z == j].T, bias=True),
                                 rtol=1e-3, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# fits
# ---------------------------------------------------------------------------------------------


# Every fit below uses N = 150 samples in d = 4 (and K <= 64, one bucket), so that they share one
# compiled step: compilation, not arithmetic, is what costs time here.
_SIZES = (20, 25, 30, 35, 40)


def test_recovers_planted_mixture():
  x, labels = _planted(1, sizes=_SIZES)
  mix, info = fit_kmle(x, KMLEConfig(n_components=5), jax.random.key(1))
  w, mu, cov = _to_np(mix)
  assert mix.n_components == 5 and info.converged
  true_w = np.bincount(labels) / len(labels)
  true_mu = np.stack([x[labels == j].mean(0) for j in range(5)])
  reg = KMLEConfig().reg_covar * x.var(0).mean()
  true_cov = np.stack([_eq9(np.cov(x[labels == j].T, bias=True), np.sum(labels == j))
                       + reg * np.eye(4) for j in range(5)])
  rows, cols = linear_sum_assignment(((mu[:, None] - true_mu[None]) ** 2).sum(-1))
  np.testing.assert_allclose(w[rows], true_w[cols], atol=1e-6)     # well separated: exact
  np.testing.assert_allclose(mu[rows], true_mu[cols], atol=1e-4)
  # atol: float32 raw moments E[u u^T] - mu mu^T lose ~eps |mu|^2 / var ~ 1e-5 here.
  np.testing.assert_allclose(cov[rows], true_cov[cols], rtol=1e-4, atol=1e-4)
  assert info.n_live[-1] == 5 and len(info.loglik) == info.n_iter


def test_over_initialised_fit_prunes_like_numpy_reference():
  """K = 20 on 5 planted clusters: components die (n < 2), the rest tile the true clusters.

  K-MLE is hard-assignment coordinate ascent: a cluster split between several components is a
  fixed point, so it does *not* come back to exactly 5 (the paper's supplement: 50-60% of the
  initial components survive). What must hold: the same pruning and the same model as the
  float64 transcription from the same start, each survivor inside one true cluster, and the
  survivors' weights adding up to the true proportions.
  """
  x, labels = _planted(2, sizes=_SIZES)
  cfg = KMLEConfig(n_components=20)
  reg = cfg.reg_covar * x.var(0).mean()
  init = kmle_init(jax.random.key(0), jnp.asarray(x - x.mean(0), jnp.float32), 20, reg_covar=reg)
  init = init.replace(means=init.means + x.mean(0))
  mix, info = fit_kmle(x, cfg, init=init)
  w_ref, mu_ref, cov_ref = _ref_fit(*_to_np(init), x, use_oas=True, reg=reg, tol=cfg.tol,
                                    max_iter=cfg.max_iter)
  w, mu, cov = _to_np(mix)
  assert 5 < len(w) < 20 and len(w) == len(w_ref) == info.n_live[-1]
  rows, cols = linear_sum_assignment(((mu[:, None] - mu_ref[None]) ** 2).sum(-1))
  np.testing.assert_allclose(w[rows], w_ref[cols], atol=1e-6)
  np.testing.assert_allclose(mu[rows], mu_ref[cols], atol=1e-3)
  np.testing.assert_allclose(cov[rows], cov_ref[cols], rtol=1e-3, atol=1e-3)
  true_mu = np.stack([x[labels == j].mean(0) for j in range(5)])
  owner = np.argmin(((mu[:, None] - true_mu[None]) ** 2).sum(-1), axis=1)
  assert set(owner) == set(range(5))
  np.testing.assert_allclose(np.bincount(owner, weights=w), np.bincount(labels) / len(x),
                             atol=1e-6)
  assert np.all(w > 0) and abs(w.sum() - 1) < 1e-6


def test_bucket_padding_does_not_change_the_model():
  x, _ = _planted(4, sizes=_SIZES)
  cfg = KMLEConfig(n_components=12, max_iter=8)
  a, ia = fit_kmle(x, cfg, jax.random.key(0))                  # 12 live + 52 masked rows
  b, ib = fit_kmle(x, cfg.replace(bucket=12), jax.random.key(0))  # no masked rows
  assert a.n_components == b.n_components and ia.n_live == ib.n_live
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4)


def test_without_oas_classification_loglik_never_decreases_and_callback_sees_it():
  x, _ = _planted(5, sizes=_SIZES)
  seen = []
  # K-MLE without OAS is coordinate ascent of the classification likelihood. (Exactly so without
  # pruning: a dropped 1-sample cluster takes its point's likelihood with it; so K = 5 here.)
  mix, info = fit_kmle(x, KMLEConfig(n_components=5, use_oas=False),
                       jax.random.key(2), callback=lambda *a: seen.append(a))
  assert [s[0] for s in seen] == list(range(1, info.n_iter + 1))
  assert [s[1] for s in seen] == list(info.loglik) == list(info.class_loglik)
  assert [s[2] for s in seen] == list(info.n_live)
  assert info.objective == "classification" and info.converged
  ll = np.asarray(info.loglik)
  assert info.n_iter >= 3 and np.all(np.diff(ll) >= -1e-6 * np.abs(ll[1:]))
  assert np.all(np.isnan(info.mixture_loglik))   # K-MLE's fit skips the logsumexp over K


def test_assignment_pass_without_mixture_loglik_keeps_labels_and_class_loglik():
  from glad_jax.mixture.stats import assignment_pass

  x, params = _step_problem()
  mix = _mixture(*params)
  xj, mask = _with_junk_rows(x)
  xj, mask = xj[:128], mask[:128]
  z, ll, cl = assignment_pass(mix, xj, mask, chunk_size=64)
  z2, ll2, cl2 = assignment_pass(mix, xj, mask, chunk_size=64, mixture_loglik=False)
  np.testing.assert_array_equal(np.asarray(z), np.asarray(z2))
  assert float(cl) == float(cl2) and np.isnan(float(ll2)) and float(ll) >= float(cl)


def test_init_is_seeded_kmeanspp_with_global_covariance():
  x, _ = _planted(6, sizes=_SIZES)
  xj = jnp.asarray(x, jnp.float32)
  a = kmle_init(jax.random.key(0), xj, 8, reg_covar=0.5)
  b = kmle_init(jax.random.key(0), xj, 8, reg_covar=0.5)
  c = kmle_init(jax.random.key(1), xj, 8, reg_covar=0.5)
  np.testing.assert_array_equal(a.means, b.means)
  assert not np.array_equal(a.means, c.means)
  means = np.asarray(a.means)
  dist = np.abs(means[:, None, :] - x[None].astype(np.float32)).sum(-1)
  assert np.all(dist.min(1) == 0)                                 # seeds are data points
  assert len({tuple(m) for m in means}) == 8
  np.testing.assert_allclose(a.weights, np.full(8, 1 / 8))
  np.testing.assert_allclose(a.covariances, np.tile(np.cov(x.T, bias=True) + 0.5 * np.eye(4),
                                                    (8, 1, 1)), rtol=1e-4, atol=1e-4)
  # only the first n_samples rows are data
  padded = jnp.concatenate([xj, jnp.full((50, 4), 1e4)])
  p = kmle_init(jax.random.key(0), padded, 8, n_samples=len(x), reg_covar=0.5)
  np.testing.assert_allclose(p.covariances, a.covariances, rtol=1e-4)
  np.testing.assert_array_equal(p.means, a.means)


def test_resize_keeps_live_components_first():
  mix = GaussianMixture(weights=jnp.asarray([0.5, 0.0, 0.2, 0.0, 0.3]),
                        means=jnp.arange(10.0).reshape(5, 2),
                        cov_chol=jnp.tile(2 * jnp.eye(2), (5, 1, 1)))
  small = resize_mixture(mix, 4)
  np.testing.assert_array_equal(small.weights, np.float32([0.5, 0.2, 0.3, 0.0]))
  np.testing.assert_array_equal(small.means, [[0, 1], [4, 5], [8, 9], [0, 0]])
  np.testing.assert_array_equal(small.cov_chol[3], np.eye(2))
  big = resize_mixture(mix, 7)
  assert big.n_components == 7 and float(jnp.sum(big.weights > 0)) == 3


def test_duplicated_points_do_not_break_seeding():
  rng = np.random.default_rng(0)
  x = np.repeat(rng.normal(size=(3, 4)), 50, axis=0) + 1e-3 * rng.normal(size=(150, 4))
  mix, _ = fit_kmle(x, KMLEConfig(n_components=6, max_iter=5), jax.random.key(0))
  assert 3 <= mix.n_components <= 6
  assert np.all(np.isfinite(np.asarray(mix.cov_chol)))


# ---------------------------------------------------------------------------------------------
# validation at the entry point
# ---------------------------------------------------------------------------------------------

_X = np.random.default_rng(0).normal(size=(40, 3))


@pytest.mark.parametrize("x,cfg,message", [
    (_X[0], KMLEConfig(n_components=2), r"2-D array .* got shape \(3,\)"),
    (_X[None], KMLEConfig(n_components=2), r"2-D array .* got shape \(1, 40, 3\)"),
    (np.zeros((0, 3)), KMLEConfig(n_components=2), r"x is empty: got shape \(0, 3\)"),
    (np.zeros((5, 0)), KMLEConfig(n_components=2), r"x is empty: got shape \(5, 0\)"),
    (np.where(np.arange(120).reshape(40, 3) == 70, np.nan, _X), KMLEConfig(n_components=2),
     r"1 non-finite values \(NaN or inf\) .* first in row 23"),
    (np.where(np.arange(120).reshape(40, 3) == 5, np.inf, _X), KMLEConfig(n_components=2),
     r"non-finite .* row 1"),
    (np.full((2, 3), 1e39), KMLEConfig(n_components=1), r"non-finite .* float32"),
    (_X[:2], KMLEConfig(n_components=1), r"fewer samples \(2\) than dimensions \(3\)"),
    (_X, KMLEConfig(n_components=41), r"n_components \(41\) exceeds the number of samples \(40\)"),
    (_X, KMLEConfig(n_components=0), r"n_components must be a positive integer, got 0"),
    (_X, KMLEConfig(n_components=2, max_iter=0), r"max_iter must be a positive integer, got 0"),
    (_X, KMLEConfig(n_components=2, tol=-1.0), r"tol must be >= 0, got -1.0"),
    (_X, KMLEConfig(n_components=2, reg_covar=float("nan")), r"reg_covar must be >= 0, got nan"),
    (_X, KMLEConfig(n_components=2, min_cluster_size=1), r"min_cluster_size must be >= 2"),
    (_X, KMLEConfig(n_components=2, chunk_size=0), r"chunk_size must be a positive integer or None"),
    (_X, KMLEConfig(n_components=2, bucket=0), r"bucket must be a positive integer"),
    (_X, KMLEConfig(n_components=2, init_sample_size=0), r"init_sample_size must be a positive"),
    (_X, KMLEConfig(n_components=2, label_tol=1.0), r"label_tol must be None or in \[0, 1\), got 1.0"),
    (_X, KMLEConfig(n_components=2, label_tol=-0.1), r"label_tol must be None or in \[0, 1\), got -0.1"),
    (np.array([["a", "b"]] * 3), KMLEConfig(n_components=1), r"x must hold real numbers, got dtype <U1"),
    (np.ones((5, 2)), KMLEConfig(n_components=2), r"x has zero variance"),
])
def test_bad_input_messages(x, cfg, message):
  with pytest.raises(ValueError, match=message):
    fit_kmle(x, cfg, jax.random.key(0))


def test_bad_input_messages_for_jax_arrays_and_init():
  with pytest.raises(ValueError, match=r"non-finite .* row 0"):
    fit_kmle(jnp.asarray(_X).at[0, 0].set(jnp.nan), KMLEConfig(n_components=2))
  bad = GaussianMixture(weights=jnp.ones(2), means=jnp.zeros((2, 4)), cov_chol=jnp.zeros((2, 4, 4)))
  with pytest.raises(ValueError, match=r"init must have weights \(K,\), means \(K, 3\)"):
    fit_kmle(_X, KMLEConfig(n_components=2), init=bad)
  bad = GaussianMixture(weights=jnp.ones(2), means=jnp.zeros((2, 3)), cov_chol=jnp.zeros((2, 3, 3)))
  with pytest.raises(ValueError, match=r"positive diagonal"):
    fit_kmle(_X, KMLEConfig(n_components=2), init=bad)


def test_all_components_dropped_is_reported():
  x, _ = _planted(0, sizes=_SIZES)      # no cluster can reach 1000 samples
  with pytest.raises(ValueError, match=r"every component was dropped .*min_cluster_size=1000"):
    fit_kmle(x, KMLEConfig(n_components=3, min_cluster_size=1000), jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# the assignment pass (Eq. 1) against a brute-force float64 argmax
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [3, 24, 40, 66])   # packed layout up to 48, bands above
def test_assignment_pass_labels_are_the_float64_argmax(d):
  """Labels == float64 argmax of log pi_k + log N(u; k) on every sample whose top two scores are
  apart by more than float32 rounding; on near-ties (planted: a component duplicated with its
  mean moved by 1e-4) the label is one of the tied components, and exact duplicates go to the
  first; padding rows get K."""
  rng = np.random.default_rng(d)
  k, n = 12, 1000
  means = rng.normal(size=(k, d)) * 2 / np.sqrt(d)
  a = rng.normal(size=(k, d, d)) / np.sqrt(d)
  covs = a @ np.swapaxes(a, 1, 2) + 0.3 * np.eye(d)
  w = rng.uniform(0.5, 1.5, k)
  means[5], covs[5], w[5] = means[4] + 1e-4, covs[4], w[4]       # near-tie with 4
  means[9], covs[9], w[9] = means[8], covs[8], w[8]               # exact duplicate of 8
  w[11] = 0.0                                                     # masked
  w /= w.sum()
  z = rng.integers(0, k - 1, n)
  x = means[z] + np.einsum("nij,nj->ni", np.linalg.cholesky(covs[z]), rng.normal(size=(n, d)))
  xj, mask = _with_junk_rows(x - x.mean(0))   # centred, as in the fitters, plus 53 padding rows
  mix = _mixture(w, means - x.mean(0), covs)
  xj = jnp.pad(xj, ((0, 1088 - xj.shape[0]), (0, 0)))
  mask = jnp.pad(mask, (0, 1088 - mask.shape[0]))
  labels, ll, cl = jax.jit(functools.partial(kmle.assignment_pass, chunk_size=64))(mix, xj, mask)
  labels = np.asarray(labels)
  np.testing.assert_array_equal(labels[n:], k)
  ref = _log_joint64(w, means - x.mean(0), covs, x - x.mean(0))
  top2 = np.sort(ref, axis=1)[:, -2:]
  clear = top2[:, 1] - top2[:, 0] > 1e-3 * (1 + np.abs(top2[:, 1]))
  np.testing.assert_array_equal(labels[:n][clear], np.argmax(ref, axis=1)[clear])
  tied = ~clear
  assert tied.sum() > 50                         # the planted near-ties are exercised
  # a near-tie goes to a component within rounding of the best; never to a masked one
  gap = ref.max(1) - ref[np.arange(n), labels[:n]]
  assert np.all(gap[tied] <= 1e-3 * (1 + np.abs(top2[tied, 1])))
  assert not np.any(labels == 9) and not np.any(labels == 11)    # duplicates: the first wins
  np.testing.assert_allclose(float(cl), ref.max(1).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(ll), logsumexp(ref, axis=1).sum(), rtol=1e-5)


def test_label_change_and_the_label_stopping_rule_follow_the_numpy_transcription():
  """FitInfo.label_change is the fraction of samples whose component changed (components keep
  their identity through the K buckets' compaction); label_tol stops at the first iteration
  whose change is at most label_tol, with the model of the reference after that many steps."""
  x, _ = _planted(2, sizes=_SIZES)
  cfg = KMLEConfig(n_components=20, bucket=1)          # K shrinks: rows are compacted at once
  reg = cfg.reg_covar * x.var(0).mean()
  init = kmle_init(jax.random.key(0), jnp.asarray(x - x.mean(0), jnp.float32), 20, reg_covar=reg)
  init = init.replace(means=init.means + x.mean(0))
  params, changes, previous = _to_np(init), [], None
  for _ in range(8):
    params, stats = _ref_step(*params, x, use_oas=True, reg=reg)
    z = stats["labels"]
    changes.append(1.0 if previous is None else float(np.mean(z != previous)))
    previous = z
  mix, info = fit_kmle(x, cfg.replace(max_iter=8), init=init)
  assert info.converged and len(info.label_change) == info.n_iter
  assert info.n_live[0] < 20                           # rows were dropped and compacted
  np.testing.assert_allclose(info.label_change, changes[:info.n_iter], atol=0.5 / len(x))
  label_tol = 0.02
  stop = next(i for i in range(1, 8) if changes[i] <= label_tol)   # 0-based iteration
  assert stop + 1 < info.n_iter                        # earlier than the paper's rule here
  early, info_e = fit_kmle(x, cfg.replace(max_iter=8, label_tol=label_tol), init=init)
  assert info_e.converged and info_e.n_iter == stop + 1
  w_ref, mu_ref, _ = _ref_fit(*_to_np(init), x, use_oas=True, reg=reg, tol=0.0,
                              max_iter=stop + 1)
  w, mu, _ = _to_np(early)
  rows, cols = linear_sum_assignment(((mu[:, None] - mu_ref[None]) ** 2).sum(-1))
  np.testing.assert_allclose(w[rows], w_ref[cols], atol=1e-6)
  np.testing.assert_allclose(mu[rows], mu_ref[cols], atol=1e-3)
  _, info_em = fit_em(x, EMConfig(n_components=5, max_iter=3), jax.random.key(0))
  assert info_em.label_change == ()
