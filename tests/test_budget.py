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


def test_plan_samples_affords_the_budget_and_keeps_the_floor():
  cost = budget.IterationCost(fixed=0.2, per_vector=1e-6)  # seconds per iteration: 0.2 + 1e-6 n
  plan = budget.plan_samples(10_000_000, 24, 1000, 60.0, cost, n_iter=50)
  assert plan.n_used == int((60.0 / 50 - 0.2) / 1e-6) and plan.reason == "budget"
  assert plan.est_seconds == pytest.approx(50 * (0.2 + 1e-6 * plan.n_used))
  assert plan.est_bytes == budget.estimate_fit_bytes(plan.n_used, 24, 1000)
  everything = budget.plan_samples(500_000, 24, 1000, 60.0, cost, n_iter=50)
  assert everything.n_used == 500_000 and everything.reason == "all"
  # a budget below the fixed cost keeps the floor of 10 vectors per initial component
  tiny = budget.plan_samples(10_000_000, 24, 1000, 1.0, cost)
  assert tiny.n_used == budget.MIN_SAMPLES_PER_COMPONENT * 1000
  with pytest.raises(ValueError, match=r"per_vector > 0"):
    budget.plan_samples(100, 24, 10, 1.0, budget.IterationCost(0.0, 0.0))


def test_probe_timing_skips_the_compiling_iteration(monkeypatch):
  clock = iter([10.0, 13.0, 15.0, 17.0, 20.0])  # iteration 1 ends at 10 s (it compiled), then 3, 2, 2 s
  monkeypatch.setattr(budget.time, "perf_counter", lambda: next(clock))

  def probe_fit(callback):
    for i in range(4):
      callback(i + 1, -1.0, 5)

  assert budget.measure_iteration_seconds(probe_fit) == pytest.approx(7.0 / 3)
  with pytest.raises(RuntimeError, match="needs at least 2"):
    budget.measure_iteration_seconds(lambda cb: cb(1, -1.0, 5))


def test_iteration_cost_is_the_line_through_two_probes(monkeypatch):
  seconds = {1000: 0.5 + 1000 * 2e-4, 5000: 0.5 + 5000 * 2e-4}  # fixed 0.5 s + 0.2 ms per vector
  monkeypatch.setattr(budget, "measure_iteration_seconds", lambda probe: probe())
  cost = budget.measure_iteration_cost(lambda n: (lambda: seconds[n]), (1000, 5000))
  assert cost.fixed == pytest.approx(0.5) and cost.per_vector == pytest.approx(2e-4)
  # noise that makes the larger probe cheaper: no fixed part, the larger probe's cost per vector
  seconds[5000] = 0.6
  cost = budget.measure_iteration_cost(lambda n: (lambda: seconds[n]), (1000, 5000))
  assert cost.fixed == 0.0 and cost.per_vector == pytest.approx(0.6 / 5000)


def test_auto_budget_in_the_glad_fit_subsamples_only_past_the_probe_size():
  from glad_jax.config import GLADConfig
  from glad_jax.methods import glad

  rng = np.random.default_rng(0)
  n, h, w, d = 40, 32, 32, 4  # 40,960 vectors > the larger probe
  feats = {"layer1": (rng.standard_normal((n, h, w, d)) + rng.integers(0, 3, (n, h, w, 1)) * 4).astype(np.float32)}
  base = GLADConfig(layers=("layer1",), n_components=4, max_iter=5, local_max_iter=3, image_size=64,
                    max_samples="auto")
  events = []
  _, infos = glad.fit_with_info(feats, base.replace(fit_budget_s=1e-4), jax.random.key(0),
                                progress=lambda stage, info: events.append((stage, info)))
  info = infos["layer1"]
  assert info.global_reason == glad.REASON_BUDGET and info.n_samples == n * h * w
  assert info.n_samples_global == budget.MIN_SAMPLES_PER_COMPONENT * 4  # the floor: the budget is tiny
  plan = [i for s, i in events if s == "plan"][0]
  assert plan["n_used"] == info.n_samples_global and plan["est_seconds"] > 0 and plan["est_mb"] > 0
  _, infos = glad.fit_with_info(feats, base.replace(fit_budget_s=1e6), jax.random.key(0))
  assert infos["layer1"].global_reason == glad.REASON_ALL and infos["layer1"].n_samples_global == n * h * w
  small = {"layer1": feats["layer1"][:8]}  # 8,192 vectors: no probe, every vector
  _, infos = glad.fit_with_info(small, base.replace(fit_budget_s=1e-4), jax.random.key(0))
  assert infos["layer1"].global_reason == glad.REASON_ALL and infos["layer1"].n_samples_global == 8 * h * w
  with pytest.raises(ValueError, match="max_samples must be 'auto', None or an int"):
    glad.check_config(base.replace(max_samples="many"))


