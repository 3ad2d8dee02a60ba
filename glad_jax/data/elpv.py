"""The elpv solar-cell data set (PyPI ``elpv-dataset``) as an anomaly-detection category.

2,624 electroluminescence images of solar cells, 300x300 grayscale, each with the probability
that an expert judged it defective (0, 1/3, 2/3 or 1) and the cell type (mono or poly); image
labels only, no pixel masks. Data: CC BY-NC-SA 4.0 (Deitsch et al., 2019).

The split used here (documented, deterministic):

* one category per cell type (``cell_type='mono'`` or ``'poly'``): the two types look very
  different, as two MVTec categories would. ``'all'`` mixes them.
* good = probability 0 (functional cells); anomalous = probability >= ``anomalous_from``
  (default 2/3: "likely" and "certainly" defective); the ambiguous 1/3 cells are left out by
  default (``uncertain='exclude'``) or counted as anomalous (``'anomalous'``).
* the functional cells are shuffled with ``seed`` and a fraction ``test_fraction`` (default
  0.25) is held out for the test split; the remaining ones form the training split.
  Counts with the defaults: mono 441 train / 147 + 369 test, poly 690 train / 230 + 452 test.
* ``max_train``, ``max_test_good`` and ``max_test_anomalous`` keep a seeded random subset of
  each part (for demos and CI), chosen after the split, so that a subset never mixes roles.

Records point at the PNG files inside the installed package, so `mvtec.load_split` and the
TFDS cache read them like any other category (grayscale is converted to RGB).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np

from glad_jax.data.images import DataError
from glad_jax.data.mvtec import GOOD, Category, ImageRecord

CellType = Literal["mono", "poly", "all"]


@dataclasses.dataclass(frozen=True)
class ElpvCell:
  """One row of the elpv label file."""

  path: Path
  probability: float
  cell_type: str


def _package_dir() -> Path:
  try:
    import elpv_dataset  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - it is a declared dependency
    raise DataError("the elpv data set needs the `elpv-dataset` package "
                    "(pip install elpv-dataset)") from e
  return Path(elpv_dataset.__file__).parent / "data"


def read_labels(labels_file: str | Path | None = None) -> list[ElpvCell]:
  """Parses the elpv label file (``<path> <probability> <type>`` per line).

  Args:
    labels_file: the ``labels.csv`` file; default: the one of the installed package.

  Returns:
    one `ElpvCell` per line, image paths resolved next to the label file.
  """
  path = Path(labels_file) if labels_file is not None else _package_dir() / "labels.csv"
  if not path.is_file():
    raise DataError(f"elpv label file not found: {path}")
  cells = []
  for n, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 3:
      raise DataError(f"{path}:{n}: expected '<path> <probability> <type>', got {line!r}")
    try:
      prob = float(parts[1])
    except ValueError:
      raise DataError(f"{path}:{n}: bad probability {parts[1]!r}") from None
    cells.append(ElpvCell(path.parent / parts[0], prob, parts[2]))
  if not cells:
    raise DataError(f"elpv label file {path} is empty")
  return cells


def _defect_name(probability: float) -> str:
  """'good' or 'defective_<percent>' (e.g. defective_67 for probability 2/3)."""
  return GOOD if probability == 0 else f"defective_{int(round(100 * probability))}"


def _take(rng: np.random.Generator, items: list, limit: int | None) -> list:
  if limit is None or limit >= len(items):
    return items
  if limit < 0:
    raise ValueError(f"subset sizes must be >= 0, got {limit}")
  keep = np.sort(rng.choice(len(items), size=limit, replace=False))
  return [items[i] for i in keep]


def elpv_category(cell_type: CellType = "mono", *, test_fraction: float = 0.25,
                  anomalous_from: float = 2.0 / 3.0,
                  uncertain: Literal["exclude", "anomalous"] = "exclude", seed: int = 0,
                  max_train: int | None = None, max_test_good: int | None = None,
                  max_test_anomalous: int | None = None,
                  labels_file: str | Path | None = None) -> Category:
  """The elpv data set as a `Category` (see the module docstring for the split).

  Args:
    cell_type: 'mono', 'poly' or 'all'.
    test_fraction: fraction of the functional cells held out for testing.
    anomalous_from: probabilities >= this (minus a rounding tolerance) are anomalous.
    uncertain: what to do with 0 < probability < ``anomalous_from``: 'exclude' them or count
      them as 'anomalous'.
    seed: seeds the split and the subsets.
    max_train, max_test_good, max_test_anomalous: optional subset sizes.
    labels_file: optional label file (default: the installed package's).

  Returns:
    A `Category` named ``elpv_<cell_type>`` with train (good) and test splits, no masks.
  """
  if cell_type not in ("mono", "poly", "all"):
    raise ValueError(f"cell_type must be 'mono', 'poly' or 'all', got {cell_type!r}")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  if not 0.0 < anomalous_from <= 1.0:
    raise ValueError(f"anomalous_from must be in (0, 1], got {anomalous_from}")
  if uncertain not in ("exclude", "anomalous"):
    raise ValueError(f"uncertain must be 'exclude' or 'anomalous', got {uncertain!r}")

  cells = [c for c in read_labels(labels_file) if cell_type == "all" or c.cell_type == cell_type]
  if not cells:
    raise DataError(f"no elpv cell of type {cell_type!r}")
  good = [c for c in cells if c.probability == 0]
  bad = [c for c in cells if c.probability >= anomalous_from - 1e-9
         or (uncertain == "anomalous" and c.probability > 0)]

  rng = np.random.default_rng(seed)
  order = rng.permutation(len(good))
  n_test = int(round(test_fraction * len(good)))
  test_good = [good[i] for i in np.sort(order[:n_test])]
  train = [good[i] for i in np.sort(order[n_test:])]
  train = _take(rng, train, max_train)
  test_good = _take(rng, test_good, max_test_good)
  bad = _take(rng, bad, max_test_anomalous)
  if not train:
    raise ValueError("the elpv training split is empty (check max_train / test_fraction)")

  def record(c: ElpvCell, label: int) -> ImageRecord:
    return ImageRecord(c.path, label, _defect_name(c.probability), None)

  # Test split: good first, then anomalous, each in label-file order (like MVTec's folders).
  test = [record(c, 0) for c in test_good] + [record(c, 1) for c in bad]
  root = (Path(labels_file) if labels_file is not None else _package_dir() / "labels.csv").parent
  return Category(f"elpv_{cell_type}", root, "elpv", tuple(record(c, 0) for c in train), (),
                  tuple(test))


__all__ = ["ElpvCell", "elpv_category", "read_labels"]
