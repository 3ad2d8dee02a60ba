"""scripts/study_align.py: the misregistration measure, the by_val rule, --quick."""

import json

import numpy as np
import pytest

from conftest import load_script, make_category


@pytest.fixture
def study(monkeypatch):
  return load_script("study_align", monkeypatch)


def test_misregistration_is_one_minus_the_correlation_of_grey_levels(study):
  rng = np.random.default_rng(0)
  reference = rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)
  images = rng.integers(0, 256, (4, 12, 10, 3)).astype(np.uint8)
  grey = lambda x: np.asarray(x, np.float64).mean(-1).ravel()  # noqa: E731
  expected = [1.0 - np.corrcoef(grey(im), grey(reference))[0, 1] for im in images]
  np.testing.assert_allclose(study.misregistration(images, reference), expected, rtol=1e-10, atol=1e-12)
  # Brightness and contrast do not count; a shift does.
  brighter = np.clip(reference.astype(np.float64) * 0.5 + 40, 0, 255)[None]
  np.testing.assert_allclose(study.misregistration(brighter, reference), [0.0], atol=1e-12)
  shifted = np.roll(reference, 3, axis=1)[None]
  assert study.misregistration(shifted, reference)[0] > 0.1


def test_summary_means_the_picks_of_each_rule(study):
  rows = [{"align": "none", "image_auroc": 0.6, "by_val": False}, {"align": "euclidean", "image_auroc": 0.8, "by_val": True},
          {"align": "none", "image_auroc": 0.9, "by_val": True}, {"align": "euclidean", "image_auroc": 0.7, "by_val": False}]
  assert study.summary(rows, "euclidean") == pytest.approx({"none": 0.75, "euclidean": 0.75, "by_val": 0.85})


@pytest.mark.slow
def test_quick_fits_with_and_without_alignment(study, tmp_path, capsys):
  cat = make_category(tmp_path / "tiny", n_train=10, n_good=4, n_bad=4)
  out = tmp_path / "out"
  assert study.main(["--quick", "--dev", "none", str(cat), "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  data = json.loads((out / "study_align.json").read_text())
  assert (out / "study_align.md").read_text() == printed
  none, aligned = data["rows"]
  assert (none["align"], aligned["align"]) == ("none", "euclidean")
  assert none["by_val"] != aligned["by_val"]
  assert aligned["by_val"] == (aligned["val_auroc"] > none["val_auroc"])
  assert aligned["misregistration_ratio"] == pytest.approx(aligned["misregistration"] / none["misregistration"])
  for r in data["rows"]:
    assert 0.0 <= r["val_auroc"] <= 1.0 and 0.0 <= r["image_auroc"] <= 1.0 and r["pixel_auroc"] is not None
  assert data["summary"]["by_val"] == pytest.approx((aligned if aligned["by_val"] else none)["image_auroc"])
  assert study.main(["--dev", "none", str(cat), "--model", "wobble"]) == 2
  assert "--model" in capsys.readouterr().err
