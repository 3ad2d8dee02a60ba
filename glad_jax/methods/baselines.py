"""MahaAD, PaDiM and PatchCore as registry methods: thin wrappers of `glad_jax.baselines`.

The baselines' own API is ``fit(features, config, key) -> state`` and ``score(state, features,
out_size) -> (image_scores, maps)``; here their state is wrapped with the side of the maps
(`BaselineState`) so that every registered method scores as ``score(state, features) -> (maps,
image_scores)``. The math is the baselines' own, unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

from glad_jax import baselines as baselines_lib
from glad_jax.config import GLADConfig
from glad_jax.scoring import DEFAULT_SIZE


@struct.dataclass
class BaselineState:
  """A fitted baseline.

  Attributes:
    fitted: the baseline's own state (`MahaADState`, `PadimState`, `PatchcoreState`).
    image_size: side S of the anomaly maps (static).
  """

  fitted: Any
  image_size: int = struct.field(pytree_node=False)


def _wrap(name: str, config_for) -> None:
  from glad_jax import methods

  baseline = baselines_lib.get_baseline(name)

  def fit(features, config, key, *, image_size=None, images=None, reference=None, mesh=None,
          progress=None) -> BaselineState:
    del images, reference, mesh, progress  # a baseline fits on features only, on one device
    size = DEFAULT_SIZE[0] if image_size is None else int(image_size)
    return BaselineState(fitted=baseline.fit(features, config, key), image_size=size)

  def score(state: BaselineState, features) -> tuple[jax.Array, jax.Array]:
    image_scores, maps = baseline.score(state.fitted, features, state.image_size)
    return maps, image_scores

  fit.__doc__ = f"{name}: `glad_jax.baselines.{baseline.fit.__name__}`, wrapped in a `BaselineState`."
  score.__doc__ = f"{name}: `glad_jax.baselines.{baseline.score.__name__}` as (maps, image_scores)."
  methods.register_method(methods.Method(name=name, config_cls=baseline.config_cls, fit=fit, score=score,
                                         config_for=config_for))


def mahaad_config(base: GLADConfig) -> baselines_lib.MahaADConfig:
  """MahaAD as its paper defines it: one Gaussian on EVERY stage of `base`'s backbone
  ('layer1'..'layer4', `baselines.mahaad.mahaad_layers`), whatever GLAD's own layers are."""
  return baselines_lib.MahaADConfig.for_backbone(base.backbone)


def padim_config(base: GLADConfig) -> baselines_lib.PadimConfig:
  """PaDiM on every layer of `base`; d' follows the backbone (`PadimConfig.for_backbone`)."""
  return baselines_lib.PadimConfig.for_backbone(base.backbone, layers=tuple(base.layers))


def patchcore_config(base: GLADConfig) -> baselines_lib.PatchcoreConfig:
  """PatchCore on the two deepest layers of `base` (its paper: layers 2 and 3)."""
  return baselines_lib.PatchcoreConfig(layers=tuple(base.layers)[-2:])


_wrap("mahaad", mahaad_config)
_wrap("padim", padim_config)
_wrap("patchcore", patchcore_config)
