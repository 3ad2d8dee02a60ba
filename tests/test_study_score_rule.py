"""scripts/study_score_rule.py: the map smoothing and image score rules, the label-free choice, --quick."""

import json

import numpy as np
import pytest
from scipy import ndimage

from conftest import load_script, make_category


@pytest.fixture
def study(monkeypatch):
  return load_script("study_score_rule", monkeypatch)


def test_rules_are_checked(study):
  assert study.parse_rules("0, 4", "q0.005,max") == [(0.0, "q0.005"), (0.0, "max"), (4.0, "q0.005"), (4.0, "max")]
  for sigmas, scores in (("", "max"), ("-1", "max"), ("a", "max"), ("0", "q2"), ("0", "mean"), ("0", "")):
    with pytest.raises(ValueError):
      study.parse_rules(sigmas, scores)


def test_scores_and_smoothing_match_numpy_and_scipy(study):
  rng = np.random.default_rng(0)
  maps = rng.normal(size=(3, 20, 24)).astype(np.float32)
  np.testing.assert_allclose(study.image_scores(maps, "max"), maps.reshape(3, -1).max(1))
  np.testing.assert_allclose(study.image_scores(maps, "q0.01"), np.quantile(maps.reshape(3, -1), 0.99, axis=1))
  ref = np.stack([ndimage.gaussian_filter(m.astype(np.float64), 2.0, mode="reflect", truncate=4.0) for m in maps])
  np.testing.assert_allclose(study.smoothed(maps, 2.0), ref, rtol=1e-4, atol=1e-5)
  assert study.smoothed(maps, 0.0) is maps


@pytest.mark.slow
def test_quick_chooses_the_best_mean_synthetic_auroc(study, tmp_path, capsys):
  cat = make_category(tmp_path / "tiny", n_train=10, n_good=4, n_bad=4)
  out = tmp_path / "out"
  assert study.main(["--quick", "--dev", "none", str(cat), "--sigmas", "0,4", "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  data = json.loads((out / "study_score_rule.json").read_text())
  assert (out / "study_score_rule.md").read_text() == printed
  rows = [r for r in data["rows"] if r["category"] != "mean"]
  assert [(r["sigma"], r["score"]) for r in rows] == [(0.0, "q0.005"), (0.0, "max"), (4.0, "q0.005"), (4.0, "max")]
  chosen = [r for r in rows if r["chosen"]]
  assert len(chosen) == 1 and chosen[0]["val_auroc"] == max(r["val_auroc"] for r in rows)
  assert (data["summary"]["chosen_sigma"], data["summary"]["chosen_score"]) == (chosen[0]["sigma"],
                                                                                 chosen[0]["score"])
  for r in rows:
    assert 0.0 <= r["image_auroc"] <= 1.0 and 0.0 <= r["val_pixel_auroc"] <= 1.0 and r["pixel_auroc"] is not None
  assert study.main(["--dev", "none", str(cat), "--scores", "mean"]) == 2
  assert "--scores" in capsys.readouterr().err
