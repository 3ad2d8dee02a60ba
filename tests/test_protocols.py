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
from glad_jax.model import GLAD
from glad_jax.robustness import protocols as P
from glad_jax.robustness.adversarial import AttackSuiteConfig

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
                       if getattr(m.config, f.name) != getattr(cfg, f.name)}
  assert all(by_name[n].method == "glad" for n in names if n.startswith("glad"))
  assert changed(by_name["glad-global"]) == {"local"} and not by_name["glad-global"].config.local
  assert changed(by_name["glad-em"]) == {"algorithm"}
  assert changed(by_name["glad-no-oas"]) == {"use_oas"}
  assert by_name["glad-layer2+layer3"].layers == ("layer2", "layer3")
  assert by_name["patchcore"].layers == ("layer2", "layer3")  # PatchCore's paper layers
  assert by_name["padim"].layers == cfg.layers
  # MahaAD as its paper defines it: every stage of the backbone, not GLAD's layers.
  assert by_name["mahaad"].layers == ("layer1", "layer2", "layer3", "layer4")
  # A one-layer config has no layer-subset ablation; a global-only one no 'glad-global'.
  one = [m.name for m in P.method_variants("glad", CFG.replace(local=False))]
  assert one == ["glad-em", "glad-no-oas"]
  with pytest.raises(ValueError, match=r"unknown method\(s\) \['glad-xl'\]; known: glad, "):
    P.select_methods(cfg, ["glad", "glad-xl"])
  with pytest.raises(ValueError, match="more than once"):
    P.select_methods(cfg, ["glad", "glad"])


def test_a_registered_method_joins_every_comparison(monkeypatch):
  """The protocols iterate the registry: registering a method adds its row (and compare.py's name)."""
  from glad_jax import methods

  monkeypatch.setitem(methods._REGISTRY, "mahaad-copy", methods.get_method("mahaad")._replace(name="mahaad-copy"))
  names = [m.name for m in P.default_methods(CFG)]
  assert names[-1] == "mahaad-copy"
  (m,) = P.select_methods(CFG, ["mahaad-copy"])
  assert (m.method, m.config) == ("mahaad-copy", MahaADConfig.for_backbone(CFG.backbone))


def test_methods_must_share_the_extractor(data, extractor):
  other = P.variant("glad", CFG.replace(image_size=96))
  with pytest.raises(ValueError, match="is configured for backbone 'resnet_tiny' at 96 px but the "
                                       "shared extractor is 'resnet_tiny' at 64 px"):
    P.run_standard([other], *data, extractor=extractor)
  with pytest.raises(ValueError, match="method 'padim': config must be a PadimConfig, got NoneType"):
    P.run_standard([P.Variant("padim", "padim", None)], *data, extractor=extractor)
  with pytest.raises(ValueError, match="unknown method 'padim2'; known methods: glad, mahaad"):
    P.run_standard([P.Variant("padim", "padim2", None)], *data, extractor=extractor)
  deep = P.variant("glad", CFG.replace(layers=("layer3",)))
  glad_only = P.make_extractor(CFG, [P.variant("glad", CFG)])  # layer2 only (MahaAD adds all)
  with pytest.raises(ValueError, match=r"uses layer\(s\) \['layer3'\] that the shared extractor"):
    P.run_standard([deep], *data, extractor=glad_only)


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
  with pytest.raises(ValueError, match=r"AttackSuiteConfig.fpr should be in \(0, 1\), got 0.0"):
    P.run_adversarial(methods, train, test, extractor=extractor,
                      attacks=AttackSuiteConfig(fpr=0.0))
  with pytest.raises(ValueError, match=r"holds out 7 of the 8 training images .* fewer than 2"):
    P.run_adversarial(methods, train, test, extractor=extractor,
                      attacks=AttackSuiteConfig(holdout=0.9))
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
  # MahaAD's size: per stage mean (d,), precision factor (d, d), shrinkage (), float32; every
  # stage of the tiny backbone (d = 8, 16, 32, 64 channels).
  assert standard.row("mahaad")["size_mb"] == pytest.approx(
      sum(4 * (d + d * d + 1) for d in (8, 16, 32, 64)) / 1e6)
  # A method that cannot be fitted (sample covariance, N = 8 < d = 16) is reported, not fatal.
  broken = P.Variant("mahaad-raw", "mahaad", MahaADConfig(layers=("layer2",), shrinkage=False))
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
      for layer in fitted.state.layers.values())  # there is padding to get wrong
  extractor = P.make_extractor(CFG, [fitted.variant])
  ref = GLAD.from_state(fitted.state, extractor=extractor).score_features(extractor(test.images))
  maps, scores = fitted.jitted(fitted.params, fitted.state, jnp.asarray(test.images))
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
    state = fit_mahaad(extractor(np.concatenate([train, test.images[moved]])), maha.config)
    scores = np.asarray(score_mahaad(state, extractor(test.images[kept]), out_size=S)[0])
    np.testing.assert_allclose(res.details["scores"][n]["mahaad"], scores, rtol=1e-5, atol=1e-5)
    assert r["contaminated_auroc"] == pytest.approx(roc_auc_score(test.labels[kept], scores),
                                                    abs=1e-6)
    clean = standard.details["scores"]["mahaad"][kept]
    assert r["clean_auroc"] == pytest.approx(roc_auc_score(test.labels[kept], clean), abs=1e-9)
    assert r["drop"] == pytest.approx(r["clean_auroc"] - r["contaminated_auroc"], abs=1e-12)


