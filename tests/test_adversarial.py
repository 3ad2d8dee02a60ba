"""PGD (OmniAL supp. Section 2) on toy scores whose gradients are known in closed form."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glad_jax import baselines as bl
from glad_jax.robustness import (OMNIAL_EPSILONS, OMNIAL_STEPS, PGDConfig, directions_from_labels,
                                 pgd_attack, pgd_step, pgd_sweep, project_linf)

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

  def backbone(x):  # (B, 16, 16, 3) -> features at strides 2, 4, 8
    feats = {}
    for i, stride in ((1, 2), (2, 4), (3, 8)):
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
