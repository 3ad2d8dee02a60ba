"""scripts/benchmark.py: the documented subsets, the mean rows, the errors, and --quick end to end."""

import json

import numpy as np
import pytest

from conftest import load_script, make_category


@pytest.fixture
def bench(monkeypatch):
  return load_script("benchmark", monkeypatch)


def test_split_holds_out_caps_and_never_mixes_roles(bench, tmp_path):
  from glad_jax.data import mvtec

  cat = mvtec.read_category(make_category(tmp_path / "c", n_train=40, n_good=5, n_bad=5))
  d = bench.split_category(cat, seed=0, max_train=20, max_test=None, max_held=None)
  assert d.held_split == "train/good holdout" and len(d.held) == 4  # 10% of 40
  assert len(d.train) == 20 and len(d.test) == 10
  train, held = {r.path for r in d.train}, {r.path for r in d.held}
  assert not train & held and not (train | held) & {r.path for r in d.test}
  assert {r.path for r in d.train} | held <= {r.path for r in cat.train}
  # Seeded: the same seed gives the same subsets; the held-out images do not depend on the cap.
  again = bench.split_category(cat, seed=0, max_train=30, max_test=None, max_held=None)
  assert again.held == d.held and again.train != d.train and len(again.train) == 30
  other = bench.split_category(cat, seed=1, max_train=20, max_test=None, max_held=None)
  assert other.held != d.held
  # A test subset keeps both classes; validation/good is the held-out set when present.
  sub = bench.split_category(cat, seed=0, max_train=None, max_test=4, max_held=2)
  assert sorted(r.label for r in sub.test) == [0, 0, 1, 1] and len(sub.held) == 2 and len(sub.train) == 36
  with_val = cat.replace(validation=cat.test[:3])
  d = bench.split_category(with_val, seed=0, max_train=None, max_test=None, max_held=None)
  assert d.held_split == "validation/good" and len(d.held) == 3 and len(d.train) == 40


def test_mean_rows_skip_missing_metrics(bench):
  rows = [{"category": "a", "method": "glad", "image_auroc": 0.5, "pixel_auroc": 0.9, "fit_s": 2.0},
          {"category": "b", "method": "glad", "image_auroc": 0.7, "pixel_auroc": None, "fit_s": 4.0},
          {"category": "a", "method": "padim", "error": "ValueError: degenerate"}]
  (mean,) = bench.mean_rows(rows, ["glad", "padim"])
  assert mean == {"category": "mean (2)", "method": "glad", "image_auroc": pytest.approx(0.6),
                  "pixel_auroc": 0.9, "fit_s": 3.0}


def test_glad_uses_its_own_default_sample_cap_unless_told(bench):
  from glad_jax.config import GLADConfig

  parse = lambda *a: bench.settings(bench.build_parser().parse_args(list(a)))  # noqa: E731
  assert parse()["max_samples"] == GLADConfig().max_samples  # the default fit, not every vector
  assert parse("--max-samples", "all")["max_samples"] is None
  assert parse("--max-samples", "50,000")["max_samples"] == 50_000
  assert parse("--max-samples", "auto")["max_samples"] == "auto"
  assert parse("--quick")["max_samples"] == bench.QUICK["max_samples"]
  with pytest.raises(SystemExit):
    parse("--max-samples", "0")


def test_errors(bench, tmp_path, capsys):
  assert bench.main(["--dev", "tire"]) == 2
  assert "--dev: unknown development categories ['tire']" in capsys.readouterr().err
  assert bench.main(["--dev", "none"]) == 2
  assert "no category to run" in capsys.readouterr().err
  assert bench.main(["--dev", "casting", "--data-root", str(tmp_path)]) == 2
  assert f"development category 'casting' not found at {tmp_path / 'casting'}" in capsys.readouterr().err
  assert bench.main(["--dev", "none", str(tmp_path / "nope")]) == 2
  assert "category folder not found" in capsys.readouterr().err
  assert bench.main(["--dev", "none", str(tmp_path), "--coreset-ratio", "0"]) == 2
  assert "--coreset-ratio must be in (0, 1], got 0.0" in capsys.readouterr().err
  assert bench.main(["--dev", "none", str(tmp_path), "--align", "spline"]) == 2
  assert "unknown motion model 'spline'" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_on_elpv_and_a_folder(bench, tmp_path, capsys):
  cat = make_category(tmp_path / "tiny", n_train=12, n_good=4, n_bad=4)
  out = tmp_path / "out"
  rc = bench.main(["--quick", "--dev", "elpv", str(cat), "--validate", "--coreset-ratio", "0.05", "--quiet",
                   "--out", str(out)])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "| category | method | n_train | n_test | image_auroc |" in printed and "(--quick)" in printed
  data = json.loads((out / "benchmark.json").read_text())
  assert (out / "benchmark.md").read_text() == printed
  assert data["settings"]["k"] == 16 and data["settings"]["patchcore_coreset_ratio"] == 0.05
  rows = data["rows"]
  assert [(r["category"], r["method"]) for r in rows] == [
      (c, m) for c in ("elpv_mono", "tiny") for m in ("glad", "padim", "patchcore", "mahaad")]
  for r in rows:
    assert "error" not in r, r
    assert r["n_train"] == 8 and r["n_test"] == 8
    for key in ("image_auroc", "val_auroc", "val_pixel_auroc"):
      assert 0.0 <= r[key] <= 1.0
    assert (r["pixel_auroc"] is None) == (r["category"] == "elpv_mono")  # elpv has no masks
  assert all("align" not in r for r in rows) and data["settings"]["align"] == "none"
  assert [m["category"] for m in data["mean"]] == ["mean (2)"] * 4
  glad = [r for r in rows if r["method"] == "glad"]
  assert data["mean"][0]["image_auroc"] == pytest.approx(np.mean([r["image_auroc"] for r in glad]))
  assert data["categories"]["tiny"]["held_split"] == "train/good holdout"


@pytest.mark.slow
def test_quick_align_auto_reports_glads_choice(bench, tmp_path, capsys):
  cat = make_category(tmp_path / "tiny", n_train=12, n_good=4, n_bad=4)
  out = tmp_path / "out"
  assert bench.main(["--quick", "--dev", "none", str(cat), "--methods", "glad,padim", "--quiet",
                     "--align", "auto", "--out", str(out)]) == 0
  (header,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| category |")]
  assert "| align |" in header  # the table has the column (the settings line names align in any run)
  data = json.loads((out / "benchmark.json").read_text())
  glad, padim = data["rows"]
  assert (glad["method"], padim["method"]) == ("glad", "padim")
  # GLAD's row says what the probe chose; the baselines never align.
  assert glad["align"] in ("none", "euclidean") and "align" not in padim
  assert data["settings"]["align"] == "auto"