# -------------------------------------------------------------------------------------- adversarial


def test_attack_protocol_through_backbone_and_scorer(data, methods, extractor):
  train, test = data
  attacks = AttackSuiteConfig(pixel_epsilons=(2 / 255,), targeted_epsilon=None,
                              image_epsilons=(0.0, 2 / 255), steps=2, random_start=False,
                              holdout=0.25)
  chosen = methods[:2]  # GLAD (sparse local scoring, quantile score) and MahaAD
  res = P.run_adversarial(chosen, train, test, extractor=extractor, attacks=attacks, batch_size=8)
  fit_index, held_index = P.holdout_split(8, 0.25, seed=0)
  assert len(held_index) == 2 and np.array_equal(res.details["holdout"], held_index)
  assert not set(fit_index) & set(held_index)
  good, bad = test.labels == 0, test.labels == 1
  tables = P.adversarial_tables(res)
  for m in chosen:
    rows = [r for r in res.rows if r["method"] == m.name]
    assert [(r["attack"], r["epsilon"]) for r in rows] == [
        ("none", 0.0), ("pixel", 2.0), ("hide", 0.0), ("hide", 2.0), ("false-alarm", 0.0),
        ("false-alarm", 2.0)]
    assert all((r["n_fit"], r["n_holdout"]) == (6, 2) for r in rows)
    clean = res.details["clean"][m.name]
    assert rows[0]["image_auroc"] == pytest.approx(roc_auc_score(test.labels, clean))
    # The clean scores are those of the model fitted on the 6 kept images only.
    fitted = P.fit_method(m, P.featurize(extractor, train[fit_index]), extractor)
    np.testing.assert_allclose(clean, fitted.score(test.images, batch_size=8).image_scores,
                               rtol=1e-4, atol=1e-3)
    hide = res.details["scores"][m.name][("hide", 2.0)]
    alarm = res.details["scores"][m.name][("false-alarm", 2.0)]
    assert np.array_equal(hide[good], clean[good]) and np.array_equal(alarm[bad], clean[bad])
    assert np.all(alarm[good] > clean[good])  # PGD through backbone + scorer raises them
    assert np.all(np.isfinite(hide))  # gradients through the sparse scoring are finite
    assert rows[3]["image_auroc"] == pytest.approx(roc_auc_score(test.labels, hide))
    assert rows[2]["image_auroc"] == rows[0]["image_auroc"]  # budget 0: exactly clean
    assert rows[1]["pixel_bce"] > rows[0]["pixel_bce"]
    pixel = {r["method"]: r for r in tables["pixel"]}[m.name]
    assert pixel["pixel_ap_eps2"] == rows[1]["pixel_ap"]
    assert pixel["pixel_ap_clean"] == rows[0]["pixel_ap"]
