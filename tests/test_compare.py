"""scripts/compare.py end to end on a tiny synthetic MVTec-layout category (tiny test backbone)."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import load_script

S = 64


@pytest.fixture(scope="module")
def compare():
  return load_script("compare")


def _image(rng, anomalous):
  xx = np.mgrid[:S, :S][1]
  img = np.repeat((128 + 50 * np.sin(xx / 4.0))[..., None], 3, axis=-1) + rng.normal(0, 14,
                                                                                     (S, S, 3))
  mask = np.zeros((S, S), np.uint8)
  if anomalous:
    r, c = rng.integers(4, S - 16, 2)
    img[r:r + 8, c:c + 8] += 45
    mask[r:r + 8, c:c + 8] = 255
  return np.clip(img, 0, 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def category(tmp_path_factory):
  """train/good (8), test/good (6), test/scratch (6) + ground_truth/scratch/*_mask.png."""
  root = tmp_path_factory.mktemp("data") / "tiny"
  rng = np.random.default_rng(0)
  for folder, n, bad in (("train/good", 8, False), ("test/good", 6, False),
                         ("test/scratch", 6, True)):
    (root / folder).mkdir(parents=True)
    for i in range(n):
      img, mask = _image(rng, bad)
      Image.fromarray(img).save(root / folder / f"{i:03d}.png")
      if bad:
        (root / "ground_truth/scratch").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "ground_truth/scratch" / f"{i:03d}_mask.png")
  return root


TINY = ["--backbone", "resnet_tiny", "--weights", "random", "--layers", "layer2",
        "--image-size", str(S), "--k", "4", "--max-iter", "10", "--max-samples", "256", "--quiet"]


def test_compare_end_to_end_writes_every_method_and_protocol(compare, category, tmp_path, capsys):
  out = tmp_path / "out"
  methods = ["glad", "mahaad", "patchcore"]
  rc = compare.main([str(category), *TINY, "--methods", *methods, "--rd-versions", "1",
                     "--contamination", "2,40", "--epsilons", "2", "--image-epsilons", "4", "--pgd-steps", "1",
                     "--max-test", "10", "--out", str(out)])
  assert rc == 0
  printed = capsys.readouterr().out
  data = json.loads((out / "compare.json").read_text())
  markdown = (out / "compare.md").read_text()
  assert printed == markdown
  assert (data["n_train"], data["n_test"], data["n_test_anomalous"]) == (8, 10, 5)
  assert [r["method"] for r in data["summary"]] == methods
  columns = ["image_auroc", "pixel_auroc", "aupro", "fit_s", "inference_ms", "size_mb",
             "rd_normal", "rd_auroc", "rd_diff", "c2_auroc", "c2_drop", "c40_auroc", "c40_drop",
             "adv_pixel_ap", "adv_pixel_ap_eps2", "adv_pixel_ap_eps8t", "adv_hide_det_eps4",
             "adv_alarm_eps4"]
  for row in data["summary"]:
    assert "error" not in row
    for col in columns:
      assert isinstance(row[col], float), (row["method"], col)
    assert 0 <= row["image_auroc"] <= 1 and row["size_mb"] > 0
  assert set(data["protocols"]) == {"standard", "rd", "contamination", "adversarial"}
  for protocol in data["protocols"].values():
    assert {r["method"] for r in protocol["rows"]} == set(methods)
  c40 = [r for r in data["protocols"]["contamination"]["rows"] if r["n_requested"] == 40]
  assert all(r["n_moved"] == 4 and r["n_train"] == 12 for r in c40)  # capped: 1 anomaly kept
  # Every reduced setting is named in the header, with the paper's value.
  assert "k: 4 (paper: 1000)" in markdown and "rd_versions: 1 (paper: 5)" in markdown
  assert "epsilons: [2.0] (paper: [1.0, 2.0, 4.0, 8.0])" in markdown
  assert "max_test: 10 (paper: all)" in markdown
  for m in methods:
    assert f"| {m} |" in markdown


@pytest.mark.parametrize("args, message", [
    (["--methods", "glad", "glad-xl"], "unknown method(s) ['glad-xl']"),
    (["--protocols", "standard,speed"], "unknown protocol(s) ['speed']"),
])
def test_compare_reports_bad_arguments(compare, category, tmp_path, capsys, args, message):
  assert compare.main([str(category), *TINY, *args, "--out", str(tmp_path)]) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "compare.json").exists()


def test_compare_reports_a_missing_folder(compare, tmp_path, capsys):
  assert compare.main([str(tmp_path / "nowhere"), *TINY]) == 2
  assert "category folder not found" in capsys.readouterr().err
