"""Running fitted models over data: the one batching helper, record loading, evaluation metrics.

  batched(fn, inputs, batch_size)     pad the last chunk, run, trim: every batched loop of glad_jax
                                      (backbone features, scoring, alignment, protocols) uses it
  load_records / read_training_data / collect_image_paths
                                      image records of a category or folder -> decoded batches
  evaluate(model, test_batch)         image AUROC, pixel AUROC, AUPRO and time per image of anything
                                      with ``score(images, batch_size=, progress=) -> Prediction``
                                      (a `GLAD`, `FunctionalModel`, a protocol's fitted method)

Library code: the CLI (glad_jax/commands.py), the demo, the scripts and the protocols import it;
it imports none of them.
"""

from __future__ import annotations

import pathlib
import sys
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Progress = Callable[[str, Mapping[str, Any]], None]


class Prediction(NamedTuple):
  """Scores of a batch of images.

  Attributes:
    image_scores: array of shape (N,), higher = more anomalous.
    anomaly_maps: array of shape (N, S, S), higher = more anomalous.
    image_labels: bool array of shape (N,), score > calibrated image threshold; None when not calibrated.
    pixel_masks: bool array of shape (N, S, S), map > calibrated pixel threshold; None when not calibrated.
  """

  image_scores: np.ndarray
  anomaly_maps: np.ndarray
  image_labels: np.ndarray | None
  pixel_masks: np.ndarray | None


# ------------------------------------------------------------------------------------------ batching


def _pad_rows(x: Any, rows: int) -> Any:
  """Pads the leading axis of an array to `rows` by repeating its last row (host or device)."""
  m = x.shape[0]
  if m == rows:
    return x
  if isinstance(x, jax.Array):
    return jnp.concatenate([x, jnp.repeat(x[-1:], rows - m, axis=0)])
  x = np.asarray(x)
  return np.concatenate([x, np.repeat(x[-1:], rows - m, axis=0)])


