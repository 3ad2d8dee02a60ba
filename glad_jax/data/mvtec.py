"""Anomaly-detection categories on disk: MVTec AD, MVTec 3D-AD (RGB) and plain folders.

Accepted layouts of one category folder ``root``:

* MVTec AD::

    root/train/good/*.png
    root/validation/good/*.png                  (optional)
    root/test/<defect>/*.png                    ('good' = normal, any other name = anomalous)
    root/ground_truth/<defect>/<name>_mask.png  (one per anomalous test image; none for 'good')

* MVTec 3D-AD, RGB part: ``root/<split>/<defect>/rgb/<name>.png`` with masks
  ``root/<split>/<defect>/gt/<name>.png`` (``xyz/`` is ignored).
* A plain folder of good images: ``root/*.png`` -- enough to fit a model (no test split).

Scanning only lists files and returns typed records (`ImageRecord`); `load_split` decodes them to
arrays at a requested size. Every problem is reported as a `DataError` naming the file or folder.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from glad_jax.data import images as _images
from glad_jax.data.images import IMAGE_EXTENSIONS, DataError, Size

GOOD = "good"
SPLITS = ("train", "validation", "test")
Layout = Literal["mvtec_ad", "mvtec_3d", "folder", "elpv"]


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One image of a split.

  Attributes:
    path: the image file.
    label: 0 good, 1 anomalous.
    defect: 'good' or the defect type (the folder name in MVTec layouts).
    mask_path: the ground-truth mask file, or None (good images; anomalous images of data sets
      with image labels only).
  """

  path: Path
  label: int
  defect: str
  mask_path: Path | None = None


@dataclasses.dataclass(frozen=True)
class Category:
  """The records of one category, per split.

  Attributes:
    name: category name (the folder name for MVTec layouts).
    root: the folder that was scanned.
    layout: 'mvtec_ad', 'mvtec_3d', 'folder' or 'elpv'.
    train: training records. Normally all good; the contaminated-training protocol
      (`glad_jax.data.perturb.contaminate`) moves anomalous records here, keeping their label so
      that reports can count them -- fitting code must ignore training labels.
    validation: optional held-out good images (MVTec 3D-AD ships some).
    test: test records (good and anomalous).
  """

  name: str
  root: Path
  layout: Layout
  train: tuple[ImageRecord, ...]
  validation: tuple[ImageRecord, ...] = ()
  test: tuple[ImageRecord, ...] = ()

  def split(self, name: str) -> tuple[ImageRecord, ...]:
    if name not in SPLITS:
      raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    return getattr(self, name)

  @property
  def defect_types(self) -> tuple[str, ...]:
    """Sorted anomalous defect types of the test split."""
    return tuple(sorted({r.defect for r in self.test if r.label == 1}))

  def replace(self, **changes) -> "Category":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ImageBatch:
  """A split decoded to arrays.

  Attributes:
    images: array of shape (N, H, W, 3), uint8 RGB.
    masks: array of shape (N, H, W), bool; all False where no mask exists.
    has_mask: array of shape (N,), bool; True where ``masks[i]`` came from a mask file (and for
      good images, whose mask is known to be empty).
    labels: array of shape (N,), int32 (0 good, 1 anomalous).
    defects: the N defect types.
    paths: the N image files.
  """

  images: np.ndarray
  masks: np.ndarray
  has_mask: np.ndarray
  labels: np.ndarray
  defects: tuple[str, ...]
  paths: tuple[Path, ...]

  def __len__(self) -> int:
    return len(self.labels)


# ----------------------------------------------------------------------------------- scanning


def _subdirs(folder: Path) -> list[Path]:
  return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                key=lambda p: p.name)


def _find_file(folder: Path, stem: str) -> Path | None:
  """The image file ``folder/stem.<ext>`` for any accepted extension (any case), or None."""
  for ext in IMAGE_EXTENSIONS:
    for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
      if candidate.is_file():
        return candidate
  return None


def _unmatched_note(mask_dir: Path, expected: set[str], suffix: str) -> str:
  """Mentions mask files whose names match no image (the usual cause of a 'missing' mask)."""
  if not mask_dir.is_dir():
    return ""
  strays = sorted(p.name for p in mask_dir.iterdir()
                  if _images.is_image_file(p) and p.stem not in expected)
  if not strays:
    return ""
  shown = ", ".join(strays[:5]) + (", ..." if len(strays) > 5 else "")
  return (f"; {mask_dir} holds {len(strays)} mask(s) matching no image ({shown}): a mask must "
          f"be named <image name>{suffix}.png")


def _scan_defect_dir(root: Path, defect_dir: Path,
                     require_masks: bool) -> tuple[list[ImageRecord], bool]:
  """Records of one ``<split>/<defect>`` folder; returns them and whether it is a 3D-AD folder."""
  is_3d = (defect_dir / "rgb").is_dir()
  label = 0 if defect_dir.name == GOOD else 1
  defect = defect_dir.name
  files = _images.list_images(defect_dir / "rgb" if is_3d else defect_dir)
  if label == 0:
    return [ImageRecord(p, 0, GOOD, None) for p in files], is_3d

  if is_3d:
    mask_dir, suffix = defect_dir / "gt", ""
  else:
    mask_dir, suffix = root / "ground_truth" / defect, "_mask"
  if not mask_dir.is_dir():
    if require_masks:
      raise DataError(
          f"missing mask folder {mask_dir} for the anomalous images in {defect_dir} "
          f"(pass require_masks=False to use image labels only)")
    return [ImageRecord(p, 1, defect, None) for p in files], is_3d

  records = []
  stems = {p.stem for p in files}
  for p in files:
    mask = _find_file(mask_dir, p.stem + suffix)
    if mask is None and require_masks:
      raise DataError(f"no mask for {p}: expected {mask_dir / (p.stem + suffix)}.png"
                      + _unmatched_note(mask_dir, {s + suffix for s in stems}, suffix))
    records.append(ImageRecord(p, 1, defect, mask))
  return records, is_3d


