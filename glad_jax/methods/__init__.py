"""One registry of anomaly detection methods as pure functions over pytree states.

Each entry is a `Method`, a small NamedTuple of pure functions in the spirit of optax's
``GradientTransformation``::

    from glad_jax import methods
    m = methods.get_method("glad")                   # or "mahaad", "padim", "patchcore"
    state = m.fit(features, m.config_cls(), key)     # features {layer: (N, h, w, d)} -> State
    maps, image_scores = m.score(state, features)    # (B, S, S), (B,); pure, jittable, differentiable

A State is a `flax.struct.dataclass` pytree that holds every array of the fitted model (and static
configuration); it holds no compiled function, so nothing goes stale: jit the functions, pass the
state. `glad_jax.checkpoint.save_state` / `load_state` store any of them.

`fit` takes the same keyword arguments for every method (each ignores what it does not use):
``image_size`` (side S of the maps; GLAD: its config's), ``images`` (the prepared, aligned training
images, uint8 (N, S, S, 3): GLAD's object mask), ``reference`` (the alignment reference, uint8
(S, S, 3)), ``mesh`` (a 1-D `jax.sharding.Mesh` for the global fit), ``progress`` (callback(stage,
info), see CONTRACT's progress events).

`images_fn(method, extractor.apply)` composes the backbone and a method's score into one pure,
differentiable function ``fn(params, state, images) -> (maps, image_scores)`` (aligning on the
state's reference first when the state has one and ``align=True``): what the GLAD facade, the
protocols and attacks run.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from glad_jax.config import GLADConfig


class Method(NamedTuple):
  """One detection method behind a uniform functional interface.

  Attributes:
    name: registry name.
    config_cls: frozen dataclass of the hyperparameters; `config_cls()` holds the paper's defaults.
    fit: ``fit(features, config, key, *, image_size=None, images=None, reference=None, mesh=None,
      progress=None) -> State``.
    score: ``score(state, features) -> (maps (B, S, S), image_scores (B,))``, higher = more
      anomalous; pure, jittable and differentiable w.r.t. the features.
    config_for: ``config_for(base: GLADConfig) -> config``: this method's configuration on the
      backbone setting (layers, backbone) of a GLAD configuration, its paper's other defaults.
    variants: ``variants(config) -> ((name, config), ...)``: named ablations of the method (GLAD's
      Table 1 rows), empty for the others.
  """

  name: str
  config_cls: type
  fit: Callable[..., Any]
  score: Callable[[Any, Any], tuple[jax.Array, jax.Array]]
  config_for: Callable[[GLADConfig], Any]
  variants: Callable[[Any], tuple[tuple[str, Any], ...]] = lambda config: ()


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
  """Adds a method to the registry (and so to every protocol and scripts/compare.py).

  Raises:
    ValueError: if the name is taken.
  """
  if method.name in _REGISTRY:
    raise ValueError(f"a method named {method.name!r} is already registered")
  _REGISTRY[method.name] = method
  return method


def get_method(name: str) -> Method:
  """The registered `Method` called `name`.

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown method {name!r}; known methods: {', '.join(list_methods())}") from None


def list_methods() -> tuple[str, ...]:
  """Registered names, in registration order (glad first, then the baselines)."""
  return tuple(_REGISTRY)


def images_fn(method: Method, extractor_apply: Callable, *, align: bool = True) -> Callable:
  """The end-to-end function of a method: ``fn(params, state, images) -> (maps, image_scores)``.

  Backbone (``extractor_apply(params, images) -> {layer: features}``) then ``method.score``. When
  `align` is True and the state aligns (it has ``aligns`` True: GLAD with a reference), the images
  are first aligned on the state's reference and the maps warped back onto the input images; the
  image score stays in the reference frame, as in the paper.

  Args:
    method: a registered `Method`.
    extractor_apply: pure backbone ``(params, images (B, S, S, 3) uint8 or float in [0, 1]) ->
      {layer: (B, h, w, d)}`` (`FeatureExtractor.apply`).
    align: False when the caller passes images already aligned (the protocols).

  Returns:
    A pure function, jittable and differentiable w.r.t. float images (alignment excepted).
  """

  def fn(params, state, images):
    motions = None
    if align and getattr(state, "aligns", False):
      images, motions = state.align(images)
    maps, scores = method.score(state, extractor_apply(params, images))
    if motions is not None:
      maps = state.unwarp(maps, motions)
    return maps, scores

  return fn


from glad_jax.methods import glad  # noqa: E402  (registers "glad")
from glad_jax.methods import baselines  # noqa: E402  (registers "mahaad", "padim", "patchcore")
from glad_jax.methods.baselines import BaselineState  # noqa: E402
from glad_jax.methods.glad import GLADState  # noqa: E402

__all__ = [
    "BaselineState",
    "GLADState",
    "Method",
    "baselines",
    "get_method",
    "glad",
    "images_fn",
    "list_methods",
    "register_method",
]
