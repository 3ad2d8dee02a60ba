"""Image and mask files: listing, decoding, resizing, with errors that name the file.

Every image comes out as uint8 RGB of shape (H, W, 3) (grayscale, palette, 16-bit and RGBA files
are converted) and every mask as bool of shape (H, W) (any non-zero pixel is anomalous, as in
MVTec's 0/255 masks). Sizes are (height, width) or one int for a square.

Images are resized with Pillow's antialiased bilinear filter (what torchvision's default
``Resize`` does on PIL images, hence what the paper's pipeline saw); masks with nearest neighbour,
so that they stay binary and never grow.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Lower-case suffixes recognised as images, in the order error messages list them.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

Size = int | tuple[int, int]


class DataError(ValueError):
  """A data file or folder is missing, empty, unreadable or inconsistent (the message names it)."""


def as_hw(size: Size) -> tuple[int, int]:
  """Normalises a size given as one int (square) or (height, width); checks it is positive."""
  if isinstance(size, (int, np.integer)):
    hw = (int(size), int(size))
  else:
    try:
      hw = tuple(int(s) for s in size)
    except TypeError:
      raise ValueError(f"size must be an int or (height, width), got {size!r}") from None
  if len(hw) != 2 or min(hw) <= 0:
    raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
  return hw  # type: ignore[return-value]


def is_image_file(path: Path) -> bool:
  return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike) -> list[Path]:
  """Image files directly inside ``folder``, sorted by name.

  Raises:
    DataError: the folder does not exist, is not a folder, or holds no image file (the message
      lists the extensions looked for).
  """
  folder = Path(folder)
  if not folder.exists():
    raise DataError(f"folder not found: {folder}")
  if not folder.is_dir():
    raise DataError(f"not a folder: {folder}")
  files = sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)
  if not files:
    exts = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    raise DataError(f"no image in {folder} (looked for files ending in {exts}, any case)")
  return files


def _open(path: Path) -> Image.Image:
  """Opens and fully decodes one file, turning every Pillow/OS failure into a DataError."""
  if not path.is_file():
    raise DataError(f"image file not found: {path}")
  try:
    with Image.open(path) as im:
      im.load()  # decode now: a truncated file fails here, inside the try
      return im.copy()
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise DataError(f"cannot read image {path}: {e}") from e


def _to_rgb(im: Image.Image) -> Image.Image:
  if im.mode == "RGB":
    return im
  if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    # 16-bit / float grayscale (e.g. some TIFFs): rescale the range to 8 bits, not clip it.
    a = np.asarray(im, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    a = np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
    im = Image.fromarray(np.round(a).astype(np.uint8), mode="L")
  # "RGBA" drops alpha, "L"/"1"/"LA"/"CMYK"/"YCbCr" convert to three channels.
  return im.convert("RGB")


def _resize(im: Image.Image, size: tuple[int, int] | None, resample: int) -> Image.Image:
  if size is None or (im.height, im.width) == size:
    return im
  return im.resize((size[1], size[0]), resample=resample)


def read_image(path: str | os.PathLike, size: Size | None = None) -> np.ndarray:
  """Decodes one image file to RGB.

  Args:
    path: an image file (png, jpg, jpeg, bmp, tif, tiff).
    size: optional output size, (height, width) or an int for a square.

  Returns:
    array of shape (H, W, 3), dtype uint8.

  Raises:
    DataError: missing, unreadable or corrupt file (the message names it).
  """
  hw = None if size is None else as_hw(size)
  im = _to_rgb(_open(Path(path)))
  return np.asarray(_resize(im, hw, Image.BILINEAR), dtype=np.uint8)


def read_mask(path: str | os.PathLike, size: Size | None = None) -> np.ndarray:
  """Decodes one mask file: any non-zero pixel (any channel) is True.

  Args:
    path: a mask image (MVTec: 0/255 PNG).
    size: optional output size; resized with nearest neighbour.

  Returns:
    array of shape (H, W), dtype bool.
  """
  hw = None if size is None else as_hw(size)
  im = _open(Path(path))
  if im.mode not in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F"):
    im = im.convert("RGB")  # palette / RGB(A) masks: alpha is not part of the mask
  a = np.asarray(im)
  binary = a.any(axis=-1) if a.ndim == 3 else a != 0
  if hw is not None and binary.shape != hw:
    binary = np.asarray(
        Image.fromarray(binary.astype(np.uint8) * 255).resize((hw[1], hw[0]), Image.NEAREST)) > 0
  return binary


def image_size(path: str | os.PathLike) -> tuple[int, int]:
  """(height, width) of an image file, from its header only."""
  path = Path(path)
  try:
    with Image.open(path) as im:
      return im.height, im.width
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise DataError(f"cannot read image {path}: {e}") from e


def read_images(paths: Sequence[str | os.PathLike], size: Size, *, num_workers: int = 1,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """Decodes many images at one size.

  Args:
    paths: image files.
    size: output size, (height, width) or an int for a square (required: the files may differ).
    num_workers: threads used to decode (Pillow releases the GIL while decoding).
    progress: optional callback ``progress(done, total)`` called after each image.

  Returns:
    array of shape (N, H, W, 3), dtype uint8.
  """
  hw = as_hw(size)
  out = np.empty((len(paths), hw[0], hw[1], 3), dtype=np.uint8)
  if num_workers <= 1:
    for i, p in enumerate(paths):
      out[i] = read_image(p, hw)
      if progress is not None:
        progress(i + 1, len(paths))
    return out
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    for i, img in enumerate(pool.map(lambda p: read_image(p, hw), paths)):
      out[i] = img
      if progress is not None:
        progress(i + 1, len(paths))
  return out
