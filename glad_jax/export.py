"""A fitted GLAD model as one serialized StableHLO function (`jax.export`), runnable without glad_jax.

    blob = export_scorer(model, platforms=("cpu", "cuda"))      # bytes of an exported-scorer file
    path = save_exported(model, "tire.gladx", platforms=("cpu",))  # the same, written atomically
    scorer = load_exported("tire.gladx"); pred = scorer(images)  # uint8 (B, S, S, 3) -> ExportedPrediction

What is exported: the model's fused scoring function (`GLAD.score_fn`: alignment on the reference when the model
aligns, backbone, sparse local-mixture log-likelihoods, layer fusion, mask, q-quantile; paper Section 3.3) with every
parameter closed over as a constant, followed by the calibrated decisions. Input: uint8 images of shape (b, S, S, 3)
with a symbolic batch dimension b (any b >= 1 at run time; S = the model's image_size). Outputs, a dict:

    image_scores       float32 (b,)       raw image score, higher = more anomalous
    normalised_scores  float32 (b,)       glad_jax.regions.normalise_scores (threshold -> 0.5); NaN if uncalibrated
    anomaly_maps       float32 (b, S, S)  in the frame of the input images
    image_labels       bool    (b,)       image_scores > image_threshold (all False if uncalibrated)
    pixel_masks        bool    (b, S, S)  anomaly_maps > pixel_threshold (all False if uncalibrated)

Inside, the batch runs in windows of a fixed size (`chunk`, default 8; the last window ends at the last image,
padded with zero images when b < chunk; one `lax.while_loop`): the sparse scorer sizes its blocks from the batch size in Python, which a symbolic batch cannot
do, and a fixed chunk also bounds the memory of one call.

File format (format_version 1): a zip archive, written to a temporary file and renamed, holding
    manifest.json   format name and version, glad_jax and jax versions, the GLADConfig, image_size, platforms,
                    chunk, image_threshold, pixel_threshold, good_score_median, input and output descriptions
    scorer.bin      `jax.export.Exported.serialize()` (StableHLO + calling convention; one module, multi-platform
                    when several platforms are named: the platform is chosen when it is called)

A process with only jax and numpy runs it (scripts/run_exported.py, quoted in README "Deploying"):

    with zipfile.ZipFile(path) as z:
      manifest = json.loads(z.read("manifest.json"))
      exported = jax.export.deserialize(bytearray(z.read("scorer.bin")))
    outputs = jax.jit(exported.call)(images)          # images: uint8 (B, S, S, 3), S = manifest["image_size"]

References: GLAD, Artola et al., WACV 2023, Section 3.3 (scores); jax.export (StableHLO serialization).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import time
import zipfile
from typing import Any, NamedTuple, Sequence

import numpy as np

FORMAT = "glad_jax.exported_scorer"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODULE_NAME = "scorer.bin"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_CHUNK = 8
OUTPUTS = {
    "image_scores": "float32 (b,), higher = more anomalous",
    "normalised_scores": "float32 (b,), 1 / (1 + exp(-(s - t) / (t - m))), t = image_threshold, "
                         "m = good_score_median; NaN when not calibrated",
    "anomaly_maps": "float32 (b, S, S), in the frame of the input images",
    "image_labels": "bool (b,), image_scores > image_threshold (all False when not calibrated)",
    "pixel_masks": "bool (b, S, S), anomaly_maps > pixel_threshold (all False when not calibrated)",
}


class ExportError(ValueError):
  """An exported-scorer file is missing, not one, or of a format version this glad_jax cannot read."""


class ExportedPrediction(NamedTuple):
  """NumPy outputs of an exported scorer (None where the model was not calibrated).

  Attributes:
    image_scores: array of shape (N,).
    normalised_scores: array of shape (N,) in (0, 1) (threshold -> 0.5), or None.
    anomaly_maps: array of shape (N, S, S).
    image_labels: bool array of shape (N,), or None.
    pixel_masks: bool array of shape (N, S, S), or None.
  """

  image_scores: np.ndarray
  normalised_scores: np.ndarray | None
  anomaly_maps: np.ndarray
  image_labels: np.ndarray | None
  pixel_masks: np.ndarray | None


# -------------------------------------------------------------------------------------------- export


def check_platforms(platforms: Sequence[str] | str) -> tuple[str, ...]:
  """('cpu',) from 'cpu' or ['cpu']; ('cpu', 'cuda') from 'cpu,cuda'. Unknown or repeated names raise ValueError."""
  if isinstance(platforms, str):
    platforms = [p.strip() for p in platforms.split(",") if p.strip()]
  out = tuple(str(p).lower() for p in platforms)
  if not out:
    raise ValueError(f"no platform given: name one or more of {', '.join(PLATFORMS)}")
  bad = [p for p in out if p not in PLATFORMS]
  if bad:
    raise ValueError(f"unknown platform(s) {', '.join(bad)}: choose from {', '.join(PLATFORMS)}")
  if len(set(out)) != len(out):
    raise ValueError(f"platform named twice in {','.join(out)}")
  return out


def scorer_fn(model, *, chunk: int = DEFAULT_CHUNK):
  """The function that gets exported: uint8 images (b, S, S, 3) -> the dict of outputs in the module docstring.

  Works for a symbolic b. Parameters and thresholds are Python/array constants of the closure.

  Args:
    model: a fitted `glad_jax.model.GLAD`.
    chunk: fixed inner batch size (every window scores exactly `chunk` images).
  """
  import jax
  import jax.numpy as jnp

  from glad_jax import regions

  if not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
  chunk = int(chunk)
  model.score_fn()  # validates that the model is fitted
  from glad_jax import methods

  images_fn = methods.images_fn(methods.get_method("glad"), model.extractor.apply)
  params, state = model.extractor.params, model.state

  def fused(images):
    # The parameters become constants of the exported module. The barrier keeps XLA from constant-folding what is
    # computed from them (the reference pyramid and gradients of the alignment): folded on the host, those round
    # differently from the compiled kernels that in-process scoring runs, and the iterative alignment amplifies it.
    p, st = jax.lax.optimization_barrier((params, state))
    maps, scores = images_fn(p, st, images)
    return scores, maps
  image_threshold = _optional_float(model.image_threshold)
  pixel_threshold = _optional_float(model.pixel_threshold)
  median = _optional_float(getattr(model, "good_score_median", None))
  scale = None if image_threshold is None or median is None else regions.spread(image_threshold, median)

  def fn(images):
    b, rest = images.shape[0], images.shape[1:]
    # Every window holds exactly `chunk` images: batched XLA kernels round differently for a batch of one, and
    # alignment (an iterative solve with a convergence test) amplifies that round-off, so a fixed window size keeps
    # the scores equal to in-process scoring (which pads its last chunk). Under export b is symbolic: the input is
    # padded by chunk - 1 zero images (so a window always fits, b >= 1), the trip count is computed from b, and the
    # last window is moved back to end at b when b >= chunk (it rescores a few images in a full window); the padded
    # images' outputs are sliced away.
    x = jnp.concatenate([images, jnp.zeros((chunk - 1,) + rest, images.dtype)])
    scores = jnp.zeros((x.shape[0],), jnp.float32)
    maps = jnp.zeros((x.shape[0],) + rest[:2], jnp.float32)
    n = jnp.array(b, jnp.int32)
    n_windows = (n + chunk - 1) // chunk
    last_start = jnp.maximum(n - chunk, 0)

    def body(carry):
      j, s, a = carry
      start = jnp.minimum(j * chunk, last_start)
      s_new, a_new = fused(jax.lax.dynamic_slice_in_dim(x, start, chunk))
      s = jax.lax.dynamic_update_slice_in_dim(s, s_new.astype(jnp.float32), start, 0)
      a = jax.lax.dynamic_update_slice_in_dim(a, a_new.astype(jnp.float32), start, 0)
      return j + 1, s, a

    _, scores, maps = jax.lax.while_loop(lambda c: c[0] < n_windows, body, (jnp.int32(0), scores, maps))
    scores, maps = scores[:b], maps[:b]
    if image_threshold is None:
      labels = jnp.zeros(scores.shape, bool)
      normalised = jnp.full(scores.shape, jnp.nan, jnp.float32)
    else:
      labels = scores > jnp.float32(image_threshold)
      normalised = (jnp.full(scores.shape, jnp.nan, jnp.float32) if scale is None
                    else jax.nn.sigmoid((scores - jnp.float32(image_threshold)) / jnp.float32(scale)))
    pixels = jnp.zeros(maps.shape, bool) if pixel_threshold is None else maps > jnp.float32(pixel_threshold)
    return {"image_scores": scores, "normalised_scores": normalised, "anomaly_maps": maps,
            "image_labels": labels, "pixel_masks": pixels}

  return fn


def export_scorer(model, platforms: Sequence[str] | str = ("cpu",), *, chunk: int = DEFAULT_CHUNK) -> bytes:
  """Serializes the model's scorer with a symbolic batch dimension; returns the bytes of an exported-scorer file.

  Args:
    model: a fitted (ideally calibrated) `glad_jax.model.GLAD`.
    platforms: one or more of 'cpu', 'cuda', 'rocm', 'tpu' (lowering needs no such device here).
    chunk: inner batch size, see `scorer_fn`.

  Returns:
    The zip archive (manifest.json + scorer.bin) as bytes.
  """
  import jax
  import jax.numpy as jnp
  from jax import export as jax_export

  import glad_jax

  platforms = check_platforms(platforms)
  if not getattr(model, "is_fitted", False):
    raise ValueError("this GLAD model is not fitted: nothing to export")
  size = int(model.config.image_size)
  fn = scorer_fn(model, chunk=chunk)
  (b,) = jax_export.symbolic_shape("b")
  exported = jax_export.export(jax.jit(fn), platforms=platforms)(
      jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8))
  module = bytes(exported.serialize())
  manifest = {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "glad_jax_version": glad_jax.__version__, "jax_version": jax.__version__,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "config": dataclasses.asdict(model.config), "image_size": size,
      "platforms": list(platforms), "chunk": int(chunk),
      "image_threshold": _optional_float(model.image_threshold),
      "pixel_threshold": _optional_float(model.pixel_threshold),
      "good_score_median": _optional_float(getattr(model, "good_score_median", None)),
      "aligned": model.config.align != "none",
      "input": f"uint8 (b, {size}, {size}, 3) RGB, b >= 1",
      "outputs": OUTPUTS,
  }
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
    z.writestr(MANIFEST_NAME, json.dumps(manifest, indent=2))
    z.writestr(MODULE_NAME, module)
  return buf.getvalue()


def save_exported(model, path: str | os.PathLike, platforms: Sequence[str] | str = ("cpu",), *,
                  chunk: int = DEFAULT_CHUNK) -> pathlib.Path:
  """`export_scorer` written to path through a temporary file and a rename (never a half-written file)."""
  path = pathlib.Path(path)
  if path.is_dir():
    raise ExportError(f"{path} is a folder: give the exported file's name, e.g. {path / 'model.gladx'}")
  blob = export_scorer(model, platforms, chunk=chunk)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_bytes(blob)
  os.replace(tmp, path)
  return path


# ---------------------------------------------------------------------------------------------- load


def is_exported_file(path: str | os.PathLike) -> bool:
  """True when path is a file holding an exported scorer's manifest (a checkpoint is a folder)."""
  p = pathlib.Path(path)
  if not p.is_file() or not zipfile.is_zipfile(p):
    return False
  with zipfile.ZipFile(p) as z:
    return MANIFEST_NAME in z.namelist()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
  """The manifest of an exported-scorer file, checked (format name and version)."""
  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"no such exported scorer: {p}")
  if not p.is_file() or not zipfile.is_zipfile(p):
    raise ExportError(f"{p} is not an exported scorer (expected a zip file written by `glad export`)")
  with zipfile.ZipFile(p) as z:
    names = z.namelist()
    if MANIFEST_NAME not in names or MODULE_NAME not in names:
      raise ExportError(f"{p} is not an exported scorer (no {MANIFEST_NAME} + {MODULE_NAME} inside)")
    try:
      manifest = json.loads(z.read(MANIFEST_NAME))
    except json.JSONDecodeError as e:
      raise ExportError(f"{p}: unreadable {MANIFEST_NAME} ({e})") from None
  if manifest.get("format") != FORMAT:
    raise ExportError(f"{p} is not an exported scorer (format {manifest.get('format')!r})")
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise ExportError(f"{p} has exported-scorer format version {version}; this glad_jax reads version "
                      f"{FORMAT_VERSION} (re-export it with `glad export`)")
  return manifest


