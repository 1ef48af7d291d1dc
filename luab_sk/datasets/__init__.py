"""Data makers: spurious-correlation benchmarks, ImageNet-AB/COCO-AB-like files, synthetic embeddings."""

from .imagenet_ab_like import make_coco_ab_like, make_imagenet_ab_like
from .spurious import (
    BACKGROUND_SETS,
    BACKGROUNDS,
    DEFAULT_SCENE_PARAMS,
    FOREGROUNDS,
    foreground_crops,
    make_spurious_benchmark,
    make_spurious_scenes,
)
from .synthetic import make_embedding_classification

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_SETS",
    "DEFAULT_SCENE_PARAMS",
    "FOREGROUNDS",
    "foreground_crops",
    "make_coco_ab_like",
    "make_embedding_classification",
    "make_imagenet_ab_like",
    "make_spurious_benchmark",
    "make_spurious_scenes",
]
