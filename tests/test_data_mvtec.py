"""Folder readers: the shared MVTec 3D-AD tire category and synthetic trees with broken files."""

import collections
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glad_jax.data import DataError, images, mvtec

TIRE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec3d_tire_rgb"
needs_tire = pytest.mark.skipif(not TIRE.is_dir(), reason=f"shared tire data absent ({TIRE})")


def _png(path: Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def make_tree(root: Path, *, gray: bool = False) -> Path:
  """A tiny MVTec AD category: 3 train, 2 test good, 2 'scratch' with masks, 1 'dent' with mask."""
  rng = np.random.default_rng(0)

  def img():
    a = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    return a[..., 0] if gray else a

  for i in range(3):
    _png(root / "train" / "good" / f"{i:03d}.png", img())
  for i in range(2):
    _png(root / "test" / "good" / f"{i:03d}.png", img())
  for d, n in (("scratch", 2), ("dent", 1)):
    for i in range(n):
      _png(root / "test" / d / f"{i:03d}.png", img())
      mask = np.zeros((12, 16), np.uint8)
      mask[2 + i:6, 3:9] = 255
      _png(root / "ground_truth" / d / f"{i:03d}_mask.png", mask)
  return root


# ----------------------------------------------------------------------------- shared data


@needs_tire
def test_tire_split_counts_and_mask_pairing():
  cat = mvtec.read_category(TIRE)
  assert cat.layout == "mvtec_ad"
  assert (len(cat.train), len(cat.validation)) == (210, 29)
  counts = collections.Counter(r.defect for r in cat.test)
  assert counts == {"good": 25, "combined": 5, "contamination": 28, "cut": 27, "hole": 27}
  assert cat.defect_types == ("combined", "contamination", "cut", "hole")
  for r in cat.train + cat.validation:
    assert (r.label, r.defect, r.mask_path) == (0, "good", None)
  for r in cat.test:
    if r.defect == "good":
      assert r.label == 0 and r.mask_path is None
    else:
      assert r.label == 1
      assert r.mask_path == TIRE / "ground_truth" / r.defect / f"{r.path.stem}_mask.png"


@needs_tire
def test_tire_load_matches_pil_at_native_size():
  cat = mvtec.read_category(TIRE)
  recs = [cat.test[0], cat.test[-1], next(r for r in cat.test if r.defect == "good")]
  batch = mvtec.load_split(recs, (400, 300))  # native H x W: no resizing
  assert batch.images.shape == (3, 400, 300, 3) and batch.images.dtype == np.uint8
  for i, r in enumerate(recs):
    np.testing.assert_array_equal(batch.images[i], np.asarray(Image.open(r.path).convert("RGB")))
    if r.mask_path is None:
      assert not batch.masks[i].any()
    else:
      np.testing.assert_array_equal(batch.masks[i], np.asarray(Image.open(r.mask_path)) > 0)
      assert batch.masks[i].any()
  assert batch.has_mask.all()
  np.testing.assert_array_equal(batch.labels, [1, 1, 0])
  small = mvtec.load_split(recs[:1], 64)
  assert small.images.shape == (1, 64, 64, 3) and small.masks.shape == (1, 64, 64)


# --------------------------------------------------------------------------- synthetic trees


def test_synthetic_tree_records_and_arrays(tmp_path):
  root = make_tree(tmp_path / "widget")
  cat = mvtec.read_category(root)
  assert cat.name == "widget" and cat.layout == "mvtec_ad"
  assert len(cat.train) == 3 and cat.validation == () and len(cat.test) == 5
  assert [r.defect for r in cat.test] == ["dent", "good", "good", "scratch", "scratch"]
  batch = mvtec.load_split(cat.test, (24, 32))
  assert batch.images.shape == (5, 24, 32, 3)
  # Nearest-neighbour resizing of an exactly 2x upsampled mask = pixel repetition.
  src = np.asarray(Image.open(root / "ground_truth" / "scratch" / "001_mask.png")) > 0
  np.testing.assert_array_equal(batch.masks[4], np.kron(src, np.ones((2, 2), bool)))
  assert not batch.masks[1].any() and batch.has_mask.all()
  assert mvtec.list_categories(tmp_path) == ["widget"]


def test_grayscale_images_become_rgb(tmp_path):
  root = make_tree(tmp_path / "g", gray=True)
  cat = mvtec.read_category(root)
  batch = mvtec.load_split(cat.train, (12, 16))
  gray = np.asarray(Image.open(cat.train[0].path))
  assert batch.images.shape == (3, 12, 16, 3)
  for c in range(3):
    np.testing.assert_array_equal(batch.images[0, ..., c], gray)


def test_plain_folder_is_enough_to_fit(tmp_path):
  for i in range(2):
    _png(tmp_path / "goods" / f"a{i}.JPG", np.full((8, 8, 3), 10 * i, np.uint8))
  (tmp_path / "goods" / "notes.txt").write_text("not an image")
  cat = mvtec.read_category(tmp_path / "goods")
  assert cat.layout == "folder" and [r.path.name for r in cat.train] == ["a0.JPG", "a1.JPG"]
  assert cat.test == ()


def test_mvtec_3d_rgb_layout(tmp_path):
  root = tmp_path / "cookie"
  rng = np.random.default_rng(1)
  for split, defect in (("train", "good"), ("test", "good"), ("test", "crack")):
    for i in range(2):
      _png(root / split / defect / "rgb" / f"{i:03d}.png", rng.integers(0, 255, (8, 8, 3), np.uint8))
      mask = np.zeros((8, 8), np.uint8)
      mask[:i + 2, :3] = 255 if defect != "good" else 0
      _png(root / split / defect / "gt" / f"{i:03d}.png", mask)
      (root / split / defect / "xyz").mkdir(exist_ok=True)
  cat = mvtec.read_category(root)
  assert cat.layout == "mvtec_3d" and len(cat.train) == 2 and len(cat.test) == 4
  crack = [r for r in cat.test if r.label == 1]
  assert [r.mask_path for r in crack] == [root / "test" / "crack" / "gt" / f"{i:03d}.png"
                                          for i in range(2)]
  assert all(r.mask_path is None for r in cat.test if r.label == 0)
  batch = mvtec.load_split(crack, 8)
  assert batch.masks[1].sum() == 9


def test_missing_and_empty_folders_are_named(tmp_path):
  with pytest.raises(DataError, match="category folder not found: .*nowhere"):
    mvtec.read_category(tmp_path / "nowhere")
  (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
  with pytest.raises(DataError, match=r"no image in .*train/good \(looked for files ending in "
                     r"png, jpg, jpeg, bmp, tif, tiff"):
    mvtec.read_category(tmp_path / "empty")
  (tmp_path / "nothing").mkdir()
  with pytest.raises(DataError, match="neither an MVTec category"):
    mvtec.read_category(tmp_path / "nothing")
  (tmp_path / "notrain" / "train" / "ok").mkdir(parents=True)
  with pytest.raises(DataError, match="folder not found: .*train/good"):
    mvtec.read_category(tmp_path / "notrain")


def test_missing_ground_truth_is_an_error_unless_allowed(tmp_path):
  root = make_tree(tmp_path / "w")
  for p in sorted((root / "ground_truth").rglob("*"), reverse=True):
    p.unlink() if p.is_file() else p.rmdir()
  (root / "ground_truth").rmdir()
  with pytest.raises(DataError, match=r"missing mask folder .*ground_truth/dent for the anomalous "
                     r"images in .*test/dent \(pass require_masks=False"):
    mvtec.read_category(root)
  cat = mvtec.read_category(root, require_masks=False)
  bad = [r for r in cat.test if r.label == 1]
  assert len(bad) == 3 and all(r.mask_path is None for r in bad)
  batch = mvtec.load_split(cat.test, 8)
  np.testing.assert_array_equal(batch.has_mask, [False, True, True, False, False])


def test_mismatched_mask_name_names_both_files(tmp_path):
  root = make_tree(tmp_path / "w")
  (root / "ground_truth" / "scratch" / "001_mask.png").rename(
      root / "ground_truth" / "scratch" / "001.png")
  with pytest.raises(DataError) as e:
    mvtec.read_category(root)
  msg = str(e.value)
  assert "no mask for" in msg and "test/scratch/001.png" in msg
  assert "expected" in msg and "ground_truth/scratch/001_mask.png" in msg
  assert "matching no image (001.png)" in msg


def test_unreadable_image_and_mask_size_are_named(tmp_path):
  root = make_tree(tmp_path / "w")
  bad = root / "test" / "good" / "001.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
  cat = mvtec.read_category(root)  # scanning only lists files
  with pytest.raises(DataError, match=f"cannot read image {bad}"):
    mvtec.load_split(cat.test, 8)
  truncated = root / "train" / "good" / "000.png"
  truncated.write_bytes(truncated.read_bytes()[:60])
  with pytest.raises(DataError, match=f"cannot read image {truncated}"):
    images.read_image(truncated)
  _png(root / "ground_truth" / "dent" / "000_mask.png", np.zeros((5, 5), np.uint8))
  with pytest.raises(DataError, match=r"mask .*dent/000_mask.png is 5x5 \(HxW\) but image "
                     r".*dent/000.png is 12x16"):
    mvtec.load_split([mvtec.read_category(root).test[0]], 8)


def test_read_mask_handles_palette_and_rgba(tmp_path):
  m = np.zeros((6, 6), np.uint8)
  m[1:3, 2:5] = 1
  pal = Image.fromarray(m, mode="L").convert("P")
  pal.save(tmp_path / "p.png")
  rgba = np.zeros((6, 6, 4), np.uint8)
  rgba[..., 3] = 255  # opaque everywhere: alpha is not the mask
  rgba[1:3, 2:5, 0] = 200
  Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
  np.testing.assert_array_equal(images.read_mask(tmp_path / "p.png"), m > 0)
  np.testing.assert_array_equal(images.read_mask(tmp_path / "a.png"), m > 0)
