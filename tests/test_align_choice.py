"""align='auto': the probe split, the paired AUROC statistics against SciPy, the rule, and the facade's record."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from glad_jax import align_choice as A
from glad_jax.config import GLADConfig

TINY = GLADConfig(backbone="resnet_tiny", image_size=64, n_components=4, max_iter=5, layers=("layer1", "layer2"))


def _auroc(clean, defective) -> float:
  """AUROC by SciPy's Mann-Whitney U (defective above clean)."""
  u = scipy.stats.mannwhitneyu(defective, clean, alternative="two-sided").statistic
  return float(u) / (len(clean) * len(defective))


def _stripes(n: int, seed: int, size: int = 64) -> np.ndarray:
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size]
  out = []
  for _ in range(n):
    img = 128 + 50 * np.sin(2 * np.pi * xx / 16) + rng.normal(0, 5, (size, size))
    out.append(np.clip(np.repeat(img[..., None], 3, -1), 0, 255).astype(np.uint8))
  return np.stack(out)


def test_split_keeps_the_reference_in_the_fit_and_holds_out_a_seeded_share():
  for n in (2, 10, 49, 400):
    fit, held = A.split_images(n, seed=0)
    assert fit[0] == 0 and 0 not in held
    assert not set(fit) & set(held) and set(fit) | set(held) <= set(range(n))
    assert len(held) == min(A.PROBE_HELD_IMAGES, round(A.HOLDOUT_FRACTION * n))
    assert len(fit) == min(n - len(held), A.PROBE_FIT_IMAGES + 1)
    again = A.split_images(n, seed=0)
    np.testing.assert_array_equal(again[0], fit)
    np.testing.assert_array_equal(again[1], held)
  assert not np.array_equal(A.split_images(400, seed=1)[1], A.split_images(400, seed=0)[1])


def test_pairwise_wins_average_to_scipys_mann_whitney_auroc_with_ties():
  rng = np.random.default_rng(0)
  clean = rng.normal(size=12).round(1)
  defective = (rng.normal(size=36) + 0.7).round(1)  # rounding makes ties
  wins = A.pairwise_wins(clean, defective)
  assert wins.shape == (3, 12, 12)
  assert wins.mean() == pytest.approx(_auroc(clean, defective), abs=1e-12)


def test_bootstrap_difference_equals_a_resampling_loop_with_scipy():
  rng = np.random.default_rng(1)
  n, kinds = 9, 3
  clean_a, clean_b = rng.normal(size=n), rng.normal(size=n)
  def_a, def_b = rng.normal(size=kinds * n) + 0.5, rng.normal(size=kinds * n) + 1.0
  wa, wb = A.pairwise_wins(clean_a, def_a), A.pairwise_wins(clean_b, def_b)
  gain, se = A.bootstrap_auroc_difference(wa, wb, n_boot=300, seed=4)
  assert gain == pytest.approx(_auroc(clean_b, def_b) - _auroc(clean_a, def_a), abs=1e-12)
  # The same resamples drawn by hand: a held-out image comes with its defective copies of every kind.
  draw = np.random.default_rng([4, 0xB007])
  diffs = []
  for _ in range(300):
    idx = draw.integers(0, n, n)
    pos = np.concatenate([k * n + idx for k in range(kinds)])
    diffs.append(_auroc(clean_b[idx], def_b[pos]) - _auroc(clean_a[idx], def_a[pos]))
  assert se == pytest.approx(np.std(diffs, ddof=1), rel=1e-9)


def _fake_probe(monkeypatch, scores_by_model):
  calls = []

  def probe(fit_images, held, defective, config, extractor, key, batch_size):
    model = "none" if len(calls) == 0 else "euclidean"
    calls.append((model, len(fit_images), len(held), len(defective), config))
    return scores_by_model[model]

  monkeypatch.setattr(A, "_probe_scores", probe)
  monkeypatch.setattr("glad_jax.model.align_images", lambda x, ref, model, batch_size=16: (x, None))
  return calls


