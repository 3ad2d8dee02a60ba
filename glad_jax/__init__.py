from importlib import metadata as _md

try:
  __version__ = _md.version("glad_jax")
except _md.PackageNotFoundError:  # running from a source tree that was not installed
  __version__ = "0.0.0+unknown"

