"""Image features: backbones behind one interface, image loading, and the cached FeatureExtractor.

Importing this package is light: open_clip, timm and torchvision are imported only when a backbone of
that family is built.
"""

from .backbones import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, Backbone, load_backbone
from .cache import CacheCorruptionWarning, CacheLockWarning, EmbeddingCache, cache_info, clear_cache
from .extractor import FeatureExtractor
from .images import ImageDataset, ImageLoadError, load_image

__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_PRETRAINED",
    "Backbone",
    "CacheCorruptionWarning",
    "CacheLockWarning",
    "EmbeddingCache",
    "FeatureExtractor",
    "ImageDataset",
    "ImageLoadError",
    "cache_info",
    "clear_cache",
    "load_backbone",
    "load_image",
]
