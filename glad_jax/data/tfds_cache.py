"""A TFDS cache of decoded categories: decode and resize the images once, not at every run.

`cache_category(category, size, cache_dir)` writes every split of a `Category` (MVTec layouts,
plain folders, elpv) at the working resolution to ``array_record`` files through a TFDS
``GeneratorBasedBuilder``, then reads them back with random access through
``builder.as_data_source()``. TensorFlow is not needed: all features are
``tfds.features.Tensor``/``Text`` (``tfds.features.Image`` would need it).

Each example holds ``image`` uint8 (H, W, 3), ``mask`` bool (H, W), ``has_mask`` bool,
``label`` int32, ``defect`` and ``file_name`` (relative to the category root). Arrays are
zlib-compressed, so the cache is a fraction of the decoded size.

The cache is keyed by the category name, the size and a fingerprint of the source files
(relative paths, sizes and modification times of images and masks, labels and defect types):
editing, adding or removing a file gives a new key, hence a rebuild, never stale data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from glad_jax.data import images as _images
from glad_jax.data.images import DataError, Size
from glad_jax.data.mvtec import SPLITS, Category, ImageBatch, ImageRecord

_ENCODING = tfds.features.Encoding.ZLIB


def _relative(path: Path, root: Path) -> str:
  try:
    return path.relative_to(root).as_posix()
  except ValueError:  # a record outside the root (e.g. after contamination): keep it absolute
    return path.as_posix()


def fingerprint(category: Category, size: tuple[int, int]) -> str:
  """Hex digest identifying the source files of a category and the cached size."""
  h = hashlib.sha256()
  h.update(f"v1|{category.layout}|{size[0]}x{size[1]}".encode())
  for split in SPLITS:
    for r in category.split(split):
      h.update(f"|{split}|{r.label}|{r.defect}".encode())
      for p in (r.path, r.mask_path):
        if p is None:
          h.update(b"|-")
          continue
        try:
          st = os.stat(p)
        except OSError as e:
          raise DataError(f"cannot read {p}: {e}") from e
        h.update(f"|{_relative(p, category.root)}|{st.st_size}|{st.st_mtime_ns}".encode())
  return h.hexdigest()


def config_name(category: Category, size: tuple[int, int]) -> str:
  """Name of the cache of one category at one size: ``<name>_<H>x<W>_<fingerprint[:12]>``."""
  safe = re.sub(r"[^\w\-.+]", "_", category.name) or "category"
  return f"{safe}_{size[0]}x{size[1]}_{fingerprint(category, size)[:12]}"


class CategoryCache(tfds.core.GeneratorBasedBuilder):
  """TFDS builder writing one category at one size (one builder config per cache key)."""

  name = "glad_category_cache"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Decoded, resized images, masks, labels, defects, file names."}
  # Nothing is downloaded, so there is no checksums file to locate next to the code. (Looking
  # for it also trips TFDS on the optional `importlib_resources` package when installed as a
  # library, as here.)
  code_path = None

  def __init__(self, *, category: Category, size: Size, data_dir: str | os.PathLike,
               progress: Callable[[str], None] | None = None):
    self._category = category
    self._size = _images.as_hw(size)
    self._progress = progress
    config = tfds.core.BuilderConfig(
        name=config_name(category, self._size),
        description=f"{category.name} ({category.layout}) from {category.root} at "
                    f"{self._size[0]}x{self._size[1]}")
    super().__init__(config=config, data_dir=os.fspath(data_dir), file_format="array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    h, w = self._size
    return tfds.core.DatasetInfo(
        builder=self,
        description="glad_jax cache of a decoded anomaly-detection category.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(h, w, 3), dtype=np.uint8, encoding=_ENCODING),
            "mask": tfds.features.Tensor(shape=(h, w), dtype=np.bool_, encoding=_ENCODING),
            "has_mask": tfds.features.Tensor(shape=(), dtype=np.bool_),
            "label": tfds.features.Tensor(shape=(), dtype=np.int32),
            "defect": tfds.features.Text(),
            "file_name": tfds.features.Text(),
        }),
        disable_shuffling=True,  # keep the records' order: the cache equals the direct reader
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the source is a local folder
    return {s: self._generate_examples(self._category.split(s)) for s in SPLITS
            if self._category.split(s)}

  def _generate_examples(self, records: Sequence[ImageRecord]) -> Iterator[tuple[int, dict]]:
    root = self._category.root
    for i, r in enumerate(records):
      # Looked up on the module at call time, so tests can count decodes by patching it.
      img = _images.read_image(r.path, self._size)
      if r.mask_path is not None:
        mask = _images.read_mask(r.mask_path, self._size)
      else:
        mask = np.zeros(self._size, dtype=bool)
      yield i, {
          "image": img,
          "mask": mask,
          "has_mask": r.mask_path is not None or r.label == 0,
          "label": np.int32(r.label),
          "defect": r.defect,
          "file_name": _relative(r.path, root),
      }

  # TFDS prints these two messages on stdout; route them to the caller's callback instead.
  def _log_download_bytes(self) -> None:
    if self._progress is not None:
      self._progress(f"caching {self.builder_config.description} to {self.data_dir}")

  def _log_download_done(self) -> None:
    if self._progress is not None:
      self._progress(f"cached to {self.data_dir}")


class _DropCustomConfigWarning(logging.Filter):
  """Hides TFDS's "Using custom data configuration" warning: every cache key is custom."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