def test_alignment_is_chosen_only_on_a_gain_beyond_two_standard_errors(monkeypatch):
  images = _stripes(40, seed=0)
  n_held = round(A.HOLDOUT_FRACTION * 40)
  rng = np.random.default_rng(2)
  clean = rng.normal(size=n_held)
  weak = np.concatenate([clean + 0.2 + rng.normal(0, 1, n_held) for _ in range(3)])
  strong = np.concatenate([clean + 5.0 for _ in range(3)])
  calls = _fake_probe(monkeypatch, {"none": (clean, weak), "euclidean": (clean, strong)})
  choice = A.choose_alignment(images, GLADConfig(), extractor=None)
  assert choice.chosen == "euclidean" and choice.aurocs["euclidean"] == 1.0
  g = choice.gains["euclidean"]
  assert g["over"] == "none" and g["gain"] > A.CHOICE_Z * g["se"] > 0
  # The probe: a small GLAD on the probe-fit images, the held-out images and 3 defect kinds of each.
  (_, n_fit, n_h, n_def, probe), _ = calls
  assert (n_fit, n_h, n_def) == (40 - n_held, n_held, 3 * n_held)
  assert probe.n_components == A.PROBE_COMPONENTS and probe.max_samples == A.PROBE_SAMPLES
  assert probe.align == "none" and probe.mask == "none" and probe.radius == GLADConfig().radius

  # A gain within the noise keeps the images as they are.
  slightly = weak + 0.05
  _fake_probe(monkeypatch, {"none": (clean, weak), "euclidean": (clean, slightly)})
  choice = A.choose_alignment(images, GLADConfig(), extractor=None)
  g = choice.gains["euclidean"]
  assert choice.chosen == "none" and 0 < g["gain"] <= A.CHOICE_Z * g["se"]
  assert "none" in choice.describe() and "euclidean" in choice.describe()


def test_too_few_images_make_no_choice():
  choice = A.choose_alignment(_stripes(3, seed=0), TINY, extractor=None)
  assert choice.chosen == "none" and choice.aurocs == {} and choice.reason == A.FEW_IMAGES_REASON


def test_glad_fit_resolves_auto_keeps_the_record_and_saves_it(tmp_path):
  from glad_jax.model import GLAD

  images = _stripes(12, seed=3)
  model = GLAD(TINY.replace(align="auto")).fit(images)
  choice = model.align_choice
  assert choice is not None and set(choice.aurocs) == {"none", "euclidean"}
  assert model.config.align == choice.chosen == model.state.config.align
  assert (model.reference is not None) == (choice.chosen != "none")
  loaded = GLAD.load(model.save(tmp_path / "ck"))
  assert loaded.align_choice == choice and loaded.config == model.config
  # A refit of the same facade chooses anew from the configuration it was given ('auto', not the choice).
  assert model.fit(images[::-1]).align_choice is not None


def test_auto_on_given_features_is_stored_as_no_alignment():
  from glad_jax.model import GLAD

  images = _stripes(4, seed=5)
  model = GLAD(TINY.replace(align="auto"))
  with pytest.raises(ValueError, match="align='auto' is chosen from the training images"):
    model.features(images)
  model = GLAD(TINY.replace(align="none"))
  feats = model.features(images)
  auto = GLAD(TINY.replace(align="auto")).fit_features(feats)
  assert auto.config.align == auto.state.config.align == "none" and auto.align_choice is None
  assert not auto.state.aligns
  with pytest.raises(ValueError, match="align='auto' with a reference"):
    GLAD(TINY.replace(align="auto")).fit_features(feats, reference=images[0])


def test_protocols_resolve_auto_before_featurizing(monkeypatch):
  from glad_jax.robustness import protocols as P

  method = P.variant("glad", TINY.replace(align="auto"))
  fixed, none = P.resolve_align(P.variant("glad", TINY), _stripes(10, seed=0), extractor=None)
  assert none is None and fixed.align == "none"
  seen = []

  def choose(images, config, extractor, **kw):
    seen.append(len(images))
    return A.AlignChoice(chosen="euclidean", aurocs={}, gains={}, n_fit=1, n_held=0, seconds=0.0)

  monkeypatch.setattr(A, "choose_alignment", choose)
  resolved, choice = P.resolve_align(method, _stripes(10, seed=0), extractor=None)
  assert seen == [10] and choice.chosen == "euclidean"
  assert resolved.align == "euclidean" and resolved.config.align == "euclidean" and resolved.name == method.name
