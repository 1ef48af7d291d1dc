"""Annotation byproducts Z: readers, the encoder to Z arrays, and crop/flip geometry.

Readers
    :func:`read_imagenet_ab` / :func:`iter_imagenet_ab_chunks` (a folder or list of ImageNet-AB XML
    files, parsed with defusedxml, in parallel with joblib) and :func:`read_coco_ab` /
    :func:`iter_coco_ab` (the COCO-AB JSON, streamed in bounded memory) return :class:`ByproductRecords`:
    per-image records keyed by ``"wnid/wnid_id"`` or ``image_id``, with ``align(keys)`` to line them up
    with an image list (None where an image has no byproducts).
Encoder
    :class:`ByproductEncoder` turns records into Z arrays (points, per-class points, heatmaps, traces,
    timings) with NaN for what is missing.
Geometry
    :mod:`luab_sk.byproducts.geometry` moves points through crops and flips, marking points outside a crop
    as missing, and builds heatmap targets.
"""

from ._records import (
    ByproductFormatError,
    ByproductRecords,
    COCOABRecord,
    ImageNetABRecord,
    ImageNetABTask,
    ParseError,
    coco_key,
    imagenet_key,
)
from .coco_ab import iter_coco_ab, read_coco_ab
from .geometry import (
    center_crop_box,
    crop_points,
    heatmap_to_points,
    hflip_points,
    normalized_to_pixel,
    pixel_to_normalized,
    points_to_heatmap,
    sample_resized_crop_box,
    uncrop_points,
)
from .imagenet_ab import (
    iter_imagenet_ab_chunks,
    list_imagenet_ab_files,
    parse_imagenet_ab_xml,
    read_imagenet_ab,
)

# The encoder needs scikit-learn, whose import takes seconds; it is loaded on first use so that the readers
# (and the joblib worker processes that import this package to parse XML) start fast.
_LAZY = {"ByproductEncoder": "encoder", "icon_positions": "encoder"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "ByproductEncoder",
    "ByproductFormatError",
    "ByproductRecords",
    "COCOABRecord",
    "ImageNetABRecord",
    "ImageNetABTask",
    "ParseError",
    "center_crop_box",
    "coco_key",
    "crop_points",
    "heatmap_to_points",
    "hflip_points",
    "icon_positions",
    "imagenet_key",
    "iter_coco_ab",
    "iter_imagenet_ab_chunks",
    "list_imagenet_ab_files",
    "normalized_to_pixel",
    "parse_imagenet_ab_xml",
    "pixel_to_normalized",
    "points_to_heatmap",
    "read_coco_ab",
    "read_imagenet_ab",
    "sample_resized_crop_box",
    "uncrop_points",
]