@contextlib.contextmanager
def _quiet_custom_config():
  logger = logging.getLogger("absl")
  filt = _DropCustomConfigWarning()
  logger.addFilter(filt)
  try:
    yield
  finally:
    logger.removeFilter(filt)


@contextlib.contextmanager
def _progress_bars(enable: bool):
  """Temporarily shows or hides TFDS's tqdm bars, restoring the previous state."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  previous = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(enable)
  try:
    yield
  finally:
    tfds.display_progress_bar(previous)


@dataclasses.dataclass(frozen=True)
class CachedSplit:
  """Random access to one cached split.

  Attributes:
    source: the TFDS ``ArrayRecordDataSource`` (``source[i]`` -> dict of NumPy arrays/bytes).
    root: the category root, to turn stored file names back into paths.
  """

  source: object
  root: Path

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    """Example ``i`` with text fields decoded to str."""
    ex = dict(self.source[i])
    for k in ("defect", "file_name"):
      v = ex[k]
      ex[k] = v.decode() if isinstance(v, bytes) else str(v)
    return ex

  def to_batch(self, indices: Sequence[int] | None = None) -> ImageBatch:
    """Reads examples (all by default) into an `ImageBatch` (same as `mvtec.load_split`)."""
    idx = list(range(len(self))) if indices is None else list(indices)
    exs = [self[i] for i in idx]
    if not exs:
      raise ValueError("no example to read")
    return ImageBatch(
        images=np.stack([e["image"] for e in exs]),
        masks=np.stack([e["mask"] for e in exs]).astype(bool),
        has_mask=np.array([bool(e["has_mask"]) for e in exs]),
        labels=np.array([e["label"] for e in exs], dtype=np.int32),
        defects=tuple(e["defect"] for e in exs),
        paths=tuple(self.root / e["file_name"] for e in exs))


def cache_category(category: Category, size: Size, cache_dir: str | os.PathLike, *,
                   progress: Callable[[str], None] | None = None,
                   progress_bars: bool = False) -> dict[str, CachedSplit]:
  """Builds the cache of a category at one size if it is not there yet, and opens it.

  Args:
    category: a `Category` (from `mvtec.read_category`, `elpv.elpv_category`, ...).
    size: working resolution, (height, width) or an int for a square.
    cache_dir: folder of the TFDS data (one sub-folder per builder/config/version).
    progress: optional callback receiving one-line messages (building, done).
    progress_bars: show TFDS's tqdm progress bars while building.

  Returns:
    dict split name -> `CachedSplit`, for the non-empty splits.

  Raises:
    DataError: a source file is missing or unreadable (the message names it).
  """
  with _quiet_custom_config():
    builder = CategoryCache(category=category, size=size, data_dir=cache_dir, progress=progress)
  with _progress_bars(progress_bars):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  sources = builder.as_data_source()
  return {name: CachedSplit(src, category.root) for name, src in sources.items()}


def load_cached_split(category: Category, split: str, size: Size,
                      cache_dir: str | os.PathLike, **kwargs) -> ImageBatch:
  """`mvtec.load_split(category.<split>, size)` through the cache (built on first use)."""
  if not category.split(split):
    raise ValueError(f"split {split!r} of {category.name} is empty")
  return cache_category(category, size, cache_dir, **kwargs)[split].to_batch()


__all__ = [
    "CachedSplit",
    "CategoryCache",
    "cache_category",
    "config_name",
    "fingerprint",
    "load_cached_split",
]
