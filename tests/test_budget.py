"""Sample budget of the global fit (glad_jax.mixture.budget): cost model, subsample coverage."""

import jax
import numpy as np
import pytest

from glad_jax.mixture import budget


def test_cost_model_counts_the_packed_assignment_flops():
  d, k, n = 24, 1000, 50_000
  flops = 2 * n * k * (d * (d + 1) // 2 + d + 1)
  assert budget.assignment_flops(n, d, k) == flops
  seconds = budget.estimate_fit_seconds(n, d, k, 40, 1e11)
  assert seconds == pytest.approx(40 * budget.STEP_OVERHEAD * flops / 1e11)
  # linear in n and n_iter; inverse in throughput
  assert budget.estimate_fit_seconds(2 * n, d, k, 40, 1e11) == pytest.approx(2 * seconds)
  assert budget.estimate_fit_seconds(n, d, k, 20, 2e11) == pytest.approx(seconds / 4)
  with pytest.raises(ValueError, match=r"throughput must be > 0 flops/s, got 0"):
    budget.estimate_fit_seconds(n, d, k, 40, 0)


def test_fit_bytes_grow_with_n_and_cover_the_centred_copy():
  small = budget.estimate_fit_bytes(10_000, 40, 1000)
  big = budget.estimate_fit_bytes(1_000_000, 40, 1000)
  assert big - small >= 2 * 4 * 40 * 990_000          # two float32 copies of the samples
  assert small >= 4 * 8 * 1000 * 40 * 40               # mixture state


def test_choose_sample_budget_inverts_the_estimate():
  d, k, thr, secs = 40, 1000, 1.5e11, 60.0
  n = budget.choose_sample_budget(10**7, d, k, secs, thr, n_iter=30)
  assert budget.estimate_fit_seconds(n, d, k, 30, thr) <= secs
  assert budget.estimate_fit_seconds(n + 1, d, k, 30, thr) > secs
  assert budget.choose_sample_budget(5000, d, k, secs, thr) == 5000           # all of them
  # a tiny budget still keeps MIN_SAMPLES_PER_COMPONENT per component (or every vector)
  assert budget.choose_sample_budget(10**7, d, k, 1e-6, thr) == 10 * k
  assert budget.choose_sample_budget(3000, d, k, 1e-6, thr) == 3000
  with pytest.raises(ValueError, match=r"seconds_budget must be > 0, got 0"):
    budget.choose_sample_budget(100, d, k, 0, thr)
  with pytest.raises(ValueError, match=r"n_vectors must be >= 1, got 0"):
    budget.choose_sample_budget(0, d, k, 1.0, thr)


def test_measured_throughput_is_positive_and_finite():
  thr = budget.measure_assignment_throughput(n=2048, d=8, k=32, repeats=1)
  assert np.isfinite(thr) and thr > 0


@pytest.mark.parametrize("n_images, h, w, n_used", [(7, 4, 5, 50), (3, 8, 8, 100), (10, 2, 3, 60),
                                                    (5, 3, 3, 4)])
def test_stratified_subsample_covers_images_and_positions(n_images, h, w, n_used):
  key = jax.random.key(3)
  idx = budget.stratified_subsample(key, n_images, h, w, n_used)
  total = n_images * h * w
  expect = min(n_used, total)
  assert idx.shape == (expect,) and idx.dtype == np.int64
  assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < total      # sorted, distinct
  image, position = np.divmod(idx, h * w)
  per_image = np.bincount(image, minlength=n_images)
  per_position = np.bincount(position, minlength=h * w)
  assert per_image.max() - per_image.min() <= 1
  assert per_position.max() - per_position.min() <= 1
  if expect >= n_images:
    assert per_image.min() >= 1
  if expect >= h * w:
    assert per_position.min() >= 1
  np.testing.assert_array_equal(idx, budget.stratified_subsample(key, n_images, h, w, n_used))
  other = budget.stratified_subsample(jax.random.key(4), n_images, h, w, n_used)
  if expect < total:
    assert not np.array_equal(idx, other)


def test_stratified_subsample_keeps_everything_and_names_bad_sizes():
  np.testing.assert_array_equal(budget.stratified_subsample(jax.random.key(0), 2, 3, 4, 30),
                                np.arange(24))
  with pytest.raises(ValueError, match=r"n_images, h, w and n_used must be >= 1, got 2, 0, 4, 5"):
    budget.stratified_subsample(jax.random.key(0), 2, 0, 4, 5)
