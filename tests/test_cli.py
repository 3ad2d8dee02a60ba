"""The `glad` command end to end on a tiny synthetic MVTec-layout category, and the errors a user meets."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from glad_jax import cli

TINY = ["--backbone", "resnet_tiny", "--image-size", "64", "--k", "4", "--max-iter", "10"]


@pytest.fixture
def fitted_checkpoint(category, tmp_path):
  out = tmp_path / "ck"
  assert cli.main(["--quiet", "fit", str(category), "--out", str(out), "--holdout", "0.2", "--fpr", "0.1"] + TINY) == 0
  return out


def test_fit_score_eval_info(category, fitted_checkpoint, tmp_path, capsys):
  assert (fitted_checkpoint / "glad_checkpoint.json").exists()
  out = tmp_path / "scores"
  rc = cli.main(["--quiet", "score", str(fitted_checkpoint), str(category / "test/good"),
                 str(category / "test/square/000.png"), "--out", str(out)])
  assert rc == 0
  rows = json.loads((out / "scores.json").read_text())
  assert len(rows) == 4 and {"image", "score", "anomalous", "threshold"} <= set(rows[0])
  assert (out / "scores.csv").read_text().count("\n") == 5
  assert len(list((out / "heatmaps").glob("*.png"))) == 4
  printed = capsys.readouterr().out
  assert "ANOMALOUS" in printed or "normal" in printed

  report = tmp_path / "report"
  assert cli.main(["--quiet", "eval", str(fitted_checkpoint), str(category), "--out", str(report)]) == 0
  metrics = json.loads((report / "metrics.json").read_text())
  assert metrics["n_test"] == 6 and metrics["n_anomalous"] == 3
  for key in ("image_auroc", "pixel_auroc", "aupro"):
    assert 0.0 <= metrics[key] <= 1.0
  for name in ("roc.png", "weight_decay.png", "local_maps.png", "metrics.md", "score_histogram.png"):
    assert (report / name).exists(), name
  assert "image_auroc" in capsys.readouterr().out

  assert cli.main(["info", str(fitted_checkpoint)]) == 0
  assert "layer1: K=" in capsys.readouterr().out


def _error(argv, capsys) -> str:
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.strip().splitlines()[-1].startswith("glad: error: ") and "Traceback" not in err
  return err


def test_missing_and_empty_data(tmp_path, capsys):
  assert "category folder not found" in _error(["fit", str(tmp_path / "nope"), "--out", str(tmp_path / "o")] + TINY,
                                               capsys)
  (tmp_path / "empty").mkdir()
  err = _error(["fit", str(tmp_path / "empty"), "--out", str(tmp_path / "o")] + TINY, capsys)
  assert "png, jpg, jpeg, bmp, tif, tiff" in err
  assert not (tmp_path / "o").exists()


def test_corrupt_image_stops_or_is_skipped(category, tmp_path, capsys):
  bad = category / "train/good/zzz_broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  err = _error(["--quiet", "fit", str(category), "--out", str(tmp_path / "o")] + TINY, capsys)
  assert "zzz_broken.png" in err and "--on-corrupt skip" in err
  assert not (tmp_path / "o").exists()
  rc = cli.main(["--quiet", "fit", str(category), "--out", str(tmp_path / "o"), "--on-corrupt", "skip"] + TINY)
  assert rc == 0
  assert "skipping unreadable image" in capsys.readouterr().err


def test_images_of_different_sizes_are_resized_once(category, tmp_path, capsys):
  from PIL import Image

  Image.fromarray(np.full((80, 72, 3), 128, np.uint8)).save(category / "train/good/odd_size.png")
  assert cli.main(["--quiet", "fit", str(category), "--out", str(tmp_path / "o")] + TINY) == 0
  err = capsys.readouterr().err
  assert err.count("different sizes") == 1


def test_checkpoint_errors(category, fitted_checkpoint, tmp_path, capsys):
  header = fitted_checkpoint / "glad_checkpoint.json"
  meta = json.loads(header.read_text())
  meta["format_version"] = 99
  meta["library_version"] = "0.0.1"
  header.write_text(json.dumps(meta))
  err = _error(["score", str(fitted_checkpoint), str(category / "test/good"), "--out", str(tmp_path / "s")], capsys)
  assert "format version 99" in err and "Refit" in err
  err = _error(["info", str(tmp_path / "missing_ck")], capsys)
  assert "checkpoint not found" in err


def test_score_input_errors(fitted_checkpoint, tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("hello")
  err = _error(["score", str(fitted_checkpoint), str(tmp_path / "notes.txt"), "--out", str(tmp_path / "s")], capsys)
  assert "notes.txt is not an image file" in err
  err = _error(["score", str(fitted_checkpoint), str(tmp_path / "ghost.png"), "--out", str(tmp_path / "s")], capsys)
  assert "no such file or folder" in err


def test_demo_quick_runs_the_main_job(tmp_path):
  """`glad demo` in its reduced mode, as a subprocess (the console entry point, `python -m glad_jax`)."""
  env = dict(os.environ, GLAD_DEMO_QUICK="1")
  proc = subprocess.run([sys.executable, "-m", "glad_jax", "--quiet", "demo", "--out", str(tmp_path / "demo"),
                         "--checkpoint", str(tmp_path / "ck")], capture_output=True, text=True, env=env,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads((tmp_path / "demo/metrics.json").read_text())
  assert metrics["quick"] is True and metrics["category"] == "elpv_mono"
  assert 0.0 <= metrics["image_auroc"] <= 1.0
  assert (tmp_path / "demo/roc.png").exists() and list((tmp_path / "demo/heatmaps").glob("*.png"))
  assert (tmp_path / "ck/glad_checkpoint.json").exists()
  assert "image_auroc" in proc.stdout


def test_model_options_reach_the_config():
  args = cli.build_parser().parse_args(
      ["fit", "data", "--out", "ck", "--k", "7", "--no-oas", "--global-only", "--backbone-dtype", "bfloat16",
       "--layers", "layer1, layer3", "--max-samples", "500"])
  config = cli._config_from_args(args)
  assert (config.n_components, config.use_oas, config.local, config.backbone_dtype, config.layers,
          config.max_samples) == (7, False, False, "bfloat16", ("layer1", "layer3"), 500)
  assert cli._config_from_args(cli.build_parser().parse_args(["fit", "d", "--out", "o"])).backbone_dtype == "float32"

  def radius(*flags):
    return cli._config_from_args(cli.build_parser().parse_args(["fit", "d", "--out", "o", *flags])).radius

  assert (radius(), radius("--radius", "2"), radius("--radius", "AUTO"), radius("--paper")) == ("auto", 2.0, "auto",
                                                                                               1.0)


def test_automatic_choices_come_from_training_images_only(tmp_path, capsys):
  """Two categories with the same train/good and different test folders (other images, other counts, another
  defect class) give the same model: the automatic choices (the local radius per layer, align='auto', the
  thresholds' held-out images) read the training images only."""
  import shutil

  import jax

  from PIL import Image

  from conftest import make_category, texture
  from glad_jax.model import GLAD

  a = make_category(tmp_path / "a", n_train=10, n_good=3, n_bad=3, seed=0)
  b = make_category(tmp_path / "b", n_train=10, n_good=5, n_bad=1, seed=0)
  for sub in ("test/square", "ground_truth/square"):  # another defect class in b
    shutil.move(str(b / sub), str(b / sub.replace("square", "blob")))
  rng = np.random.default_rng(99)
  for p in (b / "test/good").iterdir():  # and other good test images
    Image.fromarray(texture(rng)).save(p)
  # Same training images; the test images differ.
  for p in (a / "train/good").iterdir():
    assert p.read_bytes() == (b / "train/good" / p.name).read_bytes()
  assert (a / "test/good/000.png").read_bytes() != (b / "test/good/000.png").read_bytes()
  models = []
  for cat in (a, b):
    out = tmp_path / f"ck_{cat.name}"
    assert cli.main(["--quiet", "fit", str(cat), "--out", str(out), "--holdout", "0.2", "--align", "auto"]
                    + TINY) == 0
    models.append(GLAD.load(out))
  (ma, mb) = models
  assert [i.radius_choice for i in ma.fit_info.values()] == [i.radius_choice for i in mb.fit_info.values()]
  choices = [{k: v for k, v in m.align_choice.as_dict().items() if k != "seconds"} for m in models]
  assert choices[0] == choices[1] and set(choices[0]["aurocs"]) == {"none", "euclidean"}
  capsys.readouterr()
  assert cli.main(["info", str(tmp_path / "ck_a")]) == 0
  info = capsys.readouterr().out
  assert f"alignment: {ma.align_choice.chosen} (align=auto: synthetic-defect AUROC none " in info
  assert all(i.radius_choice["n_held_out"] >= 1 for i in ma.fit_info.values())
  for x, y in zip(jax.tree_util.tree_leaves(ma.state), jax.tree_util.tree_leaves(mb.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert jax.tree_util.tree_structure(ma.state) == jax.tree_util.tree_structure(mb.state)
