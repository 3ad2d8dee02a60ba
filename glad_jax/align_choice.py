"""Alignment on or off, chosen from the training images alone (``align="auto"``, issue 16).

The paper aligns object images on a reference before extracting features (Section 4.1). Measured on our
development categories (`scripts/study_align.py`, README "Benchmark"), Euclidean alignment helps one object
category (tire: image AUROC 0.724 -> 0.812) and hurts the others, objects included (mpdd_metal_plate 0.995
-> 0.898), and the training images' misregistration does not tell them apart. ``align="auto"`` asks the
synthetic defects instead, on a probe fit much smaller than the real one:

1. the training images are split, seeded, into a probe-fit part (the reference, the first training image,
   and at most `PROBE_FIT_IMAGES` others) and a held-out part (a `HOLDOUT_FRACTION` share, at most
   `PROBE_HELD_IMAGES`);
2. seeded synthetic defects (`glad_jax.synthetic`, every kind, one copy per image) are pasted into the
   held-out images;
3. for each candidate motion model (``"none"`` first), the probe-fit images, the held-out images and their
   defective copies are aligned on the reference (unless "none"), a small GLAD (`PROBE_COMPONENTS`
   components, `PROBE_SAMPLES` vectors per layer, the configuration's radius rule, no mask) is fitted on the
   probe-fit part, and the image AUROC of held-out images against defective copies is measured;
4. a candidate replaces the current choice only when its AUROC is higher by more than `CHOICE_Z` standard
   errors of the paired difference (bootstrap over held-out images, each with its defective copies), the
   rule `radius="auto"` uses for the local radius: alignment changes every image, so it needs evidence.

Only training images are read: the same model results whatever the test folder holds. The rule is the
same for every category. It is not the default: on the benchmark's training splits it aligns tire (right by
the test split) and mpdd_metal_plate (wrong), README "Benchmark" gives the numbers.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from glad_jax import methods
from glad_jax import synthetic
from glad_jax.config import GLADConfig
from glad_jax.evaluation import batched
from glad_jax.methods import glad as glad_method
from glad_jax.methods.glad import RADIUS_CHOICE_Z

Progress = Callable[[str, Mapping[str, Any]], None]

AUTO = "auto"
CANDIDATES = ("none", "euclidean")  # what align="auto" chooses between; the first is kept without evidence
HOLDOUT_FRACTION = 0.2  # share of the training images held out for the synthetic defects
PROBE_HELD_IMAGES = 32  # at most this many held-out images (x 3 defect kinds = the positives)
PROBE_FIT_IMAGES = 96  # at most this many images (besides the reference) in the probe fit
MIN_HELD_IMAGES = 2  # fewer held-out images than this: no choice is made, alignment stays off
FEW_IMAGES_REASON = f"fewer than {MIN_HELD_IMAGES} held-out training images: no choice made"
PROBE_COMPONENTS = 300  # the probe GLAD's initial K
PROBE_SAMPLES = 50_000  # and its global fit's vectors per layer
BOOTSTRAP_SAMPLES = 2000
CHOICE_Z = RADIUS_CHOICE_Z  # standard errors a candidate must gain by: the local radius choice's rule


@dataclasses.dataclass(frozen=True)
class AlignChoice:
  """What ``align="auto"`` chose and why (stored with the model for `glad info`)."""

  chosen: str  # the motion model used ('none' or a `glad_jax.align` model)
  aurocs: dict[str, float]  # {candidate: synthetic-defect image AUROC of its probe fit}
  gains: dict[str, dict]  # {candidate: {"over": the candidate it was tested against, "gain", "se"}}
  n_fit: int  # training images in the probe fit (reference included)
  n_held: int  # held-out training images (negatives); positives: n_held x defect kinds
  seconds: float
  reason: str = "synthetic-defect AUROC"  # or why no choice was made

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def describe(self) -> str:
    """One line for reports: 'euclidean (align=auto: synthetic-defect AUROC none 0.8083, euclidean 0.8418; ...)'."""
    if not self.aurocs:
      return f"{self.chosen} ({self.reason})"
    # Candidates in CANDIDATES order (a checkpoint's JSON header sorts the keys).
    order = [m for m in CANDIDATES if m in self.aurocs] + sorted(m for m in self.aurocs if m not in CANDIDATES)
    scores = ", ".join(f"{m} {self.aurocs[m]:.4f}" for m in order)
    gains = "".join(f"; {m} over {g['over']}: {g['gain']:+.4f} +- {g['se']:.4f} (needs > {CHOICE_Z:g} SE)"
                    for m, g in self.gains.items())
    return (f"{self.chosen} (align=auto: {self.reason} {scores}{gains}; probe fit on {self.n_fit} training "
            f"images, {self.n_held} held out, {self.seconds:.0f} s)")


def probe_config(config: GLADConfig) -> GLADConfig:
  """The small GLAD each candidate is probed with: the user's backbone, layers and image score."""
  return config.replace(n_components=min(PROBE_COMPONENTS, config.n_components), max_samples=PROBE_SAMPLES,
                        align="none", mask="none")