def _scan_split(root: Path, split: str, require_masks: bool) -> tuple[list[ImageRecord], bool]:
  folder = root / split
  defect_dirs = _subdirs(folder)
  if not defect_dirs:
    raise DataError(f"no class folder in {folder} (expected e.g. {folder / GOOD})")
  records: list[ImageRecord] = []
  any_3d = False
  for d in defect_dirs:
    recs, is_3d = _scan_defect_dir(root, d, require_masks)
    records += recs
    any_3d |= is_3d
  return records, any_3d


def read_category(root: str | os.PathLike, *, require_masks: bool = True,
                  name: str | None = None) -> Category:
  """Scans one category folder (MVTec AD, MVTec 3D-AD RGB, or a plain folder of good images).

  Args:
    root: the category folder (e.g. ``.../mvtec_anomaly_detection/bottle``), or a folder that
      directly holds good images.
    require_masks: if True (default), every anomalous image must have its mask and a missing
      one is an error; if False, missing masks give records with ``mask_path=None``.
    name: category name; defaults to the folder name.

  Returns:
    A `Category`. The training split must hold only 'good' images.

  Raises:
    DataError: missing or empty folder, anomalous training images, missing or misnamed mask.
  """
  root = Path(root)
  if not root.exists():
    raise DataError(f"category folder not found: {root}")
  if not root.is_dir():
    raise DataError(f"not a folder: {root}")
  name = name or root.name

  if not (root / "train").is_dir():
    if any(_images.is_image_file(p) for p in root.iterdir()):
      train = tuple(ImageRecord(p, 0, GOOD, None) for p in _images.list_images(root))
      return Category(name, root, "folder", train)
    exts = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    raise DataError(f"{root} is neither an MVTec category (no train/ folder) nor a folder of "
                    f"images (looked for files ending in {exts})")

  splits: dict[str, tuple[ImageRecord, ...]] = {}
  layout_3d = False
  for split in SPLITS:
    if split != "train" and not (root / split).is_dir():
      splits[split] = ()
      continue
    if split == "train" and not (root / "train" / GOOD).is_dir():
      raise DataError(f"folder not found: {root / 'train' / GOOD} (training images of an "
                      f"MVTec category live in train/good)")
    records, is_3d = _scan_split(root, split, require_masks)
    layout_3d |= is_3d
    splits[split] = tuple(records)

  bad_train = [r.path for r in splits["train"] if r.label != 0]
  if bad_train:
    raise DataError(f"training images must be good; {root / 'train'} has anomalous folder(s): "
                    + ", ".join(sorted({str(p.parent) for p in bad_train})))
  return Category(name, root, "mvtec_3d" if layout_3d else "mvtec_ad", splits["train"],
                  splits["validation"], splits["test"])


def list_categories(root: str | os.PathLike) -> list[str]:
  """Names of the category folders (those with a ``train/`` folder) inside a data set folder."""
  root = Path(root)
  if not root.is_dir():
    raise DataError(f"data set folder not found: {root}")
  names = [p.name for p in _subdirs(root) if (p / "train").is_dir()]
  if not names:
    raise DataError(f"no category folder (one with a train/ subfolder) in {root}")
  return names


# ------------------------------------------------------------------------------------ loading


def _check_mask_size(record: ImageRecord) -> None:
  img_hw = _images.image_size(record.path)
  mask_hw = _images.image_size(record.mask_path)
  if img_hw != mask_hw:
    raise DataError(f"mask {record.mask_path} is {mask_hw[0]}x{mask_hw[1]} (HxW) but image "
                    f"{record.path} is {img_hw[0]}x{img_hw[1]}")


def load_split(records: Sequence[ImageRecord], size: Size, *, num_workers: int = 1,
               progress: Callable[[int, int], None] | None = None) -> ImageBatch:
  """Decodes records to arrays at one size.

  Args:
    records: the records of a split (e.g. ``category.test``).
    size: (height, width) or an int for a square; images use antialiased bilinear resizing,
      masks nearest neighbour.
    num_workers: decoding threads.
    progress: optional ``progress(done, total)`` callback (counts images).

  Returns:
    An `ImageBatch`.

  Raises:
    DataError: unreadable image or mask, or a mask whose size differs from its image's.
  """
  hw = _images.as_hw(size)
  records = list(records)
  imgs = _images.read_images([r.path for r in records], hw, num_workers=num_workers,
                             progress=progress)
  masks = np.zeros((len(records),) + hw, dtype=bool)
  has_mask = np.zeros(len(records), dtype=bool)
  for i, r in enumerate(records):
    if r.mask_path is not None:
      _check_mask_size(r)
      masks[i] = _images.read_mask(r.mask_path, hw)
      has_mask[i] = True
    elif r.label == 0:
      has_mask[i] = True  # a good image's mask is known: empty
  return ImageBatch(
      images=imgs, masks=masks, has_mask=has_mask,
      labels=np.array([r.label for r in records], dtype=np.int32),
      defects=tuple(r.defect for r in records), paths=tuple(r.path for r in records))
