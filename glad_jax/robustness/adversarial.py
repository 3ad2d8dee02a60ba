"""PGD adversarial samples against anomaly detectors (OmniAL supp. Section 2).

Following OmniAL's protocol (after Madry et al.'s PGD): an adversarial sample is
A_adv = A + delta with ||delta||_inf <= epsilon, found by 5 projected sign-gradient steps

  omega^{t+1} = delta^t + alpha sgn(grad_delta D(f(A + delta^t), Y))       (OmniAL Eq. 3)
  delta^{t+1} = clip_{[-eps, eps] & [-A, 1 - A]}(omega^{t+1})              (OmniAL Eq. 4)

from delta^0 ~ Uniform(-eps, eps). OmniAL does not give alpha; the default is Madry et al.'s
2.5 eps / steps. The step is an optax transformation chain (sign of the gradient, then a scale)
applied to a loss that is minimised; the projection is `optax.projections.projection_box` onto
the intersection of the L-inf ball and [0, 1]. `pgd_maximise` is that loop for any per-image
objective; it returns, per image, the best point it visited (the clean image included), so an attack
never ends worse for the attacker than no attack. The attacks below only choose the objective D:

  pixel_attack         OmniAL's degradation: D = binary cross-entropy between the bounded anomaly
                       map and the ground-truth mask Y (eps in {1, 2, 4, 8}/255), or, targeted,
                       D = -BCE to the reversed mask 1 - Y (eps = 8/255).
  pgd_attack           D = +-image score: one-sided attacks that hide a defect (anomalous images,
                       score pushed down) or raise a false alarm (good images, pushed up).

Why a bounded map: the methods here output unbounded densities (negative log-likelihoods,
distances), and a loss on an unbounded output lets one pixel run off to infinity. As OmniAL's
segmentation networks output probabilities, the map is made one: ``sigmoid((map - mu) / sigma)``
with mu, sigma the mean and standard deviation of the maps of held-out good training images --
one rule for every method, no per-method branch (`map_statistics`, `bounded_map`).

Every attack is generic over a differentiable

  score_images(images float (B, S, S, 3) in [0, 1]) -> (maps (B, S, S), image_scores (B,))

(a registered method's score composed with the backbone). The host-side drivers (`attack_suite`)
jit one attack per kind and run it over padded chunks; pass `score_images` as a
`jax.tree_util.Partial` binding the backbone parameters and the fitted state, so they are traced
arguments rather than constants baked into each compilation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from glad_jax import metrics

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
  # The sign selects whether each image's score is pushed up or down.
  return pgd_maximise(lambda x: signs * score_fn(x), images, epsilon, steps=steps,
                      step_size=step_size, key=key)


def pgd_maximise(objective: Callable[[jax.Array], jax.Array], images: jax.Array,
                 epsilon: float | jax.Array, steps: int = OMNIAL_STEPS,
                 step_size: float | jax.Array | None = None,
                 key: jax.Array | None = None) -> jax.Array:
  """PGD (OmniAL supp. Eq. 3-4) raising a per-image objective; the loop every attack shares.

  Pure and traceable (epsilon, step_size and key may be traced); the arguments are not checked
  here (the public attacks check them).

  Args:
    objective: differentiable ``images (B, H, W, C) -> (B,)``, the degradation D of each image
      (images are independent: the gradient of the sum is each image's own gradient).
    images: array of shape (B, H, W, C), clean images in [0, 1].
    epsilon: L-inf budget; 0 returns `images` bit for bit (the projection box is a point).
    steps: PGD iterations (static).
    step_size: alpha; None = 2.5 * epsilon / steps.
    key: PRNG key of the random start delta ~ Uniform(-eps, eps); None starts from delta = 0.

  Returns:
    array of shape (B, H, W, C), within epsilon of `images` in L-inf and within [0, 1]: per image the
    point with the highest objective among the clean image, the (random) start and every iterate.
  """
  images = jnp.asarray(images, jnp.float32)
  epsilon = jnp.asarray(epsilon, jnp.float32)
  if step_size is None:
    step_size = _STEP_SIZE_FACTOR * epsilon / steps
  tx = pgd_step(step_size)

  def loss(x):  # optax minimises: the loss is -D; D per image comes back as the auxiliary value
    d = objective(x)
    return -jnp.sum(d), d

  value_and_grad = jax.value_and_grad(loss, has_aux=True)

  if key is None:
    x0 = images
  else:
    noise = jax.random.uniform(key, images.shape, jnp.float32, -1.0, 1.0) * epsilon
    x0 = project_linf(images + noise, images, epsilon)

  def keep_best(best_x, best_d, x, d):
    # Per image, the point with the highest degradation so far (best-iterate PGD, as AutoAttack): with
    # sign steps of eps / 2 the last iterate is a high-frequency pattern that density models score as
    # anomalous by itself, so a "hide" attack that stops there can end above where it started.
    better = d > best_d
    return jnp.where(better[:, None, None, None], x, best_x), jnp.where(better, d, best_d)

  def body(_, carry):
    x, opt_state, best_x, best_d = carry
    (_, d), grads = value_and_grad(x)
    best_x, best_d = keep_best(best_x, best_d, x, d)
    updates, opt_state = tx.update(grads, opt_state, x)
    x = project_linf(optax.apply_updates(x, updates), images, epsilon)
    return x, opt_state, best_x, best_d

  # The clean images are a candidate too: an attack never returns a worse point than no attack.
  clean_d = objective(images)
  x, _, best_x, best_d = jax.lax.fori_loop(0, steps, body, (x0, tx.init(x0), images, clean_d))
  best_x, _ = keep_best(best_x, best_d, x, objective(x))
  return best_x


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


# ------------------------------------------------------------------------------- bounded maps

ImageScorer = Callable[[jax.Array], tuple[jax.Array, jax.Array]]
"""``score_images(images (B, S, S, 3) float in [0, 1]) -> (maps (B, S, S), image_scores (B,))``."""


class MapStatistics(NamedTuple):
  """Location and spread of a method's anomaly-map values on good images (`map_statistics`).

  Attributes:
    mean: shape=(), float32: mean of every pixel of the good maps.
    std: shape=(), float32: their standard deviation (> 0).
  """

  mean: jax.Array
  std: jax.Array


def map_statistics(good_maps: jax.Array) -> MapStatistics:
  """Mean and standard deviation over all pixels of the maps of held-out good images.

  Args:
    good_maps: array of shape (G, S, S) (any shape: every value counts once), anomaly maps of
      good images the method was not fitted on.

  Returns:
    `MapStatistics` (population std, two-pass: centred before squaring).

  Raises:
    ValueError: (when concrete) on an empty array, non-finite values, or zero spread.
  """
  maps = jnp.asarray(good_maps, jnp.float32)
  if maps.size == 0:
    raise ValueError("map_statistics needs the maps of at least one good image, got none")
  mean = jnp.mean(maps)
  std = jnp.sqrt(jnp.mean(jnp.square(maps - mean)))
  if _is_concrete(maps):
    if not bool(jnp.all(jnp.isfinite(maps))):
      raise ValueError(f"the good images' anomaly maps contain "
                       f"{int(jnp.sum(~jnp.isfinite(maps)))} non-finite value(s)")
    if not float(std) > 0.0:
      raise ValueError("the good images' anomaly maps are constant (std 0): a bounded map "
                       "sigmoid((map - mean) / std) is undefined; check the fitted model")
  return MapStatistics(mean, std)


def standardised_map(maps: jax.Array, stats: MapStatistics) -> jax.Array:
  """(maps - mean) / std: the logits of `bounded_map`. Shape of `maps`."""
  return (jnp.asarray(maps, jnp.float32) - stats.mean) / stats.std


def bounded_map(maps: jax.Array, stats: MapStatistics) -> jax.Array:
  """A method's anomaly map as a per-pixel probability: sigmoid((maps - mean) / std).

  The same monotone rule for every method (so pixel AUROC / AP are unchanged), with the
  statistics of held-out good maps (`map_statistics`): 0.5 at the good images' mean value.

  Args:
    maps: array of shape (B, S, S), unbounded anomaly maps (higher = more anomalous).
    stats: from `map_statistics`.

  Returns:
    array of shape (B, S, S) with values in (0, 1).
  """
  return jax.nn.sigmoid(standardised_map(maps, stats))


def pixel_bce(maps: jax.Array, targets: jax.Array, stats: MapStatistics) -> jax.Array:
  """Per-image mean binary cross-entropy between the bounded map and a target mask.

  -mean_pixels [t log p + (1 - t) log(1 - p)], p = `bounded_map(maps, stats)`, computed from the
  logits (`optax.losses.sigmoid_binary_cross_entropy`), so it stays finite where p saturates.

  Args:
    maps: array of shape (B, S, S).
    targets: array of shape (B, S, S), 0 / 1 (or in [0, 1]).
    stats: from `map_statistics`.

  Returns:
    array of shape (B,).
  """
  logits = standardised_map(maps, stats)
  losses = optax.losses.sigmoid_binary_cross_entropy(logits, jnp.asarray(targets, jnp.float32))
  return jnp.mean(losses, axis=(1, 2))


# ------------------------------------------------------------------------------------ attacks


def pixel_attack(score_images: ImageScorer, images: jax.Array, masks: jax.Array,
                 stats: MapStatistics, epsilon: float | jax.Array, *, steps: int = OMNIAL_STEPS,
                 step_size: float | jax.Array | None = None, targeted: bool = False,
                 key: jax.Array | None = None) -> jax.Array:
  """OmniAL's pixel-level PGD: degrade the bounded anomaly map against the ground truth.

  Untargeted: maximise D = `pixel_bce(map, mask)` (OmniAL supp. Eq. 2, with its segmentation
  loss replaced by BCE on the bounded map). Targeted: drive the map towards the reversed mask,
  i.e. maximise D = -`pixel_bce(map, 1 - mask)` (OmniAL's "8 targeted").

  Pure and traceable (epsilon, step_size, key, stats may be traced; `steps`, `targeted` static).

  Args:
    score_images: see `ImageScorer`.
    images: array of shape (B, S, S, 3), clean images in [0, 1].
    masks: array of shape (B, S, S), ground truth (bool or 0 / 1; all 0 for a good image).
    stats: map statistics of held-out good images (`map_statistics`).
    epsilon: L-inf budget.
    steps: PGD iterations.
    step_size: alpha; None = 2.5 * epsilon / steps.
    targeted: attack towards 1 - mask instead of away from mask.
    key: PRNG key of the random start; None starts from delta = 0.

  Returns:
    array of shape (B, S, S, 3): the adversarial images.

  Raises:
    ValueError: as `pgd_attack`, or masks whose shape is not (B, S, S).
  """
  images, _ = _check_attack(images, epsilon, steps, step_size, "ascend")
  masks = jnp.asarray(masks, jnp.float32)
  if masks.shape != images.shape[:3]:
    raise ValueError(f"masks should have shape {images.shape[:3]} (one per image, at the image "
                     f"size), got {masks.shape}")
  if targeted:
    objective = lambda x: -pixel_bce(score_images(x)[0], 1.0 - masks, stats)  # noqa: E731
  else:
    objective = lambda x: pixel_bce(score_images(x)[0], masks, stats)  # noqa: E731
  return pgd_maximise(objective, images, epsilon, steps=steps, step_size=step_size, key=key)


def image_attack(score_images: ImageScorer, images: jax.Array, epsilon: float | jax.Array, *,
                 direction: str | jax.Array, steps: int = OMNIAL_STEPS,
                 step_size: float | jax.Array | None = None,
                 key: jax.Array | None = None) -> jax.Array:
  """`pgd_attack` on the image scores of a `score_images` function (maps ignored).

  "descend" on anomalous images hides the defect; "ascend" on good images raises a false alarm.
  """
  return pgd_attack(lambda x: score_images(x)[1], images, epsilon, steps=steps,
                    step_size=step_size, direction=direction, key=key)


# ------------------------------------------------------------------------ metrics, thresholds


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
  """Average precision, sum_k (R_k - R_{k-1}) P_k over distinct thresholds, descending.

  The definition of scikit-learn's ``average_precision_score`` (no interpolation; tied scores
  form one step).

  Args:
    labels: array of N values in {0, 1} (any shape, flattened).
    scores: array of the same size, higher = more likely positive.

  Raises:
    ValueError: when there is no positive label, or the sizes differ.
  """
  y = np.asarray(labels).ravel().astype(bool)
  s = np.asarray(scores).ravel()
  if y.shape != s.shape:
    raise ValueError(f"labels and scores should have the same size, got {y.size} and {s.size}")
  if not y.any():
    raise ValueError("average precision needs at least one positive label, got none")
  order = np.argsort(-s, kind="stable")
  s, y = s[order], y[order]
  last = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # end of each group of tied scores
  tp = np.cumsum(y, dtype=np.float64)[last]
  precision = tp / (last + 1.0)
  recall = tp / tp[-1]
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def pixel_average_precision(masks: np.ndarray, maps: np.ndarray) -> float:
  """Pixel AP (OmniAL Table 8) over all pixels pooled: masks and maps of shape (N, H, W)."""
  masks, maps = np.asarray(masks), np.asarray(maps)
  if masks.shape != maps.shape:
    raise ValueError(f"masks should have the shape of the maps {maps.shape}, got {masks.shape}")
  return average_precision(masks, maps)


def calibrated_threshold(good_scores: np.ndarray, fpr: float = 0.01) -> float:
  """Image threshold at a target false-positive rate: the (1 - fpr)-quantile of good scores.

  The rule of `GLAD.calibrate`, applied to every method; an image is flagged when its score is
  strictly above the threshold.
  """
  if not 0.0 < fpr < 1.0:
    raise ValueError(f"fpr should be in (0, 1), got {fpr}")
  scores = np.asarray(good_scores, np.float64).ravel()
  if scores.size == 0:
    raise ValueError("calibrated_threshold needs the scores of at least one good image")
  return float(np.quantile(scores, 1.0 - fpr))


# ----------------------------------------------------------------------- the protocol (host)

# One-sided image attacks: smaller budgets than OmniAL's, since one image-score step of 1/255
# already moves every image past every other (README, "PGD").
ONE_SIDED_EPSILONS = (0.25 / 255, 0.5 / 255, 1 / 255, 2 / 255, 4 / 255)
TARGETED_EPSILON = 8 / 255  # OmniAL's "epsilon = 8 targeted"


@dataclasses.dataclass(frozen=True)
class AttackSuiteConfig:
  """The robustness-to-attack protocol (`attack_suite`).

  Attributes:
    pixel_epsilons: budgets of the untargeted pixel attack (OmniAL: {1, 2, 4, 8}/255).
    targeted_epsilon: budget of the targeted pixel attack (OmniAL: 8/255); None skips it.
    image_epsilons: budgets of the one-sided "hide" and "false alarm" attacks.
    steps: PGD iterations (OmniAL: 5).
    step_size_factor: alpha = step_size_factor * epsilon / steps.
    random_start: start from delta ~ Uniform(-eps, eps) (OmniAL).
    fpr: false-positive rate of the calibrated image threshold on held-out good images.
    holdout: fraction of the good training images held out of the fit, for the map statistics
      and the threshold (used by `glad_jax.robustness.protocols`).
  """

  pixel_epsilons: tuple[float, ...] = OMNIAL_EPSILONS
  targeted_epsilon: float | None = TARGETED_EPSILON
  image_epsilons: tuple[float, ...] = ONE_SIDED_EPSILONS
  steps: int = OMNIAL_STEPS
  step_size_factor: float = _STEP_SIZE_FACTOR
  random_start: bool = True
  fpr: float = 0.01
  holdout: float = 0.2

  def replace(self, **changes) -> "AttackSuiteConfig":
    return dataclasses.replace(self, **changes)


def check_suite_config(config: AttackSuiteConfig) -> None:
  """Raises ValueError naming the first bad field of an `AttackSuiteConfig`."""
  if not isinstance(config, AttackSuiteConfig):
    raise ValueError(f"config should be an AttackSuiteConfig, got {type(config).__name__}")
  for field in ("pixel_epsilons", "image_epsilons"):
    values = tuple(getattr(config, field))
    if any(not np.isfinite(e) or e < 0 for e in values):
      raise ValueError(f"AttackSuiteConfig.{field} should be budgets >= 0 (e.g. 8/255), got "
                       f"{values}")
  if config.targeted_epsilon is not None and not config.targeted_epsilon >= 0:
    raise ValueError(f"AttackSuiteConfig.targeted_epsilon should be >= 0 or None, got "
                     f"{config.targeted_epsilon}")
  if (isinstance(config.steps, bool) or not isinstance(config.steps, (int, np.integer))
      or config.steps < 1):
    raise ValueError(f"AttackSuiteConfig.steps should be a positive int, got {config.steps!r}")
  if not config.step_size_factor >= 0:
    raise ValueError(f"AttackSuiteConfig.step_size_factor should be >= 0, got "
                     f"{config.step_size_factor}")
  if not 0.0 < config.fpr < 1.0:
    raise ValueError(f"AttackSuiteConfig.fpr should be in (0, 1), got {config.fpr}")
  if not 0.0 < config.holdout < 1.0:
    raise ValueError(f"AttackSuiteConfig.holdout should be in (0, 1) (a fraction of the "
                     f"training images), got {config.holdout}")


def as_unit_images(images: Any) -> np.ndarray:
  """uint8 images -> float32 / 255; float images checked to lie in [0, 1]. Shape (N, S, S, 3)."""
  x = np.asarray(images)
  if x.ndim != 4:
    raise ValueError(f"images should have shape (N, S, S, 3), got {x.shape}")
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 255.0
  x = x.astype(np.float32)
  if x.size and (x.min() < 0.0 or x.max() > 1.0):
    raise ValueError(f"float images should have values in [0, 1], got [{x.min():g}, "
                     f"{x.max():g}] (pass uint8 images or scale by 1/255)")
  return x


def _as_partial(score_images: ImageScorer) -> Partial:
  return score_images if isinstance(score_images, Partial) else Partial(score_images)


@jax.jit
def _score_jit(score_images, images):
  return score_images(images)


@functools.partial(jax.jit, static_argnames=("steps", "targeted"))
def _pixel_jit(score_images, images, masks, stats, epsilon, step_size, key, *, steps, targeted):
  return pixel_attack(score_images, images, masks, stats, epsilon, steps=steps,
                      step_size=step_size, targeted=targeted, key=key)


@functools.partial(jax.jit, static_argnames=("steps",))
def _image_jit(score_images, images, signs, epsilon, step_size, key, *, steps):
  return image_attack(score_images, images, epsilon, direction=signs, steps=steps,
                      step_size=step_size, key=key)


def _pad(x: np.ndarray, m: int) -> np.ndarray:
  """Pads the leading axis to m rows by repeating the last row (one compiled shape)."""
  return x if x.shape[0] == m else np.concatenate([x, np.repeat(x[-1:], m - x.shape[0], 0)])


def score_in_batches(score_images: ImageScorer, images: np.ndarray, batch_size: int = 8
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(maps (N, S, S), image scores (N,)) of images in [0, 1], in padded chunks of batch_size.

  The chunks depend only on N and batch_size, so two calls on bitwise equal images return
  bitwise equal outputs.
  """
  fn = _as_partial(score_images)
  n = images.shape[0]
  b = max(1, min(batch_size, n))
  maps, scores = [], []
  for start in range(0, n, b):
    m = min(b, n - start)
    out_maps, out_scores = _score_jit(fn, jnp.asarray(_pad(images[start:start + b], b)))
    maps.append(np.asarray(out_maps)[:m])
    scores.append(np.asarray(out_scores)[:m])
  return np.concatenate(maps), np.concatenate(scores)


def _attack_subset(run_chunk, images: np.ndarray, extras: tuple[np.ndarray, ...],
                   index: np.ndarray, batch_size: int, key) -> np.ndarray:
  """All of `images`, with the rows in `index` replaced by their attacked versions.

  `run_chunk(images, *extras, key)` attacks one padded chunk of the selected rows; chunk j uses
  the key fold_in(key, j). Rows outside `index` are the clean arrays, untouched.
  """
  out = images.copy()
  sel = images[index]
  sel_extras = tuple(e[index] for e in extras)
  n = sel.shape[0]
  b = max(1, min(batch_size, n))
  for j, start in enumerate(range(0, n, b)):
    m = min(b, n - start)
    k = None if key is None else jax.random.fold_in(key, j)
    chunk = [jnp.asarray(_pad(a[start:start + b], b)) for a in (sel, *sel_extras)]
    out[index[start:start + m]] = np.asarray(run_chunk(*chunk, k))[:m]
  return out


def _budget(eps: float) -> float:
  """A budget in 1/255 units, for row labels."""
  return float(round(eps * 255, 4))


def _pixel_metrics(masks: np.ndarray, maps: np.ndarray, stats: MapStatistics
                   ) -> dict[str, float | None]:
  """Pixel AP / AUROC on the raw maps (same ranking as the bounded ones, without the ties that
  float32 saturation of the sigmoid would add) and the mean BCE of the bounded maps."""
  bce = float(np.mean(np.asarray(pixel_bce(jnp.asarray(maps), jnp.asarray(masks), stats))))
  if not masks.any() or masks.all():
    return {"pixel_ap": None, "pixel_auroc": None, "pixel_bce": bce}
  return {"pixel_ap": pixel_average_precision(masks, maps),
          "pixel_auroc": float(metrics.pixel_auroc(masks, maps)), "pixel_bce": bce}


def attack_suite(score_images: ImageScorer, good_images: Any, images: Any, labels: Any,
                 masks: Any, has_mask: Any = None, *,
                 config: AttackSuiteConfig = AttackSuiteConfig(), key: jax.Array | None = None,
                 batch_size: int = 8) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Every attack of the protocol on one method, through its `score_images`.

  1. Held-out good images give the map statistics (`map_statistics`) and the calibrated image
     threshold (`calibrated_threshold` at `config.fpr`).
  2. Pixel attacks (OmniAL): every test image with a known mask is attacked (`pixel_attack`),
     untargeted at each `pixel_epsilons` budget and targeted at `targeted_epsilon`; pixel AP,
     pixel AUROC and the mean bounded BCE against the true masks.
  3. "hide": only the anomalous images are attacked, scores pushed down; image AUROC and the
     detection rate (fraction of anomalous images still above the threshold).
     "false-alarm": only the good images, pushed up; image AUROC and the false-alarm rate
     (fraction of good images above the threshold). The other images keep their clean scores.

  The attacked images are scored in the same chunks as the clean ones, so a budget of 0 gives
  exactly the clean metrics.

  Args:
    score_images: see `ImageScorer`; ideally a `jax.tree_util.Partial` (module docstring).
    good_images: (G, S, S, 3) uint8 or float in [0, 1], good images the method was NOT fitted on.
    images: (N, S, S, 3) test images, uint8 or float in [0, 1].
    labels: (N,) 0 good / 1 anomalous (both present).
    masks: (N, S, S) bool ground truth (all False for good images).
    has_mask: (N,) bool, which masks are known (None: all); only those images enter step 2.
    config: budgets, steps, step size, random start, fpr.
    key: PRNG key of the random starts (required when `config.random_start`).
    batch_size: images attacked / scored at once.

  Returns:
    (rows, details). rows: one dict per (attack, epsilon): 'attack' in {'none', 'pixel',
    'pixel-targeted', 'hide', 'false-alarm'}, 'epsilon' in 1/255 units, and the metrics of that
    attack ('none': all of them, and 'threshold'). details: 'stats', 'threshold', 'clean_scores',
    'scores' {(attack, epsilon): image scores (N,)} of the image attacks.

  Raises:
    ValueError: on bad shapes, labels without both classes, a bad config, or no key with
      `config.random_start`.
  """
  check_suite_config(config)
  if config.random_start and key is None:
    raise ValueError("AttackSuiteConfig.random_start is set (OmniAL starts from a random delta): "
                     "pass a PRNG key, or use random_start=False")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size should be a positive int, got {batch_size!r}")
  good = as_unit_images(good_images)
  x = as_unit_images(images)
  n = x.shape[0]
  labels = np.asarray(labels)
  if labels.shape != (n,) or not np.all((labels == 0) | (labels == 1)):
    raise ValueError(f"labels should be {n} values in {{0, 1}}, got shape {labels.shape}")
  if labels.all() or not labels.any():
    raise ValueError(f"the test images need good and anomalous ones; got {int(labels.sum())} "
                     f"anomalous out of {n}")
  masks = np.asarray(masks).astype(bool)
  if masks.shape != x.shape[:3]:
    raise ValueError(f"masks should have shape {x.shape[:3]}, got {masks.shape}")
  has_mask = np.ones(n, bool) if has_mask is None else np.asarray(has_mask, bool)
  if has_mask.shape != (n,):
    raise ValueError(f"has_mask should have shape ({n},), got {has_mask.shape}")
  fn = _as_partial(score_images)
  keys = [None] * 4 if not config.random_start else [jax.random.fold_in(key, i) for i in range(4)]

  good_maps, good_scores = score_in_batches(fn, good, batch_size)
  stats = map_statistics(good_maps)
  threshold = calibrated_threshold(good_scores, config.fpr)
  clean_maps, clean_scores = score_in_batches(fn, x, batch_size)
  px = np.flatnonzero(has_mask)
  bad, ok = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)

  def image_metrics(scores):
    return {"image_auroc": _image_auroc(labels, scores),
            "detection_rate": float(np.mean(scores[bad] > threshold)),
            "false_alarm_rate": float(np.mean(scores[ok] > threshold))}

  clean_row = {"attack": "none", "epsilon": 0.0, "threshold": threshold,
               **(_pixel_metrics(masks[px], clean_maps[px], stats) if px.size else {}),
               **image_metrics(clean_scores)}
  rows = [clean_row]
  scores_out: dict[tuple[str, float], np.ndarray] = {}

  def step(e):
    return jnp.float32(config.step_size_factor * e / config.steps)

  pixel_runs = [("pixel", e, False, i) for i, e in enumerate(config.pixel_epsilons)]
  if config.targeted_epsilon is not None:
    pixel_runs.append(("pixel-targeted", config.targeted_epsilon, True, 0))
  if px.size:
    for name, e, targeted, i in pixel_runs:
      k = keys[1 if not targeted else 2]
      k = None if k is None else jax.random.fold_in(k, i)
      run = lambda im, mk, kk, e=e, targeted=targeted: _pixel_jit(  # noqa: E731
          fn, im, mk, stats, jnp.float32(e), step(e), kk, steps=config.steps, targeted=targeted)
      adv = _attack_subset(run, x, (masks.astype(np.float32),), px, batch_size, k)
      maps, _ = score_in_batches(fn, adv, batch_size)
      rows.append({"attack": name, "epsilon": _budget(e),
                   **_pixel_metrics(masks[px], maps[px], stats)})

  for name, index, sign, metric in (("hide", bad, -1.0, "detection_rate"),
                                    ("false-alarm", ok, 1.0, "false_alarm_rate")):
    signs = np.full((n,), sign, np.float32)
    for i, e in enumerate(config.image_epsilons):
      k = keys[3 if sign > 0 else 0]
      k = None if k is None else jax.random.fold_in(k, i)
      run = lambda im, sg, kk, e=e: _image_jit(  # noqa: E731
          fn, im, sg, jnp.float32(e), step(e), kk, steps=config.steps)
      adv = _attack_subset(run, x, (signs,), index, batch_size, k)
      _, attacked = score_in_batches(fn, adv, batch_size)
      # The other images were not attacked: their inputs are the clean bits, so their scores are
      # the clean ones (taken from the clean pass, so the one-sidedness is exact by construction).
      scores = clean_scores.copy()
      scores[index] = attacked[index]
      scores_out[(name, _budget(e))] = scores
      m = image_metrics(scores)
      rows.append({"attack": name, "epsilon": _budget(e), "image_auroc": m["image_auroc"],
                   metric: m[metric]})
  details = {"stats": stats, "threshold": threshold, "clean_scores": clean_scores,
             "scores": scores_out}
  return rows, details


def _image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
  return float(metrics.image_auroc(labels, scores))
