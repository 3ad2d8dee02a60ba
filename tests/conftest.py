"""Shared fixtures: a tiny synthetic MVTec-layout category and tiny GLAD configurations."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TIRE = SHARED / "data" / "mvtec3d_tire_rgb"


def texture(rng: np.random.Generator, size: int = 64) -> np.ndarray:
  """A 'good' image: smooth stripes with mild noise and a random phase (uint8 RGB)."""
  yy, xx = np.mgrid[0:size, 0:size]
  phase = rng.uniform(0, 2 * np.pi)
  base = 128 + 60 * np.sin(2 * np.pi * xx / 16 + phase)
  img = base[..., None] + rng.normal(0, 6, (size, size, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


def with_defect(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Pastes a dark square (the anomaly); returns (image, mask)."""
  size = img.shape[0]
  s = size // 5
  y, x = rng.integers(s, size - 2 * s, size=2)
  out = img.copy()
  out[y:y + s, x:x + s] = 10
  mask = np.zeros(img.shape[:2], bool)
  mask[y:y + s, x:x + s] = True
  return out, mask


def make_category(root: pathlib.Path, n_train: int = 10, n_good: int = 3, n_bad: int = 3, seed: int = 0,
                  size: int = 64) -> pathlib.Path:
  rng = np.random.default_rng(seed)
  for sub in ("train/good", "test/good", "test/square", "ground_truth/square"):
    (root / sub).mkdir(parents=True, exist_ok=True)
  for i in range(n_train):
    Image.fromarray(texture(rng, size)).save(root / "train/good" / f"{i:03d}.png")
  for i in range(n_good):
    Image.fromarray(texture(rng, size)).save(root / "test/good" / f"{i:03d}.png")
  for i in range(n_bad):
    img, mask = with_defect(texture(rng, size), rng)
    Image.fromarray(img).save(root / "test/square" / f"{i:03d}.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(root / "ground_truth/square" / f"{i:03d}_mask.png")
  return root


def load_script(name: str, monkeypatch=None):
  """Imports scripts/<name>.py as a module; with `monkeypatch`, also registers it in sys.modules for the
  test (dataclasses defined in the script look their module up there)."""
  spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  if monkeypatch is not None:
    monkeypatch.setitem(sys.modules, spec.name, module)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def category(tmp_path) -> pathlib.Path:
  return make_category(tmp_path / "cat")


@pytest.fixture
def tiny_config():
  from glad_jax.config import GLADConfig

  return GLADConfig(backbone="resnet_tiny", image_size=64, n_components=4, max_iter=20)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled executables after each test module.

  Every XLA:CPU executable keeps a few memory mappings for its code until its cache entry goes;
  one process running the whole suite accumulated ~5,000 per module and crashed inside the
  compiler (segfault / abort) once it reached the kernel's vm.max_map_count (65,530 by default).
  """
  yield
  import gc

  import jax

  jax.clear_caches()
  gc.collect()
