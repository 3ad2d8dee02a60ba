"""Mapping of PyTorch ``state_dict`` entries onto Flax variables, with one error for all mismatches.

A backbone describes its PyTorch checkpoint as a list of `TorchTensor`: the key, the shape
PyTorch stores, where the tensor goes in the Flax variables and how it is transposed. The
same description drives the conversion, the mismatch report and the seeded random
``state_dict`` used by the parity tests, so there is a single source of truth per
architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Literal, Mapping

import numpy as np

from glad_jax.backbones.common import binomial_filter

# conv: (O, I/g, kh, kw) -> (kh, kw, I/g, O); linear: (O, I) -> (I, O); vector: as is;
# blur: the fixed BlurPool filter buffer (checked, not stored); counter: BN's
# num_batches_tracked (optional, ignored at inference).
Kind = Literal["conv", "linear", "vector", "bn_scale", "bn_var", "blur", "counter"]


@dataclasses.dataclass(frozen=True)
class TorchTensor:
  """One entry of a PyTorch state_dict and its place in the Flax variables.

  Attributes:
    key: PyTorch state_dict key, e.g. 'layer1.0.conv1.weight'.
    shape: shape stored by PyTorch.
    target: path in the Flax variables dict, e.g. ('params', 'layer1_0', 'conv1', 'kernel');
      None for buffers that are checked but not stored (BlurPool filter, BN counters).
    kind: how the tensor is transformed (see `Kind`).
    optional: a checkpoint without this key is still complete.
  """

  key: str
  shape: tuple[int, ...]
  target: tuple[str, ...] | None
  kind: Kind
  optional: bool = False


class CheckpointError(ValueError):
  """A weights file that cannot be read or does not fit the requested backbone."""


class WeightMismatchError(CheckpointError):
  """The state_dict has missing, unexpected or mis-shaped keys (all listed at once).

  Attributes:
    missing: expected keys absent from the checkpoint.
    unexpected: checkpoint keys the backbone does not use.
    mismatched: (key, expected shape, found shape) triples.
  """

  def __init__(self, message: str, missing: list[str], unexpected: list[str],
               mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]):
    super().__init__(message)
    self.missing = missing
    self.unexpected = unexpected
    self.mismatched = mismatched


def conv_bn(conv_key: str, bn_prefix: str, path: tuple[str, ...], out_ch: int, in_per_group: int,
            k: int) -> list[TorchTensor]:
  """Specs of ``Conv2d(bias=False)`` + ``BatchNorm2d`` stored as one `ConvBN` at `path`."""
  return [
      TorchTensor(conv_key, (out_ch, in_per_group, k, k), ("params", *path, "kernel"), "conv"),
      TorchTensor(f"{bn_prefix}.weight", (out_ch,), ("params", *path, "scale"), "bn_scale"),
      TorchTensor(f"{bn_prefix}.bias", (out_ch,), ("params", *path, "bias"), "vector"),
      TorchTensor(f"{bn_prefix}.running_mean", (out_ch,), ("batch_stats", *path, "mean"), "vector"),
      TorchTensor(f"{bn_prefix}.running_var", (out_ch,), ("batch_stats", *path, "var"), "bn_var"),
      TorchTensor(f"{bn_prefix}.num_batches_tracked", (), None, "counter", optional=True),
  ]


def linear(prefix: str, path: tuple[str, ...], out_f: int, in_f: int) -> list[TorchTensor]:
  """Specs of ``nn.Linear`` stored as a `Dense` at `path`."""
  return [
      TorchTensor(f"{prefix}.weight", (out_f, in_f), ("params", *path, "kernel"), "linear"),
      TorchTensor(f"{prefix}.bias", (out_f,), ("params", *path, "bias"), "vector"),
  ]


def blur(key: str, channels: int, filter_size: int) -> TorchTensor:
  """Spec of an antialiased-cnns ``BlurPool.filt`` buffer, shape (C, 1, f, f)."""
  return TorchTensor(key, (channels, 1, filter_size, filter_size), None, "blur", optional=True)


def _blur_filter(shape: tuple[int, ...]) -> np.ndarray:
  a = binomial_filter(shape[-1])
  return np.broadcast_to(np.outer(a, a), shape)


def _summary(items: list[str], limit: int = 20) -> str:
  shown = ", ".join(items[:limit])
  return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def convert_state_dict(state_dict: Mapping[str, np.ndarray], layout: Iterable[TorchTensor],
                       backbone: str = "backbone", source: str = "state_dict") -> dict:
  """Converts a PyTorch state_dict (NumPy arrays) into nested Flax variables.

  Args:
    state_dict: flat mapping key -> array, PyTorch layout.
    layout: the backbone's `TorchTensor` specs.
    backbone: registry name, used in error messages.
    source: file name (or description) used in error messages.

  Returns:
    nested dict {'params': {...}, 'batch_stats': {...}} of float32 NumPy arrays.

  Raises:
    WeightMismatchError: listing every missing, unexpected and mis-shaped key, or a
      BlurPool filter that is not the expected binomial filter.
  """
  layout = list(layout)
  by_key = {t.key: t for t in layout}
  missing = [t.key for t in layout if not t.optional and t.key not in state_dict]
  unexpected = [k for k in state_dict if k not in by_key]
  mismatched = []
  for key, value in state_dict.items():
    spec = by_key.get(key)
    if spec is not None and tuple(np.shape(value)) != spec.shape:
      mismatched.append((key, spec.shape, tuple(np.shape(value))))
  if missing or unexpected or mismatched:
    parts = [f"checkpoint {source} does not match backbone {backbone!r}:"]
    if missing:
      parts.append(f"{len(missing)} missing key(s): {_summary(missing)}")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected key(s): {_summary(unexpected)}")
    if mismatched:
      parts.append(f"{len(mismatched)} key(s) with a wrong shape: " + _summary(
          [f"{k} (expected {e}, found {f})" for k, e, f in mismatched]))
    parts.append("(is it a checkpoint of another architecture?)")
    raise WeightMismatchError("\n  ".join(parts), missing, unexpected, mismatched)

  variables: dict = {}
  for spec in layout:
    if spec.key not in state_dict:
      continue
    value = np.asarray(state_dict[spec.key])
    if spec.kind == "blur":
      # The filter is a constant of the architecture: a different one (e.g. another
      # filter size) means the features would not be those of this backbone.
      if not np.allclose(value, _blur_filter(spec.shape), rtol=1e-5, atol=1e-7):
        raise WeightMismatchError(
            f"checkpoint {source}: BlurPool buffer {spec.key} is not the normalised binomial "
            f"filter of size {spec.shape[-1]} that backbone {backbone!r} uses", [], [],
            [(spec.key, spec.shape, tuple(value.shape))])
      continue
    if spec.target is None:
      continue
    if spec.kind == "conv":
      value = value.transpose(2, 3, 1, 0)
    elif spec.kind == "linear":
      value = value.T
    node = variables
    for name in spec.target[:-1]:
      node = node.setdefault(name, {})
    node[spec.target[-1]] = np.ascontiguousarray(value, dtype=np.float32)  # one copy
  return variables


def random_state_dict(layout: Iterable[TorchTensor], seed: int) -> dict[str, np.ndarray]:
  """A seeded random PyTorch-layout state_dict with sensible scales (for tests and benches).

  Deterministic given (layout, seed): keys are drawn in sorted order from
  ``np.random.default_rng(seed)``, so the same arrays can be rebuilt without PyTorch.
  Convolutions are He-normal, linear layers LeCun-normal, BatchNorm weights in [0.5, 1.5],
  running variances in [0.5, 1.5] (positive), biases and means small.

  Args:
    layout: the backbone's `TorchTensor` specs.
    seed: NumPy seed.

  Returns:
    dict key -> array (float32; int64 for BN counters), PyTorch shapes.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for spec in sorted(layout, key=lambda t: t.key):
    shape = spec.shape
    # float32 draws: half the time of float64 for the 69M weights of WideResNet50-2.
    if spec.kind == "conv":
      fan_in = int(np.prod(shape[1:]))
      value = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    elif spec.kind == "linear":
      value = rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(shape[1]))
    elif spec.kind in ("bn_scale", "bn_var"):
      value = rng.random(shape, dtype=np.float32) + np.float32(0.5)
    elif spec.kind == "vector":
      value = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
    elif spec.kind == "blur":
      value = _blur_filter(shape)
    else:  # counter
      out[spec.key] = np.zeros(shape, np.int64)
      continue
    out[spec.key] = np.asarray(value, np.float32)
  return out
