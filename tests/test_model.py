"""GLAD(config) end to end on a tiny backbone: fit / score / calibrate / save / load, ablations, errors.

The module-scoped `fitted` model is never changed by a test: tests that calibrate work on `fitted.copy()`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glad_jax import checkpoint
from glad_jax.config import GLADConfig
from glad_jax.model import GLAD, prepare_images

from conftest import texture, with_defect


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(1)
  train = np.stack([texture(rng) for _ in range(12)])
  good = np.stack([texture(rng) for _ in range(4)])
  bad, masks = zip(*(with_defect(texture(rng), rng) for _ in range(4)))
  return train, good, np.stack(bad), np.stack(masks)


@pytest.fixture(scope="module")
def fitted(data):
  config = GLADConfig(backbone="resnet_tiny", image_size=64, n_components=4, max_iter=20)
  return GLAD(config).fit(data[0])


def test_fit_and_score_shapes_and_detection(fitted, data):
  _, good, bad, masks = data
  pred = fitted.score(np.concatenate([good, bad]))
  assert pred.image_scores.shape == (8,)
  assert pred.anomaly_maps.shape == (8, 64, 64)
  assert pred.image_labels is None and pred.pixel_masks is None
  # The pasted squares are anomalies: every defective image scores above every good one, and the map is
  # hotter inside the defect than outside.
  assert pred.image_scores[4:].min() > pred.image_scores[:4].max()
  maps = pred.anomaly_maps[4:]
  assert np.mean(maps[masks]) > np.mean(maps[~masks])
  for name, info in fitted.fit_info.items():
    assert 1 <= info.n_components <= 4
    assert info.mean_nnz is not None and 1 <= info.mean_nnz <= info.n_components


def test_score_equals_score_features(fitted, data):
  """The fused jitted path (backbone + scoring) equals validated scoring of separately extracted features."""
  _, good, bad, _ = data
  images = np.concatenate([good, bad])
  fast = fitted.score(images)
  slow = fitted.score_features(fitted.features(images))
  np.testing.assert_allclose(fast.image_scores, slow.image_scores, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(fast.anomaly_maps, slow.anomaly_maps, rtol=1e-5, atol=1e-4)


def test_batch_size_does_not_change_scores(fitted, data):
  _, good, bad, _ = data
  images = np.concatenate([good, bad])
  a = fitted.score(images, batch_size=3).image_scores
  b = fitted.score(images, batch_size=8).image_scores
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_save_load_round_trip_gives_identical_scores(fitted, data, tmp_path):
  _, good, bad, _ = data
  images = np.concatenate([good, bad])
  fitted = fitted.copy().calibrate(good, fpr=0.25)
  fitted.save(tmp_path / "ck")
  loaded = GLAD.load(tmp_path / "ck")
  assert loaded.config == fitted.config
  assert loaded.image_threshold == fitted.image_threshold
  assert loaded.pixel_threshold == fitted.pixel_threshold
  for name in fitted.layers:
    a, b = fitted.layers[name], loaded.layers[name]
    np.testing.assert_array_equal(np.asarray(a.mixture.cov_chol), np.asarray(b.mixture.cov_chol))
    np.testing.assert_array_equal(np.asarray(a.local.tile_log_weight), np.asarray(b.local.tile_log_weight))
    assert a.local.grid_shape == b.local.grid_shape
  p1, p2 = fitted.score(images), loaded.score(images)
  np.testing.assert_array_equal(p1.image_scores, p2.image_scores)
  np.testing.assert_array_equal(p1.anomaly_maps, p2.anomaly_maps)
  np.testing.assert_array_equal(p1.image_labels, p2.image_labels)
  assert loaded.fit_info[next(iter(loaded.fit_info))].n_iter >= 1


def test_calibrated_thresholds_hold_their_false_positive_rate(fitted, data):
  _, good, bad, _ = data
  assert fitted.image_threshold is None and fitted.pixel_threshold is None
  original = fitted
  fitted = fitted.copy().calibrate(good, fpr=0.25)
  assert original.image_threshold is None  # the shared fixture is left as it was
  pred = fitted.score(good)
  assert np.mean(pred.image_labels) <= 0.25 + 1e-9
  assert np.mean(pred.pixel_masks) <= 0.25 + 1e-3
  assert np.isclose(fitted.image_threshold, np.quantile(pred.image_scores, 0.75))
  with pytest.raises(ValueError, match=r"fpr must be in \(0, 1\)"):
    fitted.calibrate(good, fpr=0.0)


@pytest.mark.parametrize("changes", [dict(local=False), dict(algorithm="em"), dict(use_oas=False),
                                     dict(layers=("layer2",), mask="margin", max_samples=300)])
def test_ablations_fit_and_score(data, changes, tmp_path):
  config = GLADConfig(backbone="resnet_tiny", image_size=64, n_components=4, max_iter=10, **changes)
  model = GLAD(config).fit(data[0][:6])
  pred = model.score(data[2][:2])
  assert np.all(np.isfinite(pred.image_scores))
  if changes.get("local") is False:
    assert all(layer.local is None for layer in model.layers.values())
  if "mask" in changes:
    assert model.mask.shape == (64, 64) and not model.mask[0, 0] and model.mask[32, 32]
  if "max_samples" in changes:
    assert model.fit_info["layer2"].n_samples_global == 300 < model.fit_info["layer2"].n_samples
  model.save(tmp_path / "m")
  np.testing.assert_array_equal(GLAD.load(tmp_path / "m").score(data[2][:2]).image_scores, pred.image_scores)


def test_alignment_reference_is_kept_and_used(data, tmp_path):
  config = GLADConfig(backbone="resnet_tiny", image_size=64, n_components=4, max_iter=5, align="translation")
  model = GLAD(config).fit(data[0][:4])
  np.testing.assert_array_equal(model.reference, prepare_images(data[0][:1], 64)[0])
  model.save(tmp_path / "a")
  np.testing.assert_array_equal(GLAD.load(tmp_path / "a").reference, model.reference)
  assert np.all(np.isfinite(model.score(data[1][:2]).image_scores))


def test_images_of_other_sizes_and_channels_are_converted(fitted, data):
  rng = np.random.default_rng(5)
  gray_big = texture(rng, 96)[..., 0]
  rgba = np.concatenate([texture(rng, 64), np.full((64, 64, 1), 255, np.uint8)], axis=-1)
  pred = fitted.score([gray_big, rgba])
  assert pred.image_scores.shape == (2,)


def test_errors_are_clear(fitted, data, tmp_path):
  train = data[0]
  with pytest.raises(ValueError, match="not fitted"):
    GLAD(GLADConfig(backbone="resnet_tiny")).score(train[:1])
  with pytest.raises(ValueError, match="at least 2 training images"):
    GLAD(GLADConfig(backbone="resnet_tiny", image_size=64)).fit(train[:1])
  with pytest.raises(ValueError, match="no images given"):
    fitted.score([])
  with pytest.raises(ValueError, match="n_components must be >= 1"):
    GLAD(GLADConfig(n_components=0))
  with pytest.raises(ValueError, match="unknown motion model"):
    GLAD(GLADConfig(align="spline"))
  with pytest.raises(ValueError, match="NaN"):
    fitted.score(np.full((1, 64, 64, 3), np.nan, np.float32))
  feats = fitted.features(train[:1])
  feats["layer1"] = feats["layer1"][:, :8]
  with pytest.raises(ValueError, match=r"layer 'layer1': features have shape \(1, 8, 16, 8\)"):
    fitted.score_features(feats)
  with pytest.raises(checkpoint.CheckpointError, match="not found"):
    GLAD.load(tmp_path / "nothing")


def test_maps_are_returned_in_the_input_frame(data):
  """With alignment, maps computed in the reference frame are warped back onto the input images,
  inside the fused scoring function; its alignment matches the host-side `align.align`."""
  from glad_jax import align

  rng = np.random.default_rng(3)
  reference = texture(rng, 64)
  params = np.array([[1.5, -2.0, 0.02, 0.05], [-3.0, 1.0, -0.03, -0.02]], np.float32)
  moved = np.asarray(align.warp(np.stack([reference] * 2), align.invert_params(params, "similarity"),
                                "similarity"))
  aligner = align.Aligner(reference, "similarity")
  fused, motions = jax.jit(aligner)(jnp.asarray(moved))
  host = align.align(moved, "similarity", reference=reference)
  interior = (slice(None), slice(8, -8), slice(8, -8))
  assert np.abs(np.asarray(fused, int) - np.asarray(host.images, int))[interior].max() <= 1
  np.testing.assert_allclose(np.asarray(motions), align.params_to_matrix(np.asarray(host.params), "similarity"),
                             atol=2e-3)
  yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
  maps = np.stack([np.sin(xx / 9.0) + np.cos(yy / 7.0)] * 2)
  in_reference_frame = np.asarray(align.warp(maps, host.params, "similarity", order=1))
  back = np.asarray(aligner.unwarp(jnp.asarray(in_reference_frame), motions))
  np.testing.assert_allclose(back[interior], maps[interior], atol=0.05)
  assert GLAD(GLADConfig(backbone="resnet_tiny")).aligner() is None
  with pytest.raises(ValueError, match="no reference image"):
    GLAD(GLADConfig(backbone="resnet_tiny", align="similarity")).aligner()


def test_fit_reports_plan_and_global_done_events_and_fit_info(data):
  events = []
  config = GLADConfig(backbone="resnet_tiny", image_size=64, n_components=4, max_iter=5, layers=("layer1", "layer2"),
                      max_samples=500)
  model = GLAD(config).fit(data[0][:4], progress=lambda stage, info: events.append((stage, dict(info))))
  plans = [info for stage, info in events if stage == "plan"]
  dones = [info for stage, info in events if stage == "global_done"]
  # layer1: 4 images x 16 x 16 positions = 1024 vectors, capped at 500; layer2: 4 x 8 x 8 = 256, all used.
  assert [(p["layer"], p["n_vectors"], p["n_used"], p["reason"]) for p in plans] == [
      ("layer1", 1024, 500, "max_samples cap"), ("layer2", 256, 256, "all")]
  assert [d["layer"] for d in dones] == ["layer1", "layer2"]
  for d in dones:
    info = model.fit_info[d["layer"]]
    assert (d["n_components"], d["n_iter"], d["converged"]) == (info.n_components, info.n_iter, info.converged)
    assert d["seconds"] >= 0
  stages = [stage for stage, _ in events]
  # Each layer: plan, then its global iterations, then global_done, then the local fit.
  first = stages.index("plan")
  assert stages[first + 1] == "global" and stages.index("global_done") < stages.index("local")
  assert model.fit_info["layer1"].global_reason == "max_samples cap"
  assert model.fit_info["layer2"].global_reason == "all"


def test_state_is_the_whole_model(fitted, data, tmp_path):
  """A facade rebuilt from `model.state` alone scores identically; the score function of an old state is not
  changed by calibrating a copy (no compiled cache goes stale)."""
  from glad_jax.methods import GLADState

  _, good, bad, _ = data
  images = np.concatenate([good, bad])
  assert isinstance(fitted.state, GLADState) and fitted.state.config == fitted.config
  rebuilt = GLAD.from_state(fitted.state, extractor=fitted.extractor)
  np.testing.assert_array_equal(rebuilt.score(images).image_scores, fitted.score(images).image_scores)
  fn = fitted.score_fn()
  before = np.asarray(fn(images)[0])
  calibrated = fitted.copy().calibrate(good, fpr=0.25)
  assert np.isfinite(float(calibrated.state.image_threshold)) and np.isnan(float(fitted.state.image_threshold))
  np.testing.assert_array_equal(np.asarray(fn(images)[0]), before)
  np.testing.assert_array_equal(np.asarray(calibrated.score_fn()(images)[0]), before)
  with pytest.raises(TypeError, match="state must be a GLADState"):
    GLAD.from_state({"layers": {}})


def test_old_checkpoint_format_asks_to_refit(fitted, tmp_path):
  import json

  fitted.save(tmp_path / "ck")
  header = tmp_path / "ck" / "glad_checkpoint.json"
  meta = json.loads(header.read_text())
  meta["format_version"] = 1
  header.write_text(json.dumps(meta))
  with pytest.raises(checkpoint.CheckpointError) as e:
    GLAD.load(tmp_path / "ck")
  message = str(e.value)
  assert "format version 1" in message and "Refit the model" in message and "\n" not in message
