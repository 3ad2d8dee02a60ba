"""PGD adversarial samples against an anomaly detector's image score (OmniAL supp. Section 2).

Following OmniAL's protocol (after Madry et al.'s PGD): an adversarial sample is
A_adv = A + delta with ||delta||_inf <= epsilon, found by 5 projected sign-gradient steps

  omega^{t+1} = delta^t + alpha sgn(grad_delta D(f(A + delta^t)))            (OmniAL Eq. 3)
  delta^{t+1} = clip_{[-eps, eps] & [-A, 1 - A]}(omega^{t+1})              (OmniAL Eq. 4)

from delta^0 ~ Uniform(-eps, eps), for eps in {1, 2, 4, 8} / 255. Here the degraded quantity D is
the detector's own image score: normal images are pushed up ("ascend": made to look anomalous)
and anomalous images pushed down ("descend": the anomaly is hidden), so both kinds of error of
the detector grow. OmniAL does not give alpha; the default is Madry et al.'s 2.5 eps / steps.

The step is an optax transformation chain (sign of the gradient, then a scale) applied to a loss
that is minimised, so it plugs into any optax-style loop; the projection is
`optax.projections.projection_box` onto the intersection of the L-inf ball and [0, 1].
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

# OmniAL supplement Section 2: perturbation budgets for images in [0, 1] and 5 PGD iterations.
OMNIAL_EPSILONS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
OMNIAL_STEPS = 5
# Madry et al. (2018): alpha = 2.5 eps / steps lets a step sequence reach the ball's boundary
# from anywhere inside it.
_STEP_SIZE_FACTOR = 2.5

ScoreFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class PGDConfig:
  """The adversarial protocol; defaults from OmniAL's supplement (Section 2).

  Attributes:
    epsilons: L-inf budgets, in units of the [0, 1] intensity range.
    steps: PGD iterations per sample.
    step_size_factor: alpha = step_size_factor * epsilon / steps.
    random_start: start from delta ~ Uniform(-eps, eps) (OmniAL) instead of delta = 0.
  """

  epsilons: tuple[float, ...] = OMNIAL_EPSILONS
  steps: int = OMNIAL_STEPS
  step_size_factor: float = _STEP_SIZE_FACTOR
  random_start: bool = True

  def replace(self, **changes) -> "PGDConfig":
    return dataclasses.replace(self, **changes)


def pgd_step(step_size: float | jax.Array) -> optax.GradientTransformation:
  """The update of one PGD step on a loss to minimise: ``-step_size * sign(grad)``.

  As an optax chain, ``optax.apply_updates(x, updates)`` performs the step of OmniAL Eq. 3 (with
  the loss = -D, a descent on the loss is an ascent on D).
  """
  return optax.chain(optax.scale_by_sign(), optax.scale(-step_size))


def project_linf(x: jax.Array, clean: jax.Array, epsilon: float | jax.Array) -> jax.Array:
  """Projection onto {x : ||x - clean||_inf <= epsilon, 0 <= x <= 1} (OmniAL Eq. 4).

  Both sets are boxes, so their intersection is the box [max(clean - eps, 0), min(clean + eps,
  1)] and the Euclidean projection onto it is a clip.
  """
  lower = jnp.maximum(clean - epsilon, 0.0)
  upper = jnp.minimum(clean + epsilon, 1.0)
  return optax.projections.projection_box(x, lower, upper)


def directions_from_labels(labels: jax.Array) -> jax.Array:
  """Per-image attack directions from ground truth: +1 (ascend) for normal images (label 0),
  -1 (descend) for anomalous ones (label 1). Array (B,) -> float32 array (B,)."""
  return jnp.where(jnp.asarray(labels) > 0, -1.0, 1.0).astype(jnp.float32)


def _direction_array(direction, batch: int) -> jax.Array:
  if isinstance(direction, str):
    if direction == "ascend":
      return jnp.ones((batch,), jnp.float32)
    if direction == "descend":
      return -jnp.ones((batch,), jnp.float32)
    raise ValueError(f"direction should be 'ascend', 'descend' or an array of shape ({batch},) "
                     f"of +1 / -1, got {direction!r}")
  shape = tuple(getattr(direction, "shape", np.shape(direction)))
  if shape not in ((), (batch,)):
    raise ValueError(f"direction array should have shape ({batch},) (one sign per image), got "
                     f"{shape}")
  return jnp.broadcast_to(jnp.sign(jnp.asarray(direction, jnp.float32)), (batch,))


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_attack(images, epsilon, steps, step_size, direction) -> tuple[jax.Array, jax.Array]:
  """Validates the attack's arguments (values only where they are concrete, i.e. not traced).

  Returns:
    (images as float32 (B, H, W, C), per-image signs (B,) of the direction).
  """
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4:
    raise ValueError(f"images should have shape (B, H, W, C), got {images.shape}")
  if _is_concrete(images):
    lo, hi = float(jnp.min(images)), float(jnp.max(images))
    if lo < 0.0 or hi > 1.0:
      raise ValueError(f"images should have values in [0, 1], got [{lo:g}, {hi:g}] (scale 8-bit "
                       f"images by 1/255 before the attack)")
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps should be a positive int, got {steps!r}")
  if _is_concrete(epsilon) and float(np.asarray(epsilon)) < 0:
    raise ValueError(f"epsilon should be >= 0 (an L-inf budget in [0, 1] units, e.g. 8/255), "
                     f"got {float(np.asarray(epsilon))}")
  if step_size is not None and _is_concrete(step_size) and float(np.asarray(step_size)) < 0:
    raise ValueError(f"step_size should be >= 0 or None, got {float(np.asarray(step_size))}")
  return images, _direction_array(direction, images.shape[0])


def pgd_attack(score_fn: ScoreFn, images: jax.Array, epsilon: float | jax.Array,
               steps: int = OMNIAL_STEPS, step_size: float | jax.Array | None = None,
               direction: str | jax.Array = "ascend",
               key: jax.Array | None = None) -> jax.Array:
  """Projected gradient (sign) attack on an image score, OmniAL supp. Eq. 2-4.

  Pure and traceable: wrap it in `jax.jit` with `score_fn` and `steps` bound (e.g. with
  `functools.partial`); epsilon, step_size, direction and key may be traced, so one compilation
  serves every epsilon.

  Args:
    score_fn: differentiable ``images (B, H, W, C) in [0, 1] -> scores (B,)``, higher = more
      anomalous (backbone + baseline or GLAD scorer, built by the caller).
    images: array of shape (B, H, W, C), clean images with values in [0, 1].
    epsilon: L-inf budget (e.g. 8 / 255).
    steps: number of PGD iterations (static; OmniAL: 5).
    step_size: alpha; None = 2.5 * epsilon / steps.
    direction: "ascend" (raise the scores: normal images made to look anomalous), "descend"
      (lower them: anomalies hidden), or an array of shape (B,) of +1 / -1 per image (see
      `directions_from_labels`).
    key: PRNG key of the random start delta ~ Uniform(-eps, eps); None starts from delta = 0.

  Returns:
    array of shape (B, H, W, C): the adversarial images, within epsilon of `images` in L-inf
    and within [0, 1].

  Raises:
    ValueError: on images that are not (B, H, W, C) or not in [0, 1] (checked when concrete), a
      negative epsilon or step size, `steps` < 1, or a bad direction.
  """
  images, signs = _check_attack(images, epsilon, steps, step_size, direction)
  epsilon = jnp.asarray(epsilon, jnp.float32)
  if step_size is None:
    step_size = _STEP_SIZE_FACTOR * epsilon / steps
  tx = pgd_step(step_size)

  def loss(x):
    scores = score_fn(x)
    # Images are independent, so the gradient of the sum is each image's own gradient; the sign
    # selects whether that image's score is pushed up or down.
    return -jnp.sum(signs * scores)

  grad_fn = jax.grad(loss)

  if key is None:
    x0 = images
  else:
    noise = jax.random.uniform(key, images.shape, jnp.float32, -1.0, 1.0) * epsilon
    x0 = project_linf(images + noise, images, epsilon)

  def body(_, carry):
    x, opt_state = carry
    updates, opt_state = tx.update(grad_fn(x), opt_state, x)
    x = project_linf(optax.apply_updates(x, updates), images, epsilon)
    return x, opt_state

  x, _ = jax.lax.fori_loop(0, steps, body, (x0, tx.init(x0)))
  return x


def pgd_sweep(score_fn: ScoreFn, images: jax.Array, config: PGDConfig = PGDConfig(),
              direction: str | jax.Array = "ascend",
              key: jax.Array | None = None) -> tuple[jax.Array, ...]:
  """Adversarial versions of `images` for every budget of `config` (OmniAL's protocol).

  One compilation serves all budgets (epsilon is traced). Budget i uses the random start key
  ``jax.random.fold_in(key, i)``.

  Args:
    score_fn: as in `pgd_attack`.
    images: array of shape (B, H, W, C) in [0, 1].
    config: budgets, steps, step-size rule and random start.
    direction: as in `pgd_attack`.
    key: PRNG key of the random starts; required when `config.random_start`.

  Returns:
    tuple with one array of shape (B, H, W, C) per entry of `config.epsilons`, in that order.

  Raises:
    ValueError: when `config.random_start` is set but no key is given, on a bad config, and as
      `pgd_attack`.
  """
  if config.random_start and key is None:
    raise ValueError("PGDConfig.random_start is set (OmniAL starts from a random delta): pass a "
                     "PRNG key, or use PGDConfig(random_start=False)")
  if any(e < 0 for e in config.epsilons):
    raise ValueError(f"PGDConfig.epsilons should all be >= 0, got {config.epsilons}")
  if config.step_size_factor < 0:
    raise ValueError(f"PGDConfig.step_size_factor should be >= 0, got "
                     f"{config.step_size_factor}")
  # Checked once here, eagerly: inside the jitted attack the values are traced.
  images, signs = _check_attack(images, max(config.epsilons, default=0.0), config.steps, None,
                                direction)
  attack = jax.jit(functools.partial(pgd_attack, score_fn, steps=config.steps))
  out = []
  for i, eps in enumerate(config.epsilons):
    start = jax.random.fold_in(key, i) if config.random_start else None
    out.append(attack(images, eps, step_size=config.step_size_factor * eps / config.steps,
                      direction=signs, key=start))
  return tuple(out)
