"""scripts/study_local_radius.py: refitting the local weights at another radius, the label-free choice, --quick."""

import json

import jax
import numpy as np
import pytest

from conftest import load_script, make_category


@pytest.fixture
def study(monkeypatch):
  return load_script("study_local_radius", monkeypatch)


def test_radii_are_checked(study):
  assert study.parse_radii("1, 2,3") == [1.0, 2.0, 3.0]
  for bad in ("", "1,1", "-1", "a"):
    with pytest.raises(ValueError, match="--radii must be distinct numbers >= 0"):
      study.parse_radii(bad)


def test_refit_at_the_fits_own_radius_gives_the_fits_maps(study):
  from glad_jax.config import GLADConfig
  from glad_jax.methods import glad

  rng = np.random.default_rng(0)
  feats = {"layer1": rng.normal(size=(6, 6, 6, 3)).astype(np.float32)}
  config = GLADConfig(layers=("layer1",), n_components=4, image_size=24, max_samples=None, radius=1.0)
  state = glad.fit(feats, config, jax.random.PRNGKey(0))
  again = study.with_radius(state, feats, 1.0)
  test = {"layer1": rng.normal(size=(2, 6, 6, 3)).astype(np.float32)}
  np.testing.assert_allclose(glad.score(again, test)[0], glad.score(state, test)[0], rtol=1e-4, atol=1e-3)
  wider = study.with_radius(state, feats, 2.0)
  assert wider.config.radius == 2.0 and wider.update_stats is None
  assert not np.allclose(glad.score(wider, test)[0], glad.score(state, test)[0])


@pytest.mark.slow
def test_quick_chooses_the_smallest_held_out_nll(study, tmp_path, capsys):
  cat = make_category(tmp_path / "tiny", n_train=12, n_good=4, n_bad=4)
  out = tmp_path / "out"
  assert study.main(["--quick", "--dev", "none", str(cat), "--radii", "1,2", "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  data = json.loads((out / "study_local_radius.json").read_text())
  assert (out / "study_local_radius.md").read_text() == printed
  rows = data["rows"]
  assert [r["radius"] for r in rows] == [1.0, 2.0] and sum(r["chosen"] for r in rows) == 1
  chosen = next(r for r in rows if r["chosen"])
  assert chosen["held_nll"] == min(r["held_nll"] for r in rows)
  for r in rows:
    assert 0.0 <= r["image_auroc"] <= 1.0 and r["pixel_auroc"] is not None
    assert set(r) >= {"held_nll_layer1", "held_nll_layer2", "held_nll_layer3"}
  assert data["mean_image_auroc_chosen"] == pytest.approx(chosen["image_auroc"])
  assert study.main(["--dev", "none", str(cat), "--radii", "0,0"]) == 2
  assert "--radii must be distinct" in capsys.readouterr().err
