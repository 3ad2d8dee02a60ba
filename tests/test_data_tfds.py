"""TFDS array_record cache: built once, read back with random access, equal to the direct reader."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glad_jax.data import images, mvtec, tfds_cache


def _png(path: Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _tree(root: Path) -> Path:
  rng = np.random.default_rng(0)
  for i in range(3):
    _png(root / "train" / "good" / f"{i:03d}.png", rng.integers(0, 256, (10, 14, 3), np.uint8))
  _png(root / "validation" / "good" / "000.png", rng.integers(0, 256, (10, 14), np.uint8))
  _png(root / "test" / "good" / "000.png", rng.integers(0, 256, (10, 14, 3), np.uint8))
  for i in range(2):
    _png(root / "test" / "hole" / f"{i:03d}.png", rng.integers(0, 256, (10, 14, 3), np.uint8))
    mask = np.zeros((10, 14), np.uint8)
    mask[i:5, 2:7 + i] = 255
    _png(root / "ground_truth" / "hole" / f"{i:03d}_mask.png", mask)
  return root


@pytest.fixture
def decode_counter(monkeypatch):
  calls = []
  real = images.read_image

  def counting(path, size=None):
    calls.append(Path(path))
    return real(path, size)

  monkeypatch.setattr(images, "read_image", counting)
  return calls


def test_cache_built_once_and_equal_to_direct_reader(tmp_path, decode_counter):
  cat = mvtec.read_category(_tree(tmp_path / "thing"))
  cache_dir = tmp_path / "cache"
  messages = []
  splits = tfds_cache.cache_category(cat, (20, 28), cache_dir, progress=messages.append)
  assert len(decode_counter) == 7  # every image decoded exactly once
  assert any("caching" in m for m in messages)
  assert sorted(splits) == ["test", "train", "validation"]

  decode_counter.clear()
  again = tfds_cache.cache_category(cat, (20, 28), cache_dir)
  assert decode_counter == []  # second run: nothing decoded
  for split in ("train", "validation", "test"):
    cached = again[split].to_batch()
    direct = mvtec.load_split(cat.split(split), (20, 28))
    np.testing.assert_array_equal(cached.images, direct.images)
    np.testing.assert_array_equal(cached.masks, direct.masks)
    np.testing.assert_array_equal(cached.labels, direct.labels)
    np.testing.assert_array_equal(cached.has_mask, direct.has_mask)
    assert cached.defects == direct.defects and cached.paths == direct.paths
  ex = again["test"][2]  # random access
  assert ex["file_name"] == "test/hole/001.png" and ex["defect"] == "hole" and ex["label"] == 1


def test_changed_source_gives_a_new_cache(tmp_path, decode_counter):
  root = _tree(tmp_path / "thing")
  cat = mvtec.read_category(root)
  name = tfds_cache.config_name(cat, (8, 8))
  assert name.startswith("thing_8x8_")
  tfds_cache.cache_category(cat, 8, tmp_path / "cache")
  assert tfds_cache.config_name(cat, (8, 9)) != name  # the size is part of the key
  img = root / "train" / "good" / "000.png"
  _png(img, np.zeros((10, 14, 3), np.uint8))
  os.utime(img, ns=(1, 1))  # a different modification time whatever the clock resolution
  cat2 = mvtec.read_category(root)
  assert tfds_cache.config_name(cat2, (8, 8)) != name
  decode_counter.clear()
  batch = tfds_cache.load_cached_split(cat2, "train", 8, tmp_path / "cache")
  assert len(decode_counter) == 7  # rebuilt, not stale
  assert not batch.images[0].any()
