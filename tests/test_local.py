"""Tests of glad_jax.local: local weight maps (Eq. 10-12) and their sparse tiled form.

References are NumPy/SciPy transcriptions (scipy.stats log-pdf, explicit disk loops), never
glad_jax's own Gaussian math.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from glad_jax import local
from glad_jax.mixture.gaussian import GaussianMixture, log_joint_params, split_rows


def _mixture(rng, k, d, spread=1.0, scale=0.5):
  """Random mixture with well-conditioned covariances; returns (GaussianMixture, covs)."""
  means = spread * rng.standard_normal((k, d))
  a = rng.standard_normal((k, d, d)) * 0.3
  covs = scale * np.eye(d)[None] + a @ np.swapaxes(a, 1, 2)
  weights = rng.dirichlet(np.ones(k))
  mix = GaussianMixture(weights=jnp.asarray(weights, jnp.float32),
                        means=jnp.asarray(means, jnp.float32),
                        cov_chol=jnp.asarray(np.linalg.cholesky(covs), jnp.float32))
  return mix, means, covs, weights


def _scipy_log_dens(x, means, covs):
  """log N(x_n; mu_k, Sigma_k) with scipy, shape (N, K)."""
  return np.stack([stats.multivariate_normal(means[k], covs[k]).logpdf(x).reshape(len(x))
                   for k in range(len(means))], axis=1)


def _disk(i, j, h, w, radius):
  """Positions of the grid in the disk of (i, j), clipped at the borders (brute force)."""
  return [(y, x) for y in range(h) for x in range(w) if (y - i) ** 2 + (x - j) ** 2 <= radius ** 2]


def test_disk_offsets_counts_and_membership():
  # Lattice points in a disk: 1, 5, 9, 13 for r = 0, 1, sqrt(2), 2.
  for radius, count in [(0.0, 1), (1.0, 5), (1.5, 9), (2.0, 13)]:
    offsets = local.disk_offsets(radius)
    assert len(offsets) == count
    assert len(set(offsets)) == count
    assert all(dy * dy + dx * dx <= radius * radius for dy, dx in offsets)
  assert set(local.disk_offsets(1.0)) == {(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)}


def test_one_step_matches_numpy_transcription():
  """local_kmle_step == Eq. 10-12 written out per position with the clipped disk gather."""
  rng = np.random.default_rng(1)
  m, h, w, k, d, radius = 3, 4, 5, 4, 2, 1.0
  _, means, covs, _ = _mixture(rng, k, d, spread=1.5)
  feats = rng.standard_normal((m, h, w, d)) * 1.5
  log_w = np.log(rng.dirichlet(np.ones(k), size=(h, w)))
  log_w[0, 0, 1] = -np.inf  # a component already dropped at one position
  log_w[2, 3, :2] = -np.inf
  dens = _scipy_log_dens(feats.reshape(-1, d), means, covs).reshape(m, h, w, k)

  # NumPy transcription of Eq. 10-12 (with the sign that maximises the likelihood).
  ref_w = np.empty((h, w, k))
  ref_ll = np.empty((h, w))
  for i in range(h):
    for j in range(w):
      samples = np.concatenate([dens[:, y, x] for y, x in _disk(i, j, h, w, radius)])
      cost = -2.0 * samples - 2.0 * log_w[i, j]  # maha + log|Sigma| + const - 2 log pi
      z = np.argmin(cost, axis=1)
      ref_w[i, j] = np.bincount(z, minlength=k) / len(samples)
      ref_ll[i, j] = np.mean(np.max(samples + log_w[i, j], axis=1))

  # The step reads a grid padded by the halo; junk there must be ignored.
  padded = np.full((m, h + 2, w + 2, k), 1e3)
  padded[:, 1:-1, 1:-1] = dens
  valid = np.zeros((h + 2, w + 2), bool)
  valid[1:-1, 1:-1] = True
  new_log_w, ll = local.local_kmle_step(jnp.asarray(padded, jnp.float32), jnp.asarray(valid),
                                        jnp.asarray(log_w, jnp.float32),
                                        local.disk_offsets(radius))
  np.testing.assert_allclose(np.exp(np.asarray(new_log_w)), ref_w, atol=1e-6)
  np.testing.assert_array_equal(np.isneginf(np.asarray(new_log_w)), ref_w == 0)
  np.testing.assert_allclose(np.asarray(ll), ref_ll, rtol=1e-5)


def _planted(rng, m=50, h=8, w=8):
  """Left half draws components {0, 1} with weights (0.3, 0.7), right half component 2."""
  d = 3
  means = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
  covs = np.stack([0.25 * np.eye(d)] * 3)
  z = np.full((m, h, w), 2)
  z[:, :, : w // 2] = rng.choice(2, size=(m, h, w // 2), p=[0.3, 0.7])
  feats = means[z] + 0.5 * rng.standard_normal((m, h, w, d))
  mix = GaussianMixture(weights=jnp.asarray([0.3, 0.3, 0.4], jnp.float32),
                        means=jnp.asarray(means, jnp.float32),
                        cov_chol=jnp.asarray(np.linalg.cholesky(covs), jnp.float32))
  return mix, feats.astype(np.float32), z


def test_fit_recovers_planted_position_dependent_mixture():
  rng = np.random.default_rng(0)
  mix, feats, z = _planted(rng)
  m, h, w, _ = feats.shape
  progress = []
  log_w, n_iter = local.fit_local_log_weights(feats, mix, radius=1.0, callback=progress.append)
  pi = np.exp(np.asarray(log_w))
  # The components are 20 standard deviations apart: the local K-MLE must find exactly the
  # empirical label proportions of each (clipped) disk.
  for i in range(h):
    for j in range(w):
      labels = np.concatenate([z[:, y, x] for y, x in _disk(i, j, h, w, 1.0)])
      np.testing.assert_allclose(pi[i, j], np.bincount(labels, minlength=3) / labels.size,
                                 atol=1e-6)
  # Away from the border between the halves, the planted weights and exact zeros.
  left, right = pi[:, : w // 2 - 1], pi[:, w // 2 + 1:]
  np.testing.assert_allclose(left[..., :2], np.broadcast_to([0.3, 0.7], left[..., :2].shape),
                             atol=0.15)
  assert np.all(left[..., 2] == 0) and np.all(right[..., :2] == 0)
  np.testing.assert_array_equal(right[..., 2], 1.0)
  assert np.all(n_iter <= 10) and np.all(n_iter >= 2)
  assert len(progress) == 1 and progress[0].converged_fraction == 1.0
  assert progress[0].rows == (0, h)

  sparse = local.fit_local_weights(feats, mix, tile_size=4)
  np.testing.assert_array_equal(np.asarray(local.to_dense(sparse)), np.asarray(log_w))
  nnz = local.nnz_map(sparse)
  np.testing.assert_array_equal(nnz, (pi > 0).sum(-1))
  assert np.all(nnz[:, w // 2 + 1:] == 1)


def test_driver_chunking_and_max_iter():
  """Chunks of rows give the same map as one chunk; max_iter=1 is one step from pi_k."""
  rng = np.random.default_rng(2)
  m, h, w, k, d = 4, 5, 3, 3, 2
  mix, means, covs, weights = _mixture(rng, k, d, spread=1.0)
  feats = (1.2 * rng.standard_normal((m, h, w, d))).astype(np.float32)
  whole, it_whole = local.fit_local_log_weights(feats, mix, radius=1.0, tol=0.0, max_iter=6)
  progress = []
  # One row (plus halo) per chunk: 5 chunks.
  chunked, it_chunked = local.fit_local_log_weights(
      feats, mix, radius=1.0, tol=0.0, max_iter=6, callback=progress.append,
      max_chunk_elements=3 * m * (w + 2) * k)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(it_chunked), np.asarray(it_whole))
  assert np.all(np.asarray(it_whole) == 6)  # tol = 0 never stops early
  assert [p.rows for p in progress] == [(r, r + 1) for r in range(h)]

  # Chunks of 4 rows: the last one has 3 padding rows, which must not iterate (the lower two
  # have no sample at all); the loop count of a chunk is the most iterations of its real rows.
  progress = []
  loose, it_loose = local.fit_local_log_weights(
      feats, mix, radius=1.0, tol=1e-3, max_iter=50, callback=progress.append,
      max_chunk_elements=6 * m * (w + 2) * k)
  assert [p.rows for p in progress] == [(0, 4), (4, 5)]
  it_loose = np.asarray(it_loose)
  assert it_loose.max() < 50
  assert [p.iterations for p in progress] == [it_loose[a:b].max() for a, b in
                                              (p.rows for p in progress)]
  assert np.all(np.isfinite(np.asarray(loose)) | np.isneginf(np.asarray(loose)))

  one, it_one = local.fit_local_log_weights(feats, mix, radius=1.0, max_iter=1)
  assert np.all(np.asarray(it_one) == 1)
  dens = _scipy_log_dens(feats.reshape(-1, d).astype(np.float64), means, covs)
  dens = dens.reshape(m, h, w, k)
  for i in range(h):
    for j in range(w):
      samples = np.concatenate([dens[:, y, x] for y, x in _disk(i, j, h, w, 1.0)])
      z = np.argmax(samples + np.log(weights), axis=1)
      np.testing.assert_allclose(np.exp(np.asarray(one[i, j])),
                                 np.bincount(z, minlength=k) / len(samples), atol=1e-6)


def _numpy_local_kmle(dens, log_pi, radius, max_iter, tol):
  """Straightforward local K-MLE: direct log-densities, all K components every iteration.

  Per position: assign each disk sample to argmax_k log N + log pi_k(x) (Eq. 10), set
  pi_k(x) = |C_k| / n (Eq. 11-12), stop once the relative change of the mean classification
  log-likelihood is below tol (the update that met it is kept) or after max_iter updates.
  """
  m, h, w, k = dens.shape
  log_w = np.empty((h, w, k))
  n_iter = np.zeros((h, w), int)
  for i in range(h):
    for j in range(w):
      samples = np.concatenate([dens[:, y, x] for y, x in _disk(i, j, h, w, radius)])
      lw, prev = log_pi.copy(), None
      for _ in range(max_iter):
        scores = samples + lw
        ll = np.mean(np.max(scores, axis=1))
        with np.errstate(divide="ignore"):
          lw = np.log(np.bincount(np.argmax(scores, axis=1), minlength=k) / len(samples))
        n_iter[i, j] += 1
        if prev is not None and abs(ll - prev) < tol * abs(prev):
          break
        prev = ll
      log_w[i, j] = lw
  return log_w, n_iter


@pytest.mark.parametrize("radius, budget_rows", [(1.0, None), (2.0, 2)])
def test_fit_matches_numpy_kmle_with_candidate_compaction(radius, budget_rows):
  """The fast fit (first update per sample, then compact candidate sets) equals full-K K-MLE.

  K = 67 (not a multiple of the argmax block, one masked component) is well above the final
  number of non-zeros, so the later updates run on compact candidate sets; radius 2 with a
  small budget cuts the grid into several chunks of rows (the last one shifted up to the
  grid's end), with tiles of one position.
  """
  rng = np.random.default_rng(6)
  m, h, w, k, d = 6, 7, 5, 67, 3
  _, means, covs, weights = _mixture(rng, k, d, spread=2.0, scale=0.3)
  weights[5] = 0.0  # a masked component: never assigned
  # Component 8 duplicates 7: exact ties, which the argmax of Eq. 10 gives to the first, 7.
  means[8], covs[8], weights[8] = means[7], covs[7], weights[7]
  weights /= weights.sum()
  mix = GaussianMixture(weights=jnp.asarray(weights, jnp.float32),
                        means=jnp.asarray(means, jnp.float32),
                        cov_chol=jnp.asarray(np.linalg.cholesky(covs), jnp.float32))
  # Position-dependent data: each column of the grid draws around its own few components.
  centres = rng.integers(0, k, (w, 4))
  centres[centres == 5] = 6
  centres[:, 0] = 7
  z = centres[np.arange(w)[None, None, :], rng.integers(0, 4, (m, h, w))]
  feats = (means[z] + 0.8 * rng.standard_normal((m, h, w, d))).astype(np.float32)
  dens = _scipy_log_dens(feats.reshape(-1, d).astype(np.float64),
                         means.astype(np.float32).astype(np.float64), covs).reshape(m, h, w, k)
  with np.errstate(divide="ignore"):
    log_pi = np.log(weights.astype(np.float32).astype(np.float64))
  ref_w, ref_it = _numpy_local_kmle(dens, log_pi, radius, max_iter=30, tol=1e-6)

  reach = int(radius)
  kwargs = {}
  if budget_rows is not None:
    kwargs["max_chunk_elements"] = m * (w + 2 * reach) * k * (budget_rows + 2 * reach)
  progress = []
  log_w, n_iter = local.fit_local_log_weights(feats, mix, radius=radius, max_iter=30, tol=1e-6,
                                              callback=progress.append, **kwargs)
  log_w, n_iter = np.asarray(log_w), np.asarray(n_iter)
  np.testing.assert_array_equal(np.isfinite(log_w), np.isfinite(ref_w))
  np.testing.assert_allclose(np.where(np.isfinite(log_w), log_w, 0.0),
                             np.where(np.isfinite(ref_w), ref_w, 0.0), atol=1e-6)
  np.testing.assert_array_equal(n_iter, ref_it)
  # The compaction really runs: several updates on candidate sets much smaller than K.
  nnz = np.isfinite(log_w).sum(-1)
  assert n_iter.max() >= 3 and nnz.max() <= k // 2 and not np.isfinite(log_w[..., 5]).any()
  assert np.isfinite(log_w[..., 7]).any() and not np.isfinite(log_w[..., 8]).any()
  if budget_rows is None:
    assert [p.rows for p in progress] == [(0, h)]
  else:
    assert [p.rows for p in progress] == [(0, 2), (2, 4), (4, 6), (6, 7)]
  assert [p.iterations for p in progress] == [ref_it[a:b].max() for a, b in
                                              (p.rows for p in progress)]


@pytest.mark.parametrize("d", [5, 56])     # the packed layout (d <= 48) and the banded one
def test_centred_log_densities_match_scipy_far_from_origin(d):
  """The fit's expanded-form log-densities, centred on the mixture mean, at an offset of ~100."""
  from glad_jax.mixture.gaussian import PACKED_MAX_DIM

  rng = np.random.default_rng(5)
  k = 7
  _, means, covs, weights = _mixture(rng, k, d, spread=1.0, scale=0.3)
  means = means + 100.0
  mix = GaussianMixture(weights=jnp.asarray(weights, jnp.float32),
                        means=jnp.asarray(means, jnp.float32),
                        cov_chol=jnp.asarray(np.linalg.cholesky(covs), jnp.float32))
  x = (100.0 + rng.standard_normal((64, d))).astype(np.float32)
  ref = _scipy_log_dens(x.astype(np.float64), means.astype(np.float32).astype(np.float64), covs)
  params = local.log_density_params(mix)
  assert (len(params[1]) == 1) == (d <= PACKED_MAX_DIM)
  np.testing.assert_allclose(np.asarray(params[0]), weights @ means, rtol=1e-6)
  got = np.asarray(local.log_densities(jnp.asarray(x), params)).T  # (K, N) -> (N, K)
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
  # The offset matters: the same products without centring lose far more to cancellation.
  w, b = log_joint_params(mix.replace(weights=jnp.ones(k, jnp.float32)))
  raw = local.log_densities(jnp.asarray(x), (jnp.zeros(d, jnp.float32), split_rows(w, d), b))
  assert np.max(np.abs(np.asarray(raw).T - ref)) > 1e-3


def test_sparsify_layout_and_round_trip():
  rng = np.random.default_rng(3)
  h, w, k, t = 3, 4, 6, 4
  log_w = np.log(rng.uniform(0.1, 1.0, (h, w, k))).astype(np.float32)
  log_w[rng.uniform(size=(h, w, k)) < 0.6] = -np.inf
  log_w[0, 0, :] = -np.inf
  log_w[0, 0, 2] = 0.0  # at least one non-zero at (0, 0)
  log_w[..., 5] = -np.inf  # a component used nowhere
  sparse = local.sparsify(log_w, tile_size=t)

  nnz_k = np.isfinite(log_w).reshape(-1, k).sum(0)
  assert sparse.n_tiles == int(np.sum(np.ceil(nnz_k / t)))
  assert sparse.tile_size == t and sparse.grid_shape == (h, w) and sparse.n_components == k
  comp = np.asarray(sparse.tile_component)
  pos = np.asarray(sparse.tile_position)
  lw = np.asarray(sparse.tile_log_weight)
  assert np.all(np.diff(comp) >= 0)  # sorted by component
  np.testing.assert_array_equal(np.bincount(comp, minlength=k), np.ceil(nnz_k / t))
  pad = pos == h * w
  np.testing.assert_array_equal(pad, np.isneginf(lw))
  for kk in range(k):  # each component's positions, in order, are its non-zeros
    real = pos[comp == kk][~pad[comp == kk]]
    np.testing.assert_array_equal(real, np.flatnonzero(np.isfinite(log_w.reshape(-1, k)[:, kk])))
  np.testing.assert_array_equal(np.asarray(local.to_dense(sparse)), log_w)
  np.testing.assert_array_equal(local.nnz_map(sparse), np.isfinite(log_w).sum(-1))

  st = local.sparsity_stats(sparse)
  total = int(np.isfinite(log_w).sum())
  assert st.mean_nnz == pytest.approx(total / (h * w))
  per_pos = np.isfinite(log_w).sum(-1)
  assert st.min_nnz == int(per_pos.min()) and st.max_nnz == int(per_pos.max())
  assert st.density == pytest.approx(total / (h * w * k))
  assert st.padding_fraction == pytest.approx(1 - total / (sparse.n_tiles * t))


def test_fit_local_weights_validation():
  rng = np.random.default_rng(4)
  mix, *_ = _mixture(rng, 2, 3)
  good = np.zeros((2, 3, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"shape \(M, h, w, d\), got shape \(3, 3, 3\)"):
    local.fit_local_weights(good[0], mix)
  with pytest.raises(ValueError, match="dimension d=4 .* mixture has dimension 3"):
    local.fit_local_weights(np.zeros((2, 3, 3, 4), np.float32), mix)
  bad = good.copy()
  bad[1, 2, 0, 1] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    local.fit_local_weights(bad, mix)
  with pytest.raises(ValueError, match="radius .* got -1"):
    local.fit_local_weights(good, mix, radius=-1)
  with pytest.raises(ValueError, match="max_iter .* got 0"):
    local.fit_local_weights(good, mix, max_iter=0)
  with pytest.raises(ValueError, match="tol .* got -0.1"):
    local.fit_local_weights(good, mix, tol=-0.1)
  with pytest.raises(ValueError, match="tile_size .* got 0"):
    local.fit_local_weights(good, mix, tile_size=0)


def test_radius_bands_cover_their_disks():
  """Two evenly spaced bands of whole rows whose windows hold the largest disk; small grids: one band."""
  bands = local.radius_bands((64, 64), 3.0, 128)
  assert [(b.rows, b.window) for b in bands] == [(1, 7), (1, 7)]
  assert bands[0].start < 32 <= bands[1].start
  for grid, r, n in [((64, 64), 3.0, 128), ((16, 16), 3.0, 128), ((40, 7), 2.0, 30), ((30, 8), 3.0, 40)]:
    for b in local.radius_bands(grid, r, n):
      assert b.window_start <= max(0, b.start - int(r))
      assert min(grid[0], b.start + b.rows + int(r)) <= b.window_start + b.window <= grid[0]
  assert local.radius_bands((16, 16), 3.0, 128) == (local.RadiusBand(0, 16, 0, 16),)


def test_held_out_log_likelihood_matches_whole_grid_fits():
  """Per radius, the bands' held-out log-likelihood equals a whole-grid fit (`fit_local_log_weights`) read
  at the bands' positions with SciPy log-densities: sum_k pi_k(x) N(u; k) over the local weights."""
  rng = np.random.default_rng(11)
  m_fit, m_held, h, w, k, d = 7, 3, 20, 5, 9, 2
  mix, means, covs, _ = _mixture(rng, k, d, spread=2.0, scale=0.4)
  # Position-dependent data, shifted by one column in half the images (misregistration).
  centres = rng.integers(0, k, (h, w, 2))
  z = centres[np.arange(h)[None, :, None], np.arange(w)[None, None, :], rng.integers(0, 2, (m_fit + m_held, h, w))]
  feats = (means[z] + 0.6 * rng.standard_normal((m_fit + m_held, h, w, d))).astype(np.float32)
  feats[::2] = np.roll(feats[::2], 1, axis=2)
  fit, held = feats[:m_fit], feats[m_fit:]
  radii = [1.0, 2.0]
  bands = local.radius_bands((h, w), max(radii), 10)
  assert len(bands) == 2
  got = local.held_out_log_likelihood([fit[:, b.window_start:b.window_start + b.window] for b in bands],
                                      [held[:, b.start:b.start + b.rows] for b in bands], bands, mix, radii,
                                      (h, w), max_iter=20, tol=1e-6)
  dens = _scipy_log_dens(held.reshape(-1, d).astype(np.float64), means, covs).reshape(m_held, h, w, k)
  for i, r in enumerate(radii):
    log_w = np.asarray(local.fit_local_log_weights(fit, mix, radius=r, max_iter=20, tol=1e-6)[0], np.float64)
    rows = np.concatenate([np.arange(b.start, b.start + b.rows) for b in bands])
    ll = np.logaddexp.reduce(dens[:, rows] + log_w[None, rows], axis=-1)  # (M_held, rows, w)
    np.testing.assert_allclose(got[i], ll.reshape(m_held, -1).mean(axis=1), rtol=1e-5, atol=1e-5)
  assert got.shape == (2, m_held)
