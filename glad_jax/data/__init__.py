"""Data: folder layouts (mvtec), image files (images), elpv, TFDS cache, robustness protocols.

The readers are re-exported here. `glad_jax.data.tfds_cache` (imports tensorflow_datasets)
and `glad_jax.data.perturb` (imports JAX) are imported explicitly where needed.
"""

from glad_jax.data.elpv import elpv_category
from glad_jax.data.images import IMAGE_EXTENSIONS
from glad_jax.data.images import DataError
from glad_jax.data.images import list_images
from glad_jax.data.images import read_image
from glad_jax.data.images import read_images
from glad_jax.data.images import read_mask
from glad_jax.data.mvtec import Category
from glad_jax.data.mvtec import ImageBatch
from glad_jax.data.mvtec import ImageRecord
from glad_jax.data.mvtec import list_categories
from glad_jax.data.mvtec import load_split
from glad_jax.data.mvtec import read_category

__all__ = [
    "IMAGE_EXTENSIONS",
    "Category",
    "DataError",
    "ImageBatch",
    "ImageRecord",
    "elpv_category",
    "list_categories",
    "list_images",
    "load_split",
    "read_category",
    "read_image",
    "read_images",
    "read_mask",
]
