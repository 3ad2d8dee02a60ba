"""Label-free validation: metrics against scikit-learn on stand-in models, held-out image choice, the
`glad validate` command end to end on a tiny fitted model, and its errors."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from conftest import make_category, texture
from glad_jax import cli, synthetic, validation
from glad_jax.data import mvtec

TINY = ["--backbone", "resnet_tiny", "--image-size", "64", "--k", "4", "--max-iter", "10"]


class StandIn:
  """A 'model' with a known scoring rule: maps = |image - reference| (grey), score = 99th percentile."""

  def __init__(self, reference, image_size=None, image_threshold=None, pixel_threshold=None, mask=None):
    self.reference = reference.astype(float)
    self.config = SimpleNamespace(image_size=image_size, align="none")
    self.image_threshold, self.pixel_threshold, self.mask = image_threshold, pixel_threshold, mask
    self.seen = []

  def score(self, images, *, batch_size=16):
    self.seen.append(np.array(images))
    maps = np.abs(images.astype(float) - self.reference).mean(-1)
    if self.mask is not None:
      maps = maps * self.mask
    return SimpleNamespace(image_scores=np.percentile(maps.reshape(len(maps), -1), 99, axis=1),
                           anomaly_maps=maps)


def _goods(n=6, size=48, seed=0):
  rng = np.random.default_rng(seed)
  return np.stack([texture(rng, size) for _ in range(n)])


def test_metrics_match_sklearn_on_the_same_defects():
  x = _goods()
  model = StandIn(x.mean(0), image_size=48, image_threshold=20.0, pixel_threshold=30.0)
  res = validation.validate(model, x, seed=3, n_per_image=2)
  defects = synthetic.defect_set(x, synthetic.KINDS, seed=3, n_per_image=2)  # independent regeneration
  clean = model.score(x)
  pooled_s, pooled_m, pooled_gt = [], [], []
  for kind, (images, masks) in defects.items():
    d = model.score(images)
    labels = np.r_[np.zeros(6), np.ones(12)]
    scores = np.r_[clean.image_scores, d.image_scores]
    entry = res["per_kind"][kind]
    assert entry["image_auroc"] == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    gt = np.concatenate([np.zeros_like(masks[:6]), masks])
    maps = np.concatenate([clean.anomaly_maps, d.anomaly_maps])
    assert entry["pixel_auroc"] == pytest.approx(skm.roc_auc_score(gt.ravel(), maps.ravel()), abs=1e-12)
    assert 0.0 <= entry["aupro"] <= 1.0
    assert entry["n_defective"] == 12 and entry["mean_area"] == pytest.approx(masks.mean())
    assert entry["detected"] == pytest.approx(np.mean(d.image_scores > 20.0))
    assert entry["pixel_recall"] == pytest.approx(np.mean(d.anomaly_maps[masks] > 30.0))
    pooled_s.append(d.image_scores)
    pooled_m.append(d.anomaly_maps)
    pooled_gt.append(masks)
  labels = np.r_[np.zeros(6), np.ones(36)]
  assert res["overall"]["image_auroc"] == pytest.approx(
      skm.roc_auc_score(labels, np.concatenate([clean.image_scores, *pooled_s])), abs=1e-12)
  assert res["overall"]["n_defective"] == 36
  assert res["image_fpr"] == pytest.approx(np.mean(clean.image_scores > 20.0))
  assert res["pixel_fpr"] == pytest.approx(np.mean(clean.anomaly_maps > 30.0))
  assert res["n_good"] == 6 and res["kinds"] == list(synthetic.KINDS) and res["image_size"] == 48
  json.dumps(res)  # serialisable as is
  rows = validation.result_rows(res)
  assert [r["defects"] for r in rows] == [*synthetic.KINDS, "all"]
  assert "clean held-out images above the image threshold 20: " in validation.threshold_summary(res)


def test_uncalibrated_model_and_a_clear_defect_detector():
  x = _goods(4)
  # A model that sees exactly the changed pixels (its reference is each clean image): AUROC 1.
  memory = {im.tobytes(): im for im in x}

  class Oracle:
    image_threshold = None

    def score(self, images):
      ref = np.stack([memory.get(im.tobytes(), x[int(np.argmin([np.abs(im.astype(int) - c).sum() for c in x]))])
                      for im in images])
      maps = np.abs(images.astype(float) - ref).sum(-1)
      return SimpleNamespace(image_scores=maps.max(axis=(1, 2)), anomaly_maps=maps)

  res = validation.validate(Oracle(), x, kinds=("scratch", "blob"))
  assert res["overall"]["image_auroc"] == 1.0
  assert res["per_kind"]["scratch"]["pixel_auroc"] > 0.99
  assert res["image_threshold"] is None and res["image_fpr"] is None and res["pixel_fpr"] is None
  assert "detected" not in res["overall"]
  assert validation.threshold_summary(res).startswith("thresholds: the model is not calibrated")


def test_images_are_resized_to_the_model_and_defects_kept_in_its_mask():
  x = _goods(3, size=40)
  mask = np.zeros((32, 32), bool)
  mask[4:28, 4:28] = True
  model = StandIn(np.full((32, 32, 3), 128.0), image_size=32, mask=mask)
  res = validation.validate(model, x, kinds=("cutpaste",), n_per_image=3)
  clean, defective = model.seen
  assert clean.shape == (3, 32, 32, 3) and defective.shape == (9, 32, 32, 3)
  changed = np.any(defective != np.repeat(clean, 3, axis=0), axis=-1)
  assert changed.any() and not np.any(changed & ~mask)
  assert res["defects_in_mask"] and res["image_size"] == 32
  # Grey images are accepted.
  assert validation.validate(model, x[..., 0], kinds=("blob",))["n_good"] == 3


def test_validate_errors():
  model = StandIn(np.zeros((6, 6, 3)), image_size=6)
  x = _goods(2, size=8)
  with pytest.raises(ValueError, match="the model scores 6x6 images: images of 6x6 pixels are too small"):
    validation.validate(model, x)
  with pytest.raises(ValueError, match="no good image to validate on"):
    validation.validate(model, x[:0])
  with pytest.raises(ValueError, match="good_images must be uint8 images"):
    validation.validate(model, x.astype(np.float32))
  with pytest.raises(ValueError, match="unknown defect kind 'dent'"):
    validation.validate(StandIn(np.zeros((48, 48, 3)), image_size=48), _goods(2), kinds=("dent",))


def _folder(path, n, size=48):
  path.mkdir(parents=True)
  rng = np.random.default_rng(1)
  for i in range(n):
    Image.fromarray(texture(rng, size)).save(path / f"{i}.png")
  return path


def test_held_out_good_never_uses_anomalous_or_training_images(tmp_path):
  cat = make_category(tmp_path / "cat", n_train=3, n_good=2, n_bad=2)
  records, split = validation.held_out_good(mvtec.read_category(cat))
  assert split == "test/good" and len(records) == 2 and all(r.label == 0 for r in records)
  _folder(cat / "validation" / "good", 4)
  records, split = validation.held_out_good(mvtec.read_category(cat))
  assert split == "validation/good" and len(records) == 4
  records, split = validation.held_out_good(mvtec.read_category(_folder(tmp_path / "plain", 3)))
  assert split == "folder" and len(records) == 3
  only_train = tmp_path / "train_only"
  _folder(only_train / "train" / "good", 3)
  with pytest.raises(ValueError, match="has no held-out good images .validation/good or test/good.; its train/good"):
    validation.held_out_good(mvtec.read_category(only_train))


def _error(argv, capsys) -> str:
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.strip().splitlines()[-1].startswith("glad: error: ") and "Traceback" not in err
  return err


def test_glad_validate_end_to_end(tmp_path, capsys):
  cat = make_category(tmp_path / "cat", n_train=8, n_good=4, n_bad=2)
  ck = tmp_path / "ck"
  assert cli.main(["--quiet", "fit", str(cat), "--out", str(ck), "--holdout", "0.25", "--fpr", "0.1"] + TINY) == 0
  capsys.readouterr()
  out = tmp_path / "val"
  assert cli.main(["--quiet", "validate", str(ck), str(cat), "--out", str(out), "--seed", "1"]) == 0
  printed = capsys.readouterr()
  assert "| defects | n_good |" in printed.out and "| all |" in printed.out
  assert "clean held-out images above the image threshold" in printed.out
  assert "4 held-out good images (test/good of" in printed.err
  res = json.loads((out / "validate.json").read_text())
  assert res["split"] == "test/good" and res["n_good"] == 4 and res["seed"] == 1
  assert set(res["per_kind"]) == set(synthetic.KINDS) and res["overall"]["n_defective"] == 12
  for entry in [*res["per_kind"].values(), res["overall"]]:
    for key in ("image_auroc", "pixel_auroc", "aupro", "detected", "pixel_recall"):
      assert 0.0 <= entry[key] <= 1.0
  assert 0.0 <= res["image_fpr"] <= 1.0 and 0.0 <= res["pixel_fpr"] <= 1.0
  assert not list(out.glob(".*.tmp"))  # written atomically, nothing left behind
  # A folder of good images works too; the same seed gives the same numbers.
  plain = _folder(tmp_path / "plain", 3, size=64)
  assert cli.main(["--quiet", "validate", str(ck), str(plain), "--kinds", "scratch", "--n-per-image", "2"]) == 0
  assert "| scratch | 3 | 6 |" in capsys.readouterr().out

  # Errors: one line each, nothing written.
  assert "category folder not found" in _error(["validate", str(ck), str(tmp_path / "nope")], capsys)
  (tmp_path / "empty").mkdir()
  assert "neither an MVTec category" in _error(["validate", str(ck), str(tmp_path / "empty")], capsys)
  err = _error(["--quiet", "validate", str(ck), str(cat), "--area", "0.00001,0.0002", "--out", str(tmp_path / "o")],
               capsys)
  assert "the model scores 64x64 images: images of 64x64 pixels are too small for defects" in err
  assert not (tmp_path / "o").exists()
  assert "--kinds: unknown defect kind(s) ['dent']" in _error(["validate", str(ck), str(cat), "--kinds", "dent"],
                                                             capsys)
  assert "--area must be two comma-separated fractions" in _error(["validate", str(ck), str(cat), "--area", "x"],
                                                                  capsys)
  assert "area must be (low, high) fractions" in _error(["validate", str(ck), str(cat), "--area", "0.1,0.01"], capsys)