def batched(fn: Callable[[Any], Any], inputs: Any, batch_size: int, *, to_host: bool = True,
            callback: Callable[[int, int], None] | None = None) -> Any:
  """Runs `fn` over chunks of `batch_size` rows of `inputs` and concatenates the outputs.

  Every chunk has the same shape: the last one is padded by repeating its last row, and the outputs
  of the padding rows are dropped, so a jitted `fn` compiles once per batch size (big_vision's
  ``pad_shard_unpad``). With fewer rows than `batch_size` the single chunk is the whole input
  (no padding: scoring one image costs one image).

  Args:
    fn: function of a pytree of arrays with leading axis B -> pytree of arrays with leading axis B.
    inputs: pytree of arrays (an array, a dict {layer: array}, a tuple ...) sharing a leading axis N.
    batch_size: rows per call of `fn` (>= 1).
    to_host: True: outputs as NumPy arrays (one host copy per chunk); False: the chunks stay where
      `fn` computed them and are concatenated there (e.g. features kept on an accelerator).
    callback: optional progress callback(done, total), called after each chunk.

  Returns:
    The pytree `fn` returns, each leaf of leading axis N.

  Raises:
    ValueError: on a non-positive batch size, no input or leading axes of different sizes.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  leaves = jax.tree.leaves(inputs)
  if not leaves:
    raise ValueError("batched: no input array")
  n = int(leaves[0].shape[0])
  if any(int(leaf.shape[0]) != n for leaf in leaves):
    raise ValueError(f"batched: inputs have different leading sizes {[l.shape[0] for l in leaves]}")
  b = min(int(batch_size), n)
  chunks = []
  treedef = None
  for start in range(0, n, b):
    m = min(b, n - start)
    chunk = jax.tree.map(lambda x: _pad_rows(x[start:start + m], b), inputs)
    out = fn(chunk)
    out_leaves, treedef = jax.tree.flatten(out)
    out_leaves = [(np.asarray(v) if to_host else v)[:m] for v in out_leaves]
    chunks.append(out_leaves)
    if callback is not None:
      callback(start + m, n)
  if treedef is None:  # n == 0: nothing ran
    raise ValueError("batched: inputs hold no row (leading size 0)")
  cat = np.concatenate if to_host else jnp.concatenate
  # Concatenate leaf by leaf, dropping each leaf's chunks at once: peak = output + one leaf.
  merged = []
  for i in range(len(chunks[0])):
    merged.append(cat([c[i] for c in chunks]))
    for c in chunks:
      c[i] = None
  return jax.tree.unflatten(treedef, merged)


# ---------------------------------------------------------------------------------------------- data


def _stderr(msg: str) -> None:
  print(msg, file=sys.stderr)


def load_records(records, size: int, *, on_corrupt: str = "stop", progress: Progress | None = None,
                 log: Callable[[str], None] = _stderr):
  """Decodes image records to an `ImageBatch` at size x size.

  Args:
    records: `glad_jax.data.mvtec.ImageRecord`s.
    size: side of the decoded images.
    on_corrupt: 'stop' raises on an unreadable image; 'skip' names it through `log` and leaves it out.
    progress: optional callback(stage, info), stage 'images'.
    log: where notes go (default: stderr).

  Raises:
    ValueError: no record, or every image unreadable; DataError for an unreadable image ('stop').
  """
  from glad_jax.data import images as images_io
  from glad_jax.data import mvtec

  records = list(records)
  if not records:
    raise ValueError("no image to load (empty split)")
  sizes = set()
  good = []
  for r in records:
    try:
      sizes.add(images_io.image_size(r.path))
      good.append(r)
    except images_io.DataError as e:
      if on_corrupt == "stop":
        raise images_io.DataError(f"{e} (use --on-corrupt skip to leave unreadable images out)") from None
      log(f"glad: skipping unreadable image {r.path}")
  if not good:
    raise ValueError("every image was unreadable")
  if len(sizes) > 1:
    log(f"glad: note: the images have {len(sizes)} different sizes; all are resized to {size}x{size}")
  cb = None if progress is None else (lambda done, total: progress("images", {"done": done, "total": total}))
  return mvtec.load_split(good, (size, size), progress=cb)


def read_training_data(path: str, *, holdout: float, seed: int):
  """(category, training records, calibration records) of an MVTec-layout category or a folder of good
  images: validation/good when present, otherwise a seeded `holdout` fraction of train."""
  from glad_jax.data import mvtec

  category = mvtec.read_category(path, require_masks=False)
  train = list(category.train)
  calib = list(category.validation)
  if not calib and holdout > 0:
    rng = np.random.default_rng(seed)
    n_hold = int(round(holdout * len(train)))
    if n_hold >= 1 and len(train) - n_hold >= 2:
      held = set(rng.choice(len(train), n_hold, replace=False).tolist())
      calib = [r for i, r in enumerate(train) if i in held]
      train = [r for i, r in enumerate(train) if i not in held]
  return category, train, calib


def collect_image_paths(inputs: Sequence[str]) -> list[pathlib.Path]:
  """Image files named directly or found in the named folders.

  Raises:
    ValueError: a named file that is not an image; FileNotFoundError: a path that does not exist.
  """
  from glad_jax.data import images as images_io

  paths = []
  for item in inputs:
    p = pathlib.Path(item)
    if p.is_dir():
      paths.extend(images_io.list_images(p))
    elif p.is_file():
      if not images_io.is_image_file(p):
        exts = ", ".join(e.lstrip(".") for e in images_io.IMAGE_EXTENSIONS)
        raise ValueError(f"{p} is not an image file (expected one of: {exts})")
      paths.append(p)
    else:
      raise FileNotFoundError(f"no such file or folder: {p}")
  return paths


# ---------------------------------------------------------------------------------------- evaluation


def metrics_of(test_batch, image_scores: np.ndarray, anomaly_maps: np.ndarray) -> dict[str, Any]:
  """n_test, n_anomalous, image AUROC and, when the batch has non-empty ground truth, pixel AUROC and
  AUPRO (FPR <= 0.3) of scores and maps of a decoded test split (an `ImageBatch`)."""
  from glad_jax import metrics

  labels = np.asarray(test_batch.labels).astype(bool)
  result = {"n_test": int(len(labels)), "n_anomalous": int(labels.sum()),
            "image_auroc": float(metrics.image_auroc(labels, image_scores))}
  with_masks = np.asarray(test_batch.has_mask)  # good images have a known, empty mask
  if bool(np.any(test_batch.masks[with_masks])):
    maps, gts = np.asarray(anomaly_maps)[with_masks], test_batch.masks[with_masks]
    result["pixel_auroc"] = float(metrics.pixel_auroc(gts, maps))
    result["aupro"] = float(metrics.aupro(gts, maps, max_fpr=0.3))
  return result


def evaluate(model, test_batch, *, batch_size: int = 16, progress: Progress | None = None
             ) -> tuple[dict, Any]:
  """Metrics of a fitted model on a decoded test split: image AUROC, pixel AUROC, AUPRO, ms per image.

  Args:
    model: anything with ``score(images, batch_size=..., progress=...) -> Prediction``: a `GLAD`
      (e.g. ``GLAD.load(path)``), a `FunctionalModel` (a registry method + state + backbone), a
      protocol's fitted method.
    test_batch: an `ImageBatch` (`load_records` / `glad_jax.data.mvtec.load_split`).
    batch_size: images per scoring call.
    progress: optional callback.

  Returns:
    (result dict, Prediction).
  """
  # Compile outside the timing: every chunk of `score` has the shape of its first one.
  model.score(test_batch.images[:batch_size], batch_size=batch_size)
  t0 = time.perf_counter()
  pred = model.score(test_batch.images, batch_size=batch_size, progress=progress)
  seconds = time.perf_counter() - t0
  result = metrics_of(test_batch, pred.image_scores, pred.anomaly_maps)
  result["inference_ms_per_image"] = 1000.0 * seconds / len(test_batch.labels)
  # Keep the historical key order: counts, image AUROC, time, then pixel metrics.
  order = ["n_test", "n_anomalous", "image_auroc", "inference_ms_per_image", "pixel_auroc", "aupro"]
  return {k: result[k] for k in order if k in result}, pred


class FunctionalModel:
  """A registry method's state behind the `score(images) -> Prediction` interface of `GLAD`.

  Attributes:
    method: the `glad_jax.methods.Method`.
    state: its fitted state.
    extractor: the backbone (`glad_jax.backbones.FeatureExtractor`) computing the method's layers.
    align: align images on the state's reference first (for states that have one).
  """

  def __init__(self, method, state, extractor, *, align: bool = True):
    from glad_jax import methods

    self.method, self.state, self.extractor = method, state, extractor
    self._fn = jax.jit(methods.images_fn(method, extractor.apply, align=align))

  def image_fn(self) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """Jittable, differentiable images (B, S, S, 3) -> (maps (B, S, S), image scores (B,))."""
    params, state = self.extractor.params, self.state
    return lambda images: self._fn(params, state, images)

  def score(self, images, *, batch_size: int = 16, progress: Progress | None = None) -> Prediction:
    cb = None if progress is None else (lambda done, total: progress("score", {"done": done, "total": total}))
    maps, scores = batched(self.image_fn(), np.asarray(images), batch_size, callback=cb)
    return Prediction(scores, maps, None, None)


__all__ = [
    "FunctionalModel",
    "Prediction",
    "batched",
    "collect_image_paths",
    "evaluate",
    "load_records",
    "metrics_of",
    "read_training_data",
]
