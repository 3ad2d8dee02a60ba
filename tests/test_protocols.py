"""Comparison / robustness protocols on tiny synthetic data with the tiny test backbone.

References are independent: scikit-learn's roc_auc_score for every AUROC, the baselines' own
fit/score API on features computed directly by the extractor, GLAD's own `score` path.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from glad_jax.baselines import MahaADConfig, fit_mahaad, score_mahaad
from glad_jax.config import GLADConfig
from glad_jax.data.mvtec import ImageBatch
from glad_jax.robustness import protocols as P
from glad_jax.robustness.adversarial import PGDConfig

S = 64
# One layer, K = 4 and a sample cap keep the number of distinct compiled shapes small.
CFG = GLADConfig(backbone="resnet_tiny", weights="random", layers=("layer2",), image_size=S,
                 n_components=4, max_iter=10, local_max_iter=10, max_samples=256)


def synthetic(rng, n, anomalous=False):
  """Vertical stripes + noise; anomalies: a faint square with its mask."""
  xx = np.mgrid[:S, :S][1]
  base = (128 + 50 * np.sin(xx / 4.0))[..., None]
  images = np.clip(base[None] + rng.normal(0, 14, (n, S, S, 3)), 0, 255)
  masks = np.zeros((n, S, S), bool)
  if anomalous:
    for i in range(n):
      r, c = rng.integers(4, S - 16, 2)
      side = int(rng.integers(5, 10))
      images[i, r:r + side, c:c + side] += 45
      masks[i, r:r + side, c:c + side] = True
  return np.clip(images, 0, 255).astype(np.uint8), masks


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  train, _ = synthetic(rng, 8)
  good, good_masks = synthetic(rng, 6)
  bad, bad_masks = synthetic(rng, 6, anomalous=True)
  labels = np.array([0] * 6 + [1] * 6, np.int32)
  test = ImageBatch(np.concatenate([good, bad]), np.concatenate([good_masks, bad_masks]),
                    np.ones(12, bool), labels, ("good",) * 6 + ("square",) * 6,
                    tuple(f"img{i}" for i in range(12)))
  return train, test


@pytest.fixture(scope="module")
def methods():
  return P.select_methods(CFG, ["glad", "mahaad", "padim"])


@pytest.fixture(scope="module")
def extractor(methods):
  return P.make_extractor(CFG, methods)


@pytest.fixture(scope="module")
def standard(methods, extractor, data):
  return P.run_standard(methods, *data, extractor=extractor, keep_fitted=True)


# ------------------------------------------------------------------------------------------ methods


def test_method_registry_follows_table_1():
  cfg = GLADConfig()
  names = [m.name for m in P.default_methods(cfg)]
  assert names == ["glad", "glad-global", "glad-em", "glad-no-oas", "glad-layer1+layer2",
                   "glad-layer1+layer3", "glad-layer2+layer3", "mahaad", "padim", "patchcore"]
  by_name = {m.name: m for m in P.default_methods(cfg)}
  changed = lambda m: {f.name for f in dataclasses.fields(cfg)  # noqa: E731
                       if getattr(m.glad, f.name) != getattr(cfg, f.name)}
  assert changed(by_name["glad-global"]) == {"local"} and not by_name["glad-global"].glad.local
  assert changed(by_name["glad-em"]) == {"algorithm"}
  assert changed(by_name["glad-no-oas"]) == {"use_oas"}
  assert by_name["glad-layer2+layer3"].layers == ("layer2", "layer3")
  assert by_name["patchcore"].layers == ("layer2", "layer3")  # PatchCore's paper layers
  assert by_name["padim"].layers == by_name["mahaad"].layers == cfg.layers
  # A one-layer config has no layer-subset ablation; a global-only one no 'glad-global'.
  one = [m.name for m in P.glad_ablations(CFG.replace(local=False))]
  assert one == ["glad-em", "glad-no-oas"]
  with pytest.raises(ValueError, match=r"unknown method\(s\) \['glad-xl'\]; known: glad, "):
    P.select_methods(cfg, ["glad", "glad-xl"])
  with pytest.raises(ValueError, match="more than once"):
    P.select_methods(cfg, ["glad", "glad"])


def test_methods_must_share_the_extractor(data, extractor):
  other = P.glad_method(CFG.replace(image_size=96))
  with pytest.raises(ValueError, match="is configured for backbone 'resnet_tiny' at 96 px but the "
                                       "shared extractor is 'resnet_tiny' at 64 px"):
    P.run_standard([other], *data, extractor=extractor)
  with pytest.raises(ValueError, match="baseline_config must be a PadimConfig, got NoneType"):
    P.run_standard([P.Method("padim", baseline="padim")], *data, extractor=extractor)
  deep = P.glad_method(CFG.replace(layers=("layer3",)))
  with pytest.raises(ValueError, match=r"uses layer\(s\) \['layer3'\] that the shared extractor"):
    P.run_standard([deep], *data, extractor=extractor)


def test_protocol_inputs_are_validated(data, methods, extractor):
  train, test = data
  only_good = dataclasses.replace(test, labels=np.zeros(12, np.int32))
  with pytest.raises(ValueError, match="needs good and anomalous images; it has 0 anomalous out "
                                       "of 12"):
    P.run_standard(methods, train, only_good, extractor=extractor)
  with pytest.raises(ValueError, match="at least 2 images, got 1"):
    P.run_standard(methods, train[:1], test, extractor=extractor)
  with pytest.raises(ValueError, match="n_versions must be a positive integer, got 0"):
    P.run_rd(methods, train, test, extractor=extractor, n_versions=0)
  with pytest.raises(ValueError, match=r"sizes must be non-negative integers, got \(-1,\)"):
    P.run_contamination(methods, train, test, extractor=extractor, sizes=(-1,))
  with pytest.raises(ValueError, match=r"PGDConfig.epsilons must be a non-empty tuple"):
    P.run_adversarial(methods, train, test, extractor=extractor, pgd=PGDConfig(epsilons=()))
  with pytest.raises(ValueError, match="ImageBatch"):
    P.run_standard(methods, train, test.images, extractor=extractor)


# ----------------------------------------------------------------------------------------- standard


def test_standard_rows_and_failed_method(data, methods, extractor, standard):
  train, test = data
  assert [r["method"] for r in standard.rows] == [m.name for m in methods]
  for r in standard.rows:
    scores = standard.details["scores"][r["method"]]
    assert r["image_auroc"] == pytest.approx(roc_auc_score(test.labels, scores), abs=1e-9)
    assert 0.0 <= r["pixel_auroc"] <= 1.0 and 0.0 <= r["aupro"] <= 1.0
    assert r["fit_s"] > 0 and r["inference_ms"] > 0 and r["size_mb"] > 0
    assert (r["n_train"], r["n_test"]) == (8, 12)
  # MahaAD's size: mean (d,), precision factor (d, d), shrinkage (), float32, d = 16 channels.
  assert standard.row("mahaad")["size_mb"] == pytest.approx(4 * (16 + 16 * 16 + 1) / 1e6)
  # A method that cannot be fitted (sample covariance, N = 8 < d = 16) is reported, not fatal.
  broken = P.Method("mahaad-raw", baseline="mahaad",
                    baseline_config=MahaADConfig(layers=("layer2",), shrinkage=False))
  res = P.run_standard([broken, methods[1]], train, test, extractor=extractor)
  assert "not positive definite" in res.row("mahaad-raw")["error"]
  assert res.row("mahaad")["image_auroc"] == pytest.approx(standard.row("mahaad")["image_auroc"])


def test_glad_end_to_end_matches_glad_own_scoring(data, standard):
  # The end-to-end function points padding tiles at position 0 (for finite gradients): the
  # scores must not change. Reference: GLAD.score_features on the extractor's features.
  train, test = data
  fitted = standard.details["fitted"]["glad"]
  assert any(int(layer.local.n_tiles) * layer.local.tile_size > np.count_nonzero(
      np.isfinite(np.asarray(layer.local.tile_log_weight)))
      for layer in fitted.model.layer_models().values())  # there is padding to get wrong
  ref = fitted.model.score_features(fitted.model.extractor(test.images))
  scores, maps = fitted.jitted(fitted.params, fitted.state, jnp.asarray(test.images))
  np.testing.assert_allclose(scores, ref.image_scores, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(maps, ref.anomaly_maps, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------- Rd-


def test_rd_runs_n_versions_and_differences_match(data, methods, extractor, standard):
  train, test = data
  res = P.run_rd(methods[:2], train, test, extractor=extractor, n_versions=2, clean=standard)
  assert sorted(res.details["scores"]) == [0, 1, 2]
  for r in res.rows:
    name = r["method"]
    per = [roc_auc_score(test.labels, res.details["scores"][v][name]) for v in (1, 2)]
    assert [r["rd_v1"], r["rd_v2"]] == pytest.approx(per, abs=1e-9)
    assert r["normal_auroc"] == pytest.approx(standard.row(name)["image_auroc"], abs=1e-9)
    assert r["rd_auroc"] == pytest.approx(np.mean(per), abs=1e-9)
    assert r["rd_diff"] == pytest.approx(r["normal_auroc"] - np.mean(per), abs=1e-9)
    # Each version is its own randomisation of train and test.
    s0, s1, s2 = (res.details["scores"][v][name] for v in (0, 1, 2))
    assert not np.allclose(s1, s2) and not np.allclose(s0, s1)


# ------------------------------------------------------------------------------------ contamination


def test_contamination_split_moves_seeded_anomalous_images():
  labels = np.array([0, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0])  # 7 anomalous
  moved, kept = P.contamination_split(labels, 4, seed=3)
  assert len(moved) == 4 and np.all(labels[moved] == 1)
  assert np.intersect1d(moved, kept).size == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([moved, kept])), np.arange(12))
  np.testing.assert_array_equal(moved, P.contamination_split(labels, 4, seed=3)[0])
  assert any(not np.array_equal(moved, P.contamination_split(labels, 4, seed=s)[0])
             for s in range(4, 10))
  # As many as the category allows, keeping min_test_anomalous to test on.
  assert len(P.contamination_split(labels, 40)[0]) == 6
  assert len(P.contamination_split(labels, 40, min_test_anomalous=3)[0]) == 4
  assert len(P.contamination_split(labels, 0)[0]) == 0


def test_contaminated_training_really_uses_the_moved_images(data, methods, extractor, standard):
  train, test = data
  maha = methods[1]
  res = P.run_contamination([maha], train, test, extractor=extractor, sizes=(2, 40), seed=1,
                            clean=standard)
  r2, r40 = res.rows
  assert (r2["n_moved"], r2["n_train"], r2["n_test"], r2["n_test_anomalous"]) == (2, 10, 10, 4)
  assert (r40["n_moved"], r40["n_train"], r40["n_test"], r40["n_test_anomalous"]) == (5, 13, 7, 1)
  for n, r in ((2, r2), (40, r40)):
    moved, kept = res.details["moved"][n], res.details["kept"][n]
    assert np.intersect1d(moved, kept).size == 0 and np.all(test.labels[moved] == 1)
    # Independent recomputation: MahaAD fitted directly on train + moved images' features.
    feats = lambda x: extractor(x)["layer2"]  # noqa: E731
    state = fit_mahaad({"layer2": feats(np.concatenate([train, test.images[moved]]))},
                       maha.baseline_config)
    scores = np.asarray(score_mahaad(state, {"layer2": feats(test.images[kept])}, out_size=S)[0])
    np.testing.assert_allclose(res.details["scores"][n]["mahaad"], scores, rtol=1e-5, atol=1e-5)
    assert r["contaminated_auroc"] == pytest.approx(roc_auc_score(test.labels[kept], scores),
                                                    abs=1e-6)
    clean = standard.details["scores"]["mahaad"][kept]
    assert r["clean_auroc"] == pytest.approx(roc_auc_score(test.labels[kept], clean), abs=1e-9)
    assert r["drop"] == pytest.approx(r["clean_auroc"] - r["contaminated_auroc"], abs=1e-12)


# -------------------------------------------------------------------------------------- adversarial


def test_pgd_through_backbone_and_scorer_raises_normal_scores(data, methods, extractor, standard):
  train, test = data
  eps = 2 / 255
  # No random start: from the clean image, any change is the gradient's doing.
  pgd = PGDConfig(epsilons=(eps,), steps=2, random_start=False)
  chosen = methods[:2]  # GLAD (sparse local scoring, quantile score) and MahaAD
  res = P.run_adversarial(chosen, train, test, extractor=extractor, pgd=pgd,
                          fitted=standard.details["fitted"], batch_size=8)
  normal = test.labels == 0
  x = test.images.astype(np.float32) / 255.0
  noise = np.clip(x + eps * np.sign(np.random.default_rng(1).uniform(-1, 1, x.shape)), 0, 1)
  for m in chosen:
    fitted = standard.details["fitted"][m.name]
    clean = res.details["clean"][m.name]
    attacked = res.details["attacked"][m.name][eps]
    np.testing.assert_allclose(clean, standard.details["scores"][m.name], rtol=1e-4, atol=1e-3)
    assert np.all(np.isfinite(attacked))  # gradients through the sparse scoring are finite
    # Control: random signs of the same budget barely move the scores; PGD raises every normal
    # image's score far more. (Anomalous images are pushed down, but on this random-weight
    # backbone one sign step overshoots the minimum, so their scores are not checked.)
    control = np.asarray(fitted.jitted(fitted.params, fitted.state, jnp.asarray(noise))[0])
    gain, noise_gain = (attacked - clean)[normal], np.abs(control - clean)[normal]
    assert gain.min() > 5 * noise_gain.max(), (m.name, gain, noise_gain)
    row = res.row(m.name)
    assert row["clean_auroc"] == pytest.approx(roc_auc_score(test.labels, clean))
    assert row["auroc_eps2"] == pytest.approx(roc_auc_score(test.labels, attacked))
    assert row["drop"] == pytest.approx(row["clean_auroc"] - row["auroc_eps2"])