def split_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(probe-fit indices, held-out indices) of n training images; index 0 (the reference) is always fitted."""
  order = np.random.default_rng([seed, 0xA11]).permutation(np.arange(1, n))
  n_held = min(PROBE_HELD_IMAGES, int(round(HOLDOUT_FRACTION * n)))
  held = np.sort(order[:n_held])
  fit = np.concatenate([[0], np.sort(order[n_held:n_held + PROBE_FIT_IMAGES])]).astype(int)
  return fit, held


def _probe_scores(fit_images: np.ndarray, held: np.ndarray, defective: np.ndarray, config: GLADConfig,
                  extractor, key: jax.Array, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Image scores (held-out images, defective copies) of a probe GLAD fitted on `fit_images`."""
  state = glad_method.fit(extractor(fit_images, batch_size=batch_size), config, key)
  # The registry's end-to-end scorer (images already aligned), padded batches: one compilation per probe.
  end_to_end = jax.jit(methods.images_fn(methods.get_method("glad"), extractor.apply, align=False))

  def scores(images):
    return batched(lambda chunk: end_to_end(extractor.params, state, chunk)[1], images, batch_size)

  return scores(held), scores(defective)


def pairwise_wins(clean: np.ndarray, defective: np.ndarray) -> np.ndarray:
  """W (n_kinds, n, n): W[k, i, j] = 1 if defective copy (k, i) outscores clean image j, 1/2 on a tie, else 0.

  `defective` holds n_kinds blocks of n copies, block k's i-th copy made from clean image i; the mean of W is the
  image AUROC (the Mann-Whitney statistic, as `glad_jax.metrics.auroc`)."""
  clean = np.asarray(clean, np.float64)
  d = np.asarray(defective, np.float64).reshape(-1, len(clean))
  return (d[:, :, None] > clean[None, None, :]) + 0.5 * (d[:, :, None] == clean[None, None, :])


def bootstrap_auroc_difference(wins_a: np.ndarray, wins_b: np.ndarray, *, n_boot: int = BOOTSTRAP_SAMPLES,
                               seed: int = 0) -> tuple[float, float]:
  """(AUROC_b - AUROC_a, its bootstrap standard error) for two models scoring the same images.

  The resampling unit is a held-out image together with its defective copies (they share content, so they are
  not independent samples); both models see the same resampled images (a paired difference)."""
  n = wins_a.shape[1]
  rng = np.random.default_rng([seed, 0xB007])
  counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)]).astype(np.float64)
  diff = wins_b - wins_a
  # A resample with image counts c: AUROC = sum_k c^T W_k c / (n_kinds n^2).
  per = np.einsum("bi,kij,bj->b", counts, diff, counts) / (diff.shape[0] * n * n)
  return float(diff.mean()), float(per.std(ddof=1))


def choose_alignment(images: np.ndarray, config: GLADConfig, extractor, *, batch_size: int = 16,
                     candidates: Sequence[str] = CANDIDATES, progress: Progress | None = None) -> AlignChoice:
  """The motion model ``align="auto"`` uses for these training images (module docstring).

  Args:
    images: the prepared training images (N, S, S, 3) uint8; images[0] is the alignment reference.
    config: the fit's `GLADConfig` (its backbone, layers, radius rule, quantile and seed are used).
    extractor: the fit's feature extractor (``extractor(images, batch_size=...) -> {layer: (N, h, w, d)}``).
    batch_size: backbone and alignment batch size.
    candidates: motion models to choose between, the default first ('none' or `glad_jax.align.MODELS`).
    progress: optional callback(stage, info), stage 'align_choice' with {'candidate', 'auroc'}.

  Returns:
    An `AlignChoice`.
  """
  from glad_jax.model import align_images

  t0 = time.perf_counter()
  images = np.asarray(images)
  candidates = tuple(candidates)
  fit_idx, held_idx = split_images(len(images), config.seed)
  if len(held_idx) < MIN_HELD_IMAGES:
    return AlignChoice(chosen=candidates[0], aurocs={}, gains={}, n_fit=len(fit_idx), n_held=len(held_idx),
                       seconds=time.perf_counter() - t0, reason=FEW_IMAGES_REASON)
  held = images[held_idx]
  defects = synthetic.defect_set(held, synthetic.KINDS, seed=config.seed)
  defective = np.concatenate([d[0] for d in defects.values()])
  reference = images[0]
  probe = probe_config(config)
  key = jax.random.PRNGKey(config.seed)
  wins = {}
  for model in candidates:
    sets = [images[fit_idx], held, defective]
    if model != "none":
      sets = [align_images(s, reference, model, batch_size=batch_size)[0] for s in sets]
    wins[model] = pairwise_wins(*_probe_scores(*sets, probe, extractor, key, batch_size))
    if progress is not None:
      progress("align_choice", {"candidate": model, "auroc": float(wins[model].mean())})
  aurocs = {m: float(w.mean()) for m, w in wins.items()}
  # Alignment changes every image: a candidate replaces the default only when it detects the synthetic
  # defects better by more than CHOICE_Z bootstrap standard errors (the rule of the local radius choice).
  chosen, gains = candidates[0], {}
  for model in candidates[1:]:
    gain, se = bootstrap_auroc_difference(wins[chosen], wins[model], seed=config.seed)
    gains[model] = {"over": chosen, "gain": gain, "se": se}
    if gain > CHOICE_Z * se:
      chosen = model
  return AlignChoice(chosen=chosen, aurocs=aurocs, gains=gains, n_fit=len(fit_idx), n_held=len(held_idx),
                     seconds=time.perf_counter() - t0)


__all__ = ["AUTO", "CANDIDATES", "AlignChoice", "bootstrap_auroc_difference", "choose_alignment", "pairwise_wins",
           "probe_config", "split_images"]