def test_max_samples_command_line_values():
  from glad_jax.config import parse_max_samples

  assert parse_max_samples("auto") == "auto" and parse_max_samples("all") is None
  assert parse_max_samples("100,000") == 100_000
  with pytest.raises(ValueError, match="'auto', 'all' or a positive integer, got '0'"):
    parse_max_samples("0")


def test_default_caps_are_stratified_and_wide_layers_get_fewer_vectors():
  """max_samples and max_sample_work both cap a layer's global-fit vectors; the subset keeps every image
  and position (budget.stratified_subsample), and the paper's settings use them all."""
  from glad_jax.config import GLADConfig
  from glad_jax.methods import glad
  from glad_jax.mixture.gaussian import expanded_size

  n, h, w = 6, 8, 8
  key = jax.random.key(0)
  rows = lambda idx: idx  # noqa: E731
  config = GLADConfig(max_samples=200, max_sample_work=150 * expanded_size(4))
  narrow, reason, _ = glad._global_samples(config, (n, h, w, 4), key, rows, None, None)
  wide, _, _ = glad._global_samples(config, (n, h, w, 12), key, rows, None, None)
  assert reason == glad.REASON_MAX_WORK and narrow.size == 150                     # the work cap at d = 4
  assert wide.size == 150 * expanded_size(4) // expanded_size(12) < narrow.size     # fewer at d = 12
  np.testing.assert_array_equal(narrow, budget.stratified_subsample(key, n, h, w, 150))
  assert set(np.unique(narrow // (h * w))) == set(range(n))                         # every image
  assert set(np.unique(narrow % (h * w))) == set(range(h * w))                      # every position
  loose = config.replace(max_sample_work=None)
  idx, reason, _ = glad._global_samples(loose, (n, h, w, 12), key, rows, None, None)
  assert idx.size == 200 and reason == glad.REASON_MAX_SAMPLES
  paper = config.paper()
  assert paper.max_samples is None and paper.max_sample_work is None and paper.label_tol is None
  assert glad._global_samples(paper, (n, h, w, 12), key, rows, None, None)[:2] == (None, glad.REASON_ALL)
  with pytest.raises(ValueError, match="label_tol must be in"):
    glad.check_config(config.replace(label_tol=1.5))
  with pytest.raises(ValueError, match="max_sample_work must be"):
    glad.check_config(config.replace(max_sample_work=0))


def test_label_tol_stops_the_layer_fit_earlier_than_the_paper_rule():
  from glad_jax.config import GLADConfig
  from glad_jax.methods import glad

  rng = np.random.default_rng(1)
  feats = {"layer1": (rng.standard_normal((6, 16, 16, 3)) + rng.integers(0, 4, (6, 16, 16, 1)) * 3)
           .astype(np.float32)}
  base = GLADConfig(layers=("layer1",), n_components=24, max_iter=60, tol=0.0, local=False, image_size=64)
  _, paper = glad.fit_with_info(feats, base.replace(label_tol=None), jax.random.key(0))
  _, early = glad.fit_with_info(feats, base.replace(label_tol=0.05), jax.random.key(0))
  assert early["layer1"].n_iter < paper["layer1"].n_iter and early["layer1"].converged
  # The same fit up to the stop: the label rule only ends it sooner.
  ll_paper, ll_early = paper["layer1"].log_likelihood, early["layer1"].log_likelihood
  np.testing.assert_allclose(ll_early, ll_paper[:len(ll_early)], rtol=1e-6)


def test_cli_paper_flag_and_optional_numbers():
  from glad_jax import cli

  parse = lambda *a: cli._config_from_args(cli.build_parser().parse_args(["fit", "d", "--out", "o", *a]))  # noqa: E731
  default = parse()
  assert default.max_samples == 100_000 and default.label_tol == 1e-3 and default.max_sample_work == 3e8
  paper = parse("--paper")
  assert paper.max_samples is None and paper.label_tol is None and paper.max_sample_work is None
  assert parse("--label-tol", "none").label_tol is None and parse("--max-sample-work", "1e9").max_sample_work == 1e9
