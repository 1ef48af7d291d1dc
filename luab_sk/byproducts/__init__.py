"""Annotation byproducts Z: readers, encoders to Z arrays, and crop/flip geometry.

Submodules
----------
geometry
    Map (x, y) points through pixel/normalised conversion, crops (random-resized or centre) and horizontal
    flips; build and decode heatmap targets.
"""

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

__all__ = [
    "center_crop_box",
    "crop_points",
    "heatmap_to_points",
    "hflip_points",
    "normalized_to_pixel",
    "pixel_to_normalized",
    "points_to_heatmap",
    "sample_resized_crop_box",
    "uncrop_points",
]