@dataclasses.dataclass
class ExportedScorer:
  """A loaded exported scorer: call it on uint8 images (N, S, S, 3).

  Attributes:
    manifest: the file's manifest (config, thresholds, versions, platforms).
    exported: the `jax.export.Exported`.
  """

  manifest: dict[str, Any]
  exported: Any
  _call: Any = None

  @property
  def image_size(self) -> int:
    return int(self.manifest["image_size"])

  @property
  def image_threshold(self) -> float | None:
    return self.manifest.get("image_threshold")

  @property
  def pixel_threshold(self) -> float | None:
    return self.manifest.get("pixel_threshold")

  @property
  def good_score_median(self) -> float | None:
    return self.manifest.get("good_score_median")

  def config(self):
    """The GLADConfig the model was fitted with."""
    from glad_jax.config import GLADConfig

    # JSON holds the config's tuples (layers, radius_candidates) as lists: the frozen config wants tuples.
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in self.manifest["config"].items()}
    return GLADConfig(**cfg)

  def __call__(self, images) -> ExportedPrediction:
    import jax

    x = np.asarray(images)
    s = self.image_size
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (s, s, 3) or x.shape[0] < 1:
      raise ValueError(f"the exported scorer takes uint8 images of shape (N, {s}, {s}, 3), N >= 1; "
                       f"got {x.dtype} {x.shape}")
    if self._call is None:
      backend = jax.default_backend()
      names = {"gpu": ("cuda", "rocm")}.get(backend, (backend,))
      if not set(names) & set(self.manifest["platforms"]):
        raise ExportError(f"this scorer was exported for {','.join(self.manifest['platforms'])}, and this "
                          f"process runs on {backend}: re-export with --platforms including {names[0]}")
      self._call = jax.jit(self.exported.call)
    out = {k: np.asarray(v) for k, v in self._call(x).items()}
    calibrated = self.image_threshold is not None
    return ExportedPrediction(
        image_scores=out["image_scores"],
        normalised_scores=out["normalised_scores"] if calibrated and self.good_score_median is not None else None,
        anomaly_maps=out["anomaly_maps"],
        image_labels=out["image_labels"] if calibrated else None,
        pixel_masks=out["pixel_masks"] if self.pixel_threshold is not None else None)


  def score(self, images, *, batch_size: int = 16, progress=None) -> ExportedPrediction:
    """Scores N images in chunks of batch_size (the last one padded: one compilation), like `GLAD.score`."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    x = np.asarray(images)
    n = x.shape[0] if x.ndim == 4 else 0
    parts = []
    for start in range(0, max(n, 1), batch_size):
      chunk = x[start:start + batch_size]
      m = chunk.shape[0] if chunk.ndim == 4 else 0
      if 0 < m < batch_size and n > batch_size:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - m, axis=0)])
      parts.append([None if v is None else v[:m] for v in self(chunk)])
      if progress is not None:
        progress("score", {"done": min(start + batch_size, n), "total": n})
    return ExportedPrediction(*(None if parts[0][k] is None else np.concatenate([p[k] for p in parts])
                                for k in range(len(ExportedPrediction._fields))))


def load_exported(path: str | os.PathLike) -> ExportedScorer:
  """Reads a file written by `save_exported` / `glad export` (checks its format; no glad_jax model needed)."""
  from jax import export as jax_export

  manifest = read_manifest(path)
  with zipfile.ZipFile(path) as z:
    blob = z.read(MODULE_NAME)
  try:
    exported = jax_export.deserialize(bytearray(blob))
  except Exception as e:  # a corrupt payload surfaces as a flatbuffers/XLA error of any type
    raise ExportError(f"{path}: the serialized scorer cannot be read by jax {_jax_version()} "
                      f"(exported with jax {manifest.get('jax_version')}): {type(e).__name__}: {e}") from None
  return ExportedScorer(manifest, exported)


def _jax_version() -> str:
  import jax

  return jax.__version__


def _optional_float(x) -> float | None:
  if x is None:
    return None
  x = float(x)
  return None if np.isnan(x) else x
