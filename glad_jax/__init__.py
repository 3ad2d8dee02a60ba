"""glad_jax: GLAD (A Global-to-Local Anomaly Detector, WACV 2023) in JAX."""

from importlib import metadata as _md

try:
  __version__ = _md.version("glad_jax")
except _md.PackageNotFoundError:  # running from a source tree that was not installed
  __version__ = "0.0.0+unknown"

__all__ = [
    "GLAD",
    "GLADConfig",
    "Prediction",
    "__version__",
]


def __getattr__(name):
  # Lazy: `import glad_jax` (and `glad --help`) stays instant; JAX loads on first use of the model.
  if name == "GLADConfig":
    from glad_jax.config import GLADConfig

    return GLADConfig
  if name in ("GLAD", "Prediction"):
    from glad_jax import model

    return getattr(model, name)
  raise AttributeError(f"module 'glad_jax' has no attribute {name!r}")
