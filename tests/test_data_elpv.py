"""elpv split: counts from the package's own label file, disjointness, seeds, subsets."""

import os

import numpy as np
import pytest
from PIL import Image

from glad_jax.data import elpv, mvtec

elpv_dataset = pytest.importorskip("elpv_dataset")
LABELS = os.path.join(os.path.dirname(elpv_dataset.__file__), "data", "labels.csv")


def _labels():
  # Parsed like elpv_dataset.utils.load_dataset does (without decoding the 2,624 images).
  data = np.genfromtxt(LABELS, dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"])
  return np.char.decode(data["path"]), data["probability"], np.char.decode(data["type"])


@pytest.mark.parametrize("cell_type", ["mono", "poly"])
def test_counts_follow_the_documented_split(cell_type):
  paths, prob, types = _labels()
  sel = types == cell_type
  n_good = int(np.sum(sel & (prob == 0)))
  n_bad = int(np.sum(sel & (prob > 0.6)))  # 2/3 and 1
  cat = elpv.elpv_category(cell_type)
  n_test_good = int(round(0.25 * n_good))
  assert len(cat.train) == n_good - n_test_good
  assert sum(r.label == 0 for r in cat.test) == n_test_good
  assert sum(r.label == 1 for r in cat.test) == n_bad
  assert cat.name == f"elpv_{cell_type}" and cat.layout == "elpv"
  train = {r.path for r in cat.train}
  assert not train & {r.path for r in cat.test}  # held-out cells never trained on
  by_path = {os.path.basename(p): (pr, t) for p, pr, t in zip(paths, prob, types)}
  for r in cat.train + cat.test:
    pr, t = by_path[r.path.name]
    assert t == cell_type and r.mask_path is None
    assert (pr == 0) == (r.label == 0)
    assert r.defect == ("good" if pr == 0 else f"defective_{round(100 * pr)}")


def test_uncertain_cells_and_seeds():
  _, prob, types = _labels()
  cat = elpv.elpv_category("mono", uncertain="anomalous")
  assert sum(r.label for r in cat.test) == int(np.sum((types == "mono") & (prob > 0)))
  a, b = elpv.elpv_category("mono", seed=1), elpv.elpv_category("mono", seed=1)
  c = elpv.elpv_category("mono", seed=2)
  assert a == b and {r.path for r in a.train} != {r.path for r in c.train}


def test_subset_and_loading():
  cat = elpv.elpv_category("poly", max_train=6, max_test_good=2, max_test_anomalous=3, seed=3)
  assert len(cat.train) == 6 and [r.label for r in cat.test] == [0, 0, 1, 1, 1]
  full = elpv.elpv_category("poly", seed=3)
  assert {r.path for r in cat.train} <= {r.path for r in full.train}
  batch = mvtec.load_split(cat.test[:2], 300)
  gray = np.asarray(Image.open(cat.test[0].path))
  assert batch.images.shape == (2, 300, 300, 3)
  for ch in range(3):
    np.testing.assert_array_equal(batch.images[0, ..., ch], gray)
  assert batch.has_mask.all()  # good cells: known empty masks


def test_bad_arguments():
  with pytest.raises(ValueError, match="cell_type"):
    elpv.elpv_category("amorphous")
  with pytest.raises(ValueError, match="test_fraction"):
    elpv.elpv_category(test_fraction=1.0)
  with pytest.raises(ValueError, match="uncertain"):
    elpv.elpv_category(uncertain="maybe")
