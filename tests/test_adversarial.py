"""PGD (OmniAL supp. Section 2): toy scores whose gradients are known in closed form, bounded maps
and metrics against NumPy / scikit-learn, and the attack protocol on a tiny fitted model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax.tree_util import Partial
from sklearn.metrics import average_precision_score

from glad_jax import baselines as bl
from glad_jax import metrics
from glad_jax.robustness import adversarial as adv_lib
from glad_jax.robustness import (OMNIAL_EPSILONS, OMNIAL_STEPS, AttackSuiteConfig, PGDConfig,
                                 attack_suite, average_precision, bounded_map,
                                 calibrated_threshold, directions_from_labels, map_statistics,
                                 pgd_attack, pgd_step, pgd_sweep, pixel_attack,
                                 pixel_average_precision, pixel_bce, project_linf,
                                 score_in_batches)

SHAPE = (3, 6, 5, 3)


@pytest.fixture(scope="module")
def toy():
  rng = np.random.default_rng(0)
  images = rng.uniform(size=SHAPE).astype(np.float32)
  images[0, 0, 0] = [0.0, 1.0, 0.5 / 255]  # on / near the [0, 1] bounds: clipping matters
  weights = rng.uniform(0.5, 2.0, size=SHAPE[1:]).astype(np.float32)
  center = rng.uniform(size=SHAPE[1:]).astype(np.float32)
  return images, weights, center


def _quadratic(weights, center):
  """score(x)_b = sum w (x_b - c)^2; gradient 2 w (x_b - c)."""
  return lambda x: jnp.sum(weights * jnp.square(x - center), axis=(1, 2, 3))


def _quadratic_np(x, weights, center):
  return np.sum(weights * (x - center) ** 2, axis=(1, 2, 3))


def test_one_step_is_a_projected_sign_gradient_step(toy):
  images, weights, center = toy
  eps, alpha = 3 / 255, 5 / 255  # alpha > eps: the projection onto the ball is active
  for direction, sign in (("ascend", 1.0), ("descend", -1.0)):
    got = pgd_attack(_quadratic(weights, center), images, eps, steps=1, step_size=alpha,
                     direction=direction)
    grad = 2.0 * weights * (images.astype(np.float64) - center)
    ref = images + sign * alpha * np.sign(grad)
    ref = np.clip(np.clip(ref, images - eps, images + eps), 0.0, 1.0)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_linear_score_reaches_the_box_corner(toy):
  # For a linear score the sign of the gradient never changes: 5 steps of 2.5 eps / 5 end on
  # the corner clean + eps * sign(w) of the L-inf ball, clipped to [0, 1].
  images, weights, _ = toy
  signed = weights * np.where(np.arange(weights.size).reshape(weights.shape) % 2, 1.0, -1.0)
  score_fn = lambda x: jnp.sum(signed * x, axis=(1, 2, 3))  # noqa: E731
  eps = 4 / 255
  got = pgd_attack(score_fn, images, eps)
  np.testing.assert_allclose(got, np.clip(images + eps * np.sign(signed), 0, 1), atol=1e-6)


def test_every_omnial_budget_one_compilation(toy):
  images, weights, center = toy
  attack = jax.jit(functools.partial(pgd_attack, _quadratic(weights, center)),
                   static_argnames=("steps", "direction"))
  clean = _quadratic_np(images, weights, center)
  for eps in OMNIAL_EPSILONS:
    up = np.asarray(attack(images, eps, steps=OMNIAL_STEPS, direction="ascend"))
    down = np.asarray(attack(images, eps, steps=OMNIAL_STEPS, direction="descend"))
    for adv in (up, down):
      assert np.all(np.abs(adv - images) <= eps + 1e-6)
      assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert np.all(_quadratic_np(up, weights, center) > clean)
    assert np.all(_quadratic_np(down, weights, center) < clean)
  assert attack._cache_size() == 2  # one per direction, none per epsilon
  assert PGDConfig().epsilons == (1 / 255, 2 / 255, 4 / 255, 8 / 255)
  assert PGDConfig().steps == 5


def test_sweep_matches_single_attacks(toy):
  images, weights, center = toy
  fn = _quadratic(weights, center)
  config = PGDConfig(epsilons=(1 / 255, 8 / 255))
  key = jax.random.key(5)
  swept = pgd_sweep(fn, images, config, direction="descend", key=key)
  assert len(swept) == 2
  for i, (eps, adv) in enumerate(zip(config.epsilons, swept)):
    ref = pgd_attack(fn, images, eps, steps=5, step_size=2.5 * eps / 5, direction="descend",
                     key=jax.random.fold_in(key, i))
    np.testing.assert_allclose(adv, ref, atol=1e-7)
  plain = pgd_sweep(fn, images, config.replace(random_start=False))
  np.testing.assert_allclose(plain[1], pgd_attack(fn, images, 8 / 255), atol=1e-7)
  with pytest.raises(ValueError, match=r"random_start is set .*pass a PRNG key"):
    pgd_sweep(fn, images, config)


def test_per_image_directions(toy):
  images, weights, center = toy
  labels = np.array([0, 1, 0])  # normal, anomalous, normal
  dirs = directions_from_labels(labels)
  np.testing.assert_array_equal(dirs, [1.0, -1.0, 1.0])
  adv = pgd_attack(_quadratic(weights, center), images, 8 / 255, direction=dirs)
  delta = _quadratic_np(np.asarray(adv), weights, center) - _quadratic_np(images, weights, center)
  assert delta[0] > 0 and delta[1] < 0 and delta[2] > 0


def test_random_start_is_seeded_and_stays_in_bounds(toy):
  images, weights, center = toy
  fn = _quadratic(weights, center)
  eps = 2 / 255
  # A small step (eps / 4) keeps the trace of the start: a full one lands on the ball's corner.
  attack = functools.partial(pgd_attack, fn, images, eps, steps=1, step_size=eps / 4)
  a = attack(key=jax.random.key(0))
  b = attack(key=jax.random.key(0))
  c = attack(key=jax.random.key(1))
  zero = attack()
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) and not np.array_equal(a, zero)
  for adv in (a, c):
    assert np.all(np.abs(np.asarray(adv) - images) <= eps + 1e-6)
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_jit_matches_no_jit(toy):
  images, weights, center = toy
  fn = _quadratic(weights, center)
  eager = pgd_attack(fn, images, 4 / 255, key=jax.random.key(3))
  jitted = jax.jit(lambda x, e, k: pgd_attack(fn, x, e, key=k))(images, 4 / 255,
                                                                  jax.random.key(3))
  np.testing.assert_allclose(eager, jitted, atol=1e-7)


def test_optax_pieces():
  grads = {"x": jnp.array([0.3, -2.0, 0.0])}
  tx = pgd_step(0.1)
  updates, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(updates["x"], [-0.1, 0.1, 0.0])
  clean = jnp.array([0.0, 0.5, 1.0])
  np.testing.assert_allclose(project_linf(jnp.array([-0.2, 0.9, 0.95]), clean, 0.1),
                             [0.0, 0.6, 0.95])
  assert isinstance(tx, optax.GradientTransformation)


def test_invalid_arguments_raise(toy):
  images, weights, center = toy
  fn = _quadratic(weights, center)
  with pytest.raises(ValueError, match=r"direction should be 'ascend', 'descend'.*'up'"):
    pgd_attack(fn, images, 0.01, direction="up")
  with pytest.raises(ValueError, match=r"direction array should have shape \(3,\).*\(2,\)"):
    pgd_attack(fn, images, 0.01, direction=np.ones(2))
  with pytest.raises(ValueError, match=r"epsilon should be >= 0.*-0.5"):
    pgd_attack(fn, images, -0.5)
  with pytest.raises(ValueError, match=r"images should have shape \(B, H, W, C\), got \(6, 5, 3\)"):
    pgd_attack(fn, images[0], 0.01)
  with pytest.raises(ValueError, match=r"steps should be a positive int, got 0"):
    pgd_attack(fn, images, 0.01, steps=0)
  with pytest.raises(ValueError, match=r"step_size should be >= 0 or None, got -1.0"):
    pgd_attack(fn, images, 0.01, step_size=-1.0)
  with pytest.raises(ValueError, match=r"values in \[0, 1\], got \[0, 255\].*1/255"):
    pgd_attack(fn, images * 255, 0.01)


_CONFIGS = {
    "mahaad": bl.MahaADConfig(),
    "padim": bl.PadimConfig(n_features=8),
    "patchcore": bl.PatchcoreConfig(coreset_ratio=0.5),
}


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_attack_through_a_baseline(name):
  """End to end: a fixed random "backbone" + a baseline, differentiated w.r.t. the image."""
  rng = np.random.default_rng(1)
  proj = {f"layer{i}": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for i in (1, 2, 3)}

  proj["layer4"] = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)

  def backbone(x):  # (B, 16, 16, 3) -> features at strides 2, 4, 8, 16 (MahaAD: every stage)
    feats = {}
    for i, stride in ((1, 2), (2, 4), (3, 8), (4, 16)):
      b, h, w, c = x.shape
      pooled = x.reshape(b, h // stride, stride, w // stride, stride, c).mean(axis=(2, 4))
      feats[f"layer{i}"] = jnp.tanh(pooled @ proj[f"layer{i}"])
    return feats

  base = rng.uniform(0.3, 0.7, size=(1, 16, 16, 3))
  train = np.clip(base + 0.05 * rng.normal(size=(20, 16, 16, 3)), 0, 1).astype(np.float32)
  method = bl.get_baseline(name)
  state = method.fit(backbone(train), _CONFIGS[name], jax.random.key(0))
  score_fn = lambda x: method.score(state, backbone(x), out_size=16)[0]  # noqa: E731
  normal = np.clip(base + 0.05 * rng.normal(size=(1, 16, 16, 3)), 0, 1).astype(np.float32)
  anomalous = normal.copy()
  anomalous[:, 4:8, 4:8] = 0.95
  images = np.concatenate([normal, anomalous])
  clean = np.asarray(score_fn(images))
  assert clean[1] > clean[0]
  adv = pgd_attack(score_fn, images, 8 / 255, direction=directions_from_labels([0, 1]),
                   key=jax.random.key(0))
  attacked = np.asarray(score_fn(adv))
  assert np.all(np.isfinite(attacked))
  assert attacked[0] > clean[0] and attacked[1] < clean[1]


# ---------------------------------------------------------------------------------------------
# Bounded maps, losses and metrics against NumPy / scikit-learn
# ---------------------------------------------------------------------------------------------


def test_bounded_map_and_bce_match_numpy():
  rng = np.random.default_rng(3)
  good = rng.gamma(2.0, 3.0, size=(4, 6, 6)).astype(np.float32)  # unbounded, skewed, > 0
  maps = np.concatenate([rng.gamma(2.0, 3.0, size=(2, 6, 6)), [np.full((6, 6), 80.0)]])
  maps = maps.astype(np.float32)  # the last map is far out: the sigmoid saturates
  stats = map_statistics(good)
  mu, sd = good.astype(np.float64).mean(), good.astype(np.float64).std()
  np.testing.assert_allclose([stats.mean, stats.std], [mu, sd], rtol=1e-6)
  z = (maps.astype(np.float64) - mu) / sd
  p = 1.0 / (1.0 + np.exp(-z))
  np.testing.assert_allclose(bounded_map(maps, stats), p, rtol=1e-5, atol=1e-7)
  masks = rng.uniform(size=maps.shape) < 0.3
  # BCE from the logits (log(1 - p) = -z - log(1 + e^-z)), stable where p rounds to 1.
  log_p, log_1mp = -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z)
  ref = -np.mean(masks * log_p + (~masks) * log_1mp, axis=(1, 2))
  got = np.asarray(pixel_bce(maps, masks, stats))
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  assert np.all(np.isfinite(got)) and got[2] > 10.0
  with pytest.raises(ValueError, match=r"anomaly maps are constant \(std 0\)"):
    map_statistics(np.ones((2, 4, 4)))
  with pytest.raises(ValueError, match=r"contain 1 non-finite value"):
    map_statistics(np.where(np.arange(16).reshape(1, 4, 4) == 3, np.nan, good[:1, :4, :4]))
  with pytest.raises(ValueError, match=r"at least one good image, got none"):
    map_statistics(np.zeros((0, 4, 4)))


def test_average_precision_matches_sklearn():
  rng = np.random.default_rng(4)
  labels = rng.uniform(size=500) < 0.2
  for scores in (rng.normal(size=500) + labels, np.round(rng.normal(size=500) + labels, 1)):
    assert average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), rel=1e-12)  # the second has many ties
  masks = rng.uniform(size=(3, 8, 8)) < 0.1
  maps = rng.normal(size=(3, 8, 8)) + 2 * masks
  assert pixel_average_precision(masks, maps) == pytest.approx(
      average_precision_score(masks.ravel(), maps.ravel()), rel=1e-12)
  with pytest.raises(ValueError, match=r"at least one positive label"):
    average_precision(np.zeros(4), np.arange(4.0))
  with pytest.raises(ValueError, match=r"masks should have the shape of the maps \(3, 8, 8\)"):
    pixel_average_precision(masks[:2], maps)


def test_calibrated_threshold():
  scores = np.random.default_rng(5).normal(size=50)
  assert calibrated_threshold(scores, 0.1) == pytest.approx(np.quantile(scores, 0.9))
  with pytest.raises(ValueError, match=r"fpr should be in \(0, 1\), got 0.0"):
    calibrated_threshold(scores, 0.0)
  with pytest.raises(ValueError, match=r"at least one good image"):
    calibrated_threshold([], 0.1)


# ---------------------------------------------------------------------------------------------
# The protocol on a tiny fitted model (fixed random "backbone" + PaDiM)
# ---------------------------------------------------------------------------------------------

_S = 16


def _toy_backbone(proj, x):
  """(B, 16, 16, 3) in [0, 1] -> {layer1..3} at strides 2, 4, 8 (a fixed random projection)."""
  feats = {}
  for i, stride in ((1, 2), (2, 4), (3, 8)):
    b, h, w, c = x.shape
    pooled = x.reshape(b, h // stride, stride, w // stride, stride, c).mean(axis=(2, 4))
    feats[f"layer{i}"] = jnp.tanh(pooled @ proj[f"layer{i}"] + jnp.sin(7.0 * pooled[..., :1]))
  return feats


def _toy_score(proj, state, x):
  """The `ImageScorer` of the tiny model: (maps (B, 16, 16), image scores (B,))."""
  scores, maps = bl.score_padim(state, _toy_backbone(proj, x), out_size=_S)
  return maps, scores


@pytest.fixture(scope="module")
def tiny():
  """(score_images as a Partial, held-out good images, test images, labels, masks)."""
  rng = np.random.default_rng(1)
  proj = {f"layer{i}": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for i in (1, 2, 3)}
  base = rng.uniform(0.3, 0.7, size=(1, _S, _S, 3))

  def good(n):
    return np.clip(base + 0.04 * rng.normal(size=(n, _S, _S, 3)), 0, 1).astype(np.float32)

  train, held_out, test = good(24), good(4), good(6)
  masks = np.zeros((6, _S, _S), bool)
  for i, (y, x) in zip(range(3, 6), ((2, 3), (8, 8), (5, 10))):
    test[i, y:y + 4, x:x + 4] = rng.uniform(0.85, 0.95, size=3)
    masks[i, y:y + 4, x:x + 4] = True
  labels = np.array([0, 0, 0, 1, 1, 1])
  state = bl.fit_padim(_toy_backbone(proj, train), bl.PadimConfig(n_features=8, sigma=1.0),
                       jax.random.key(0))
  return Partial(_toy_score, proj, state), held_out, test, labels, masks


def test_pixel_attack_raises_the_bounded_loss(tiny):
  score_images, held_out, test, labels, masks = tiny
  stats = map_statistics(score_in_batches(score_images, held_out)[0])
  maps, _ = score_images(jnp.asarray(test))
  clean = np.asarray(pixel_bce(maps, masks, stats))
  clean_rev = np.asarray(pixel_bce(maps, ~masks, stats))
  eps = 8 / 255
  adv = pixel_attack(score_images, test, masks, stats, eps, key=jax.random.key(0))
  assert np.all(np.abs(np.asarray(adv) - test) <= eps + 1e-6)
  assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
  attacked = np.asarray(pixel_bce(score_images(adv)[0], masks, stats))
  assert np.all(attacked > clean), (clean, attacked)  # every image, good and anomalous
  adv_t = pixel_attack(score_images, test, masks, stats, eps, targeted=True,
                       key=jax.random.key(0))
  towards = np.asarray(pixel_bce(score_images(adv_t)[0], ~masks, stats))
  assert np.all(towards < clean_rev), (clean_rev, towards)  # closer to the reversed mask
  with pytest.raises(ValueError, match=r"masks should have shape \(6, 16, 16\).*\(6, 8, 8\)"):
    pixel_attack(score_images, test, masks[:, :8, :8], stats, eps)


_SMALL_SUITE = AttackSuiteConfig(pixel_epsilons=(8 / 255,), targeted_epsilon=8 / 255,
                                 image_epsilons=(1 / 255, 4 / 255), fpr=0.25)


def test_one_sided_attacks_touch_one_side_only(tiny):
  score_images, held_out, test, labels, masks = tiny
  rows, details = attack_suite(score_images, held_out, test, labels, masks,
                               config=_SMALL_SUITE, key=jax.random.key(1), batch_size=4)
  clean = details["clean_scores"]
  good, bad = labels == 0, labels == 1
  assert metrics.image_auroc(labels, clean) > 0.9  # the tiny model separates the classes
  for eps in (1.0, 4.0):
    hide, alarm = details["scores"][("hide", eps)], details["scores"][("false-alarm", eps)]
    assert np.all(hide[bad] < clean[bad]) and np.array_equal(hide[good], clean[good])
    assert np.all(alarm[good] > clean[good]) and np.array_equal(alarm[bad], clean[bad])
  threshold = calibrated_threshold(score_in_batches(score_images, held_out)[1], 0.25)
  by = {(r["attack"], r["epsilon"]): r for r in rows}
  assert by[("none", 0.0)]["threshold"] == pytest.approx(threshold)
  hide4, alarm4 = details["scores"][("hide", 4.0)], details["scores"][("false-alarm", 4.0)]
  assert by[("hide", 4.0)]["detection_rate"] == np.mean(hide4[bad] > threshold)
  assert by[("false-alarm", 4.0)]["false_alarm_rate"] == np.mean(alarm4[good] > threshold)
  assert by[("hide", 4.0)]["image_auroc"] == pytest.approx(metrics.image_auroc(labels, hide4))
  # The pixel attacks raise the bounded loss against the true masks, on the pooled metrics too.
  assert by[("pixel", 8.0)]["pixel_bce"] > by[("none", 0.0)]["pixel_bce"]
  assert by[("pixel-targeted", 8.0)]["pixel_ap"] < by[("none", 0.0)]["pixel_ap"]
  assert sorted(by) == sorted([("none", 0.0), ("pixel", 8.0), ("pixel-targeted", 8.0),
                               ("hide", 1.0), ("hide", 4.0), ("false-alarm", 1.0),
                               ("false-alarm", 4.0)])


def test_zero_budget_gives_the_clean_metrics_exactly(tiny):
  score_images, held_out, test, labels, masks = tiny
  config = AttackSuiteConfig(pixel_epsilons=(0.0,), targeted_epsilon=0.0, image_epsilons=(0.0,),
                             fpr=0.25)
  rows, _ = attack_suite(score_images, held_out, test, labels, masks, config=config,
                         key=jax.random.key(2), batch_size=4)
  clean = rows[0]
  assert clean["attack"] == "none" and len(rows) == 5
  for row in rows[1:]:
    assert row["epsilon"] == 0.0
    for k, v in row.items():
      if k not in ("attack", "epsilon"):
        assert v == clean[k], (row["attack"], k, v, clean[k])  # exact, not approximate


def test_one_compilation_per_attack_kind(tiny):
  score_images, held_out, test, labels, masks = tiny
  config = AttackSuiteConfig(pixel_epsilons=(1 / 255, 2 / 255), targeted_epsilon=None,
                             image_epsilons=(1 / 255, 2 / 255), fpr=0.25)
  attack_suite(score_images, held_out, test, labels, masks, config=config,
               key=jax.random.key(3), batch_size=4)
  sizes = (adv_lib._pixel_jit._cache_size(), adv_lib._image_jit._cache_size())
  attack_suite(score_images, held_out, test, labels, masks,
               config=config.replace(pixel_epsilons=(3 / 255,), image_epsilons=(0.5 / 255,)),
               key=jax.random.key(4), batch_size=4)
  # New budgets, keys: no new trace (the fitted state is a traced argument of the Partial).
  assert (adv_lib._pixel_jit._cache_size(), adv_lib._image_jit._cache_size()) == sizes


def test_attack_suite_errors(tiny):
  score_images, held_out, test, labels, masks = tiny
  call = functools.partial(attack_suite, score_images, held_out, test)
  with pytest.raises(ValueError, match=r"random_start is set .*pass a PRNG key"):
    call(labels, masks)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"need good and anomalous ones; got 0 anomalous out of 6"):
    call(np.zeros(6, int), masks, key=key)
  with pytest.raises(ValueError, match=r"masks should have shape \(6, 16, 16\), got \(6, 8, 8\)"):
    call(labels, masks[:, :8, :8], key=key)
  with pytest.raises(ValueError, match=r"image_epsilons should be budgets >= 0.*-1"):
    call(labels, masks, key=key, config=AttackSuiteConfig(image_epsilons=(-1.0,)))
  with pytest.raises(ValueError, match=r"holdout should be in \(0, 1\).*got 1.5"):
    call(labels, masks, key=key, config=AttackSuiteConfig(holdout=1.5))
  with pytest.raises(ValueError, match=r"fpr should be in \(0, 1\), got 0.0"):
    call(labels, masks, key=key, config=AttackSuiteConfig(fpr=0.0))
  with pytest.raises(ValueError, match=r"steps should be a positive int, got 0"):
    call(labels, masks, key=key, config=AttackSuiteConfig(steps=0))
  with pytest.raises(ValueError, match=r"float images should have values in \[0, 1\]"):
    attack_suite(score_images, held_out * 255, test, labels, masks, key=key)
  with pytest.raises(ValueError, match=r"batch_size should be a positive int, got 0"):
    call(labels, masks, key=key, batch_size=0)
