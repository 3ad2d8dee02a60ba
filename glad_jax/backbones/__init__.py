"""ImageNet backbones as Flax modules, with PyTorch weights loaded without PyTorch.

``create_feature_extractor(name, layers, weights, image_size)`` returns a `FeatureExtractor`
mapping an image batch to GLAD's per-layer feature maps {'layer1': (B, h, w, d), ...}.
"""

from glad_jax.backbones.extractor import FeatureExtractor
from glad_jax.backbones.extractor import IMAGENET_MEAN
from glad_jax.backbones.extractor import IMAGENET_STD
from glad_jax.backbones.extractor import as_rgb_batch
from glad_jax.backbones.extractor import create_feature_extractor
from glad_jax.backbones.extractor import feature_extractor_from_config
from glad_jax.backbones.extractor import load_variables
from glad_jax.backbones.extractor import preprocess
from glad_jax.backbones.keymap import CheckpointError
from glad_jax.backbones.keymap import WeightMismatchError
from glad_jax.backbones.keymap import convert_state_dict
from glad_jax.backbones.keymap import random_state_dict
from glad_jax.backbones.registry import BackboneSpec
from glad_jax.backbones.registry import get_spec
from glad_jax.backbones.registry import list_backbones
from glad_jax.backbones.weights import UnsafeCheckpointError
from glad_jax.backbones.weights import load_checkpoint
from glad_jax.backbones.weights import read_state_dict

__all__ = [
    "BackboneSpec",
    "CheckpointError",
    "FeatureExtractor",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "UnsafeCheckpointError",
    "WeightMismatchError",
    "as_rgb_batch",
    "convert_state_dict",
    "create_feature_extractor",
    "feature_extractor_from_config",
    "get_spec",
    "list_backbones",
    "load_checkpoint",
    "load_variables",
    "preprocess",
    "random_state_dict",
    "read_state_dict",
]
