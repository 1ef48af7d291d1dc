"""Joint image + byproduct augmentation for end-to-end training.

Every random choice (crop box, flip, colour jitter) is drawn from a :class:`numpy.random.Generator` that the
caller derives from ``(seed, epoch, sample index)``, so an epoch's augmentations do not depend on the
DataLoader's worker processes or on how far an interrupted run had got. The click points travel through the
same crop and flip as the pixels (:mod:`luab_sk.byproducts.geometry`); a point that leaves the crop becomes
NaN, which masks it out of the loss for that step (the reference ImageNet-AB rule). With per-class points
and multi-label targets, :class:`ImageByproductDataset` can also drop the label of a class whose click the
crop cut off (the reference COCO-AB rule).

:func:`augmentation_recipe` names the augmentations of the estimators' ``recipe`` parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import Dataset
from torchvision.transforms.functional import normalize, pil_to_tensor

from ..byproducts.geometry import crop_points, hflip_points, sample_resized_crop_box
from ..features.images import load_image

__all__ = ["JointTransform", "ImageByproductDataset", "augmentation_recipe", "sample_generator"]

_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
_RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RECIPES = ("default", "paper", "paper_imagenet", "paper_coco")


def augmentation_recipe(recipe, *, multilabel=False, crop_scale=(0.25, 1.0), hflip=True, color_jitter=0.4):
    """The training augmentation of a fine-tuning ``recipe``, as keyword arguments of :class:`JointTransform`.

    Parameters
    ----------
    recipe : {"default", "paper", "paper_imagenet", "paper_coco"}
        - ``"default"``: ``crop_scale``, ``hflip`` and ``color_jitter`` as given, ratio (3/4, 4/3),
          bilinear resampling.
        - ``"paper_imagenet"``: the reference ImageNet-AB loader (timm's random-resized crop): scale
          (0.08, 1), ratio (3/4, 4/3), bicubic, flip with probability 1/2, no colour jitter.
        - ``"paper_coco"``: the reference COCO-AB loader (torchvision): random-resized crop scale (0.08, 1),
          ratio (3/4, 4/3), bilinear (torchvision's default), flip with probability 1/2, then
          ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4) (no hue).
        - ``"paper"``: ``"paper_coco"`` when the targets are multi-label, else ``"paper_imagenet"``.

        The paper recipes ignore ``crop_scale``, ``hflip`` and ``color_jitter``.
    multilabel : bool, default=False
        Whether the targets are multi-label (decides ``"paper"``).
    crop_scale, hflip, color_jitter
        The estimator's own settings, used by ``"default"``.

    Returns
    -------
    dict
        ``name`` (the resolved recipe), ``crop_scale``, ``crop_ratio``, ``hflip``, ``color_jitter``,
        ``interpolation``.

    Examples
    --------
    >>> augmentation_recipe("paper", multilabel=True)["color_jitter"]
    0.4
    >>> augmentation_recipe("paper")["interpolation"]
    'bicubic'
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}; got {recipe!r}.")
    if recipe == "paper":
        recipe = "paper_coco" if multilabel else "paper_imagenet"
    if recipe == "default":
        return {
            "name": "default",
            "crop_scale": None if crop_scale is None else tuple(crop_scale),
            "crop_ratio": _RATIO,
            "hflip": bool(hflip),
            "color_jitter": float(color_jitter),
            "interpolation": "bilinear",
        }
    coco = recipe == "paper_coco"
    return {
        "name": recipe,
        "crop_scale": (0.08, 1.0),
        "crop_ratio": _RATIO,
        "hflip": True,
        "color_jitter": 0.4 if coco else 0.0,
        "interpolation": "bilinear" if coco else "bicubic",
    }


def sample_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of one sample in one epoch, a pure function of its three arguments.

    Examples
    --------
    >>> float(sample_generator(0, 1, 2).random()) == float(sample_generator(0, 1, 2).random())
    True
    """
    return np.random.default_rng((int(seed), int(epoch), int(index)))


class JointTransform:
    """Resize (or random-resized-crop), flip and colour-jitter an image, moving its click points along.

    Parameters
    ----------
    size : int
        Side of the square output image in pixels.
    mean, std : sequence of float
        Per-channel normalisation of the backbone.
    train : bool, default=False
        False: resize the whole image to ``size x size`` (points keep their coordinates). True: apply the
        random augmentations below.
    crop_scale : tuple of float or None, default=(0.25, 1.0)
        Area range of the random-resized crop (None: no crop, the whole image is resized).
    crop_ratio : tuple of float, default=(3/4, 4/3)
        Aspect-ratio range of the crop.
    hflip : bool, default=True
        Flip horizontally with probability 1/2.
    color_jitter : float, default=0.4
        Brightness, contrast and saturation factors drawn from ``[1 - j, 1 + j]``, applied in random order
        (0 disables).
    interpolation : {"bilinear", "bicubic"}, default="bilinear"
        Resampling of the (cropped) image to ``size``, in training and in evaluation.

    Examples
    --------
    >>> import numpy as np
    >>> from PIL import Image
    >>> t = JointTransform(16, mean=(0.5,) * 3, std=(0.5,) * 3, train=True, crop_scale=None, color_jitter=0)
    >>> img = Image.new("RGB", (40, 20))
    >>> x, z = t(img, np.array([0.25, 0.5, np.nan, np.nan], np.float32), np.random.default_rng(1))
    >>> tuple(x.shape), z.tolist()[:2] in ([0.25, 0.5], [0.75, 0.5])
    ((3, 16, 16), True)
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        train: bool = False,
        crop_scale: tuple[float, float] | None = (0.25, 1.0),
        crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        hflip: bool = True,
        color_jitter: float = 0.4,
        interpolation: str = "bilinear",
    ) -> None:
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.train = bool(train)
        self.crop_scale = None if crop_scale is None else tuple(crop_scale)
        self.crop_ratio = tuple(crop_ratio)
        self.hflip = bool(hflip)
        self.color_jitter = float(color_jitter)
        if interpolation not in _RESAMPLING:
            raise ValueError(f"interpolation must be one of {tuple(_RESAMPLING)}; got {interpolation!r}.")
        self.interpolation = interpolation

    def __call__(
        self, image: Image.Image, points: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Transform one RGB image and its points.

        Parameters
        ----------
        image : PIL.Image.Image
            RGB image.
        points : ndarray of shape (2 * K,)
            Interleaved ``(x, y)`` points in [0, 1] of ``image`` (NaN = missing); shape (0,) for none.
        rng : numpy.random.Generator, optional
            Required when ``train=True``.

        Returns
        -------
        image : Tensor of shape (3, size, size)
            Normalised float32.
        points : ndarray of shape (2 * K,)
            The points in the output image's coordinates; NaN where the crop cut them off.
        """
        has_points = points.size > 0
        box = None
        if self.train and self.crop_scale is not None:
            box = sample_resized_crop_box(image.size, self.crop_scale, self.crop_ratio, random_state=rng)
            if has_points:
                points = crop_points(points, box, image.size)
        pil_box = None if box is None else (box[0], box[1], box[0] + box[2], box[1] + box[3])
        image = image.resize((self.size, self.size), _RESAMPLING[self.interpolation], box=pil_box)
        if self.train and self.hflip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if has_points:
                points = hflip_points(points)
        if self.train and self.color_jitter > 0:
            factors = rng.uniform(max(0.0, 1.0 - self.color_jitter), 1.0 + self.color_jitter, size=3)
            for i in rng.permutation(3):
                image = _ENHANCERS[i](image).enhance(float(factors[i]))
        tensor = pil_to_tensor(image).to(torch.float32).div_(255.0)
        return normalize(tensor, self.mean, self.std), np.asarray(points, dtype=np.float32)


class ImageByproductDataset(Dataset):
    """Images with labels and byproduct points, decoded and augmented on access.

    Parameters
    ----------
    items : sequence
        Paths, PIL images or uint8 arrays (anything :func:`luab_sk.features.images.load_image` reads).
    y : ndarray of shape (n,) or (n, n_labels)
        Encoded labels.
    Z : ndarray of shape (n, 2 * K) or None
        Points in [0, 1], NaN = missing.
    transform : JointTransform
    seed : int, default=0
        With :attr:`epoch` and the sample index, seeds the sample's augmentation.
    label_clicks : ndarray of shape (n, 2 * K) or None, default=None
        The reference COCO-AB label rule, for a multi-label indicator ``y`` of shape (n, K): per-class
        clicks in [0, 1] (column ``k`` of ``y`` owns ``label_clicks[:, 2k:2k+2]``, NaN = no click; usually
        Z itself). When a training crop cuts off the click of a class, that class's label is 0 for that
        sample and step; a class without a click keeps its label. The clicks go through the same crop and
        flip as the image and ``Z``, and are given separately from ``Z`` so that the rule does not depend on
        whether Z is trained on. None (the default) keeps every label.

    Attributes
    ----------
    epoch : int
        Set by the training loop before every epoch.

    Examples
    --------
    >>> import numpy as np
    >>> t = JointTransform(8, (0.5,) * 3, (0.5,) * 3)
    >>> ds = ImageByproductDataset(np.zeros((2, 10, 10, 3), np.uint8), np.array([0, 1]), None, t)
    >>> x, y, z = ds[1]
    >>> tuple(x.shape), int(y), tuple(z.shape)
    ((3, 8, 8), 1, (0,))
    """

    def __init__(self, items, y, Z, transform: JointTransform, seed: int = 0, *, label_clicks=None) -> None:
        self.items, self.y, self.Z, self.transform = items, y, Z, transform
        self.seed, self.epoch = int(seed), 0
        if label_clicks is not None:
            y_width = np.shape(y)[1] if np.ndim(y) == 2 else None
            if y_width is None or np.shape(label_clicks) != (len(items), 2 * y_width):
                raise ValueError(
                    "label_clicks needs a multi-label indicator y of shape (n, K) and per-class clicks of "
                    f"shape (n, 2K); got y of shape {np.shape(y)} and clicks of shape "
                    f"{np.shape(label_clicks)}."
                )
            label_clicks = np.asarray(label_clicks, dtype=np.float32)
        self.label_clicks = label_clicks

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        rng = sample_generator(self.seed, self.epoch, index) if self.transform.train else None
        points = self.Z[index] if self.Z is not None else np.empty(0, np.float32)
        label = self.y[index]
        if self.label_clicks is None or not self.transform.train:
            image, points = self.transform(load_image(self.items[index]), points, rng)
            return image, torch.as_tensor(label), torch.from_numpy(points)
        clicks = self.label_clicks[index]
        # One call: the clicks go through exactly the crop and flip of the image and of Z.
        both = np.concatenate([np.asarray(points, np.float32), clicks])
        image, both = self.transform(load_image(self.items[index]), both, rng)
        points, moved = both[: len(points)], both[len(points) :]
        lost = ~np.isnan(clicks[0::2]) & np.isnan(moved[0::2])  # clicked, then cut off by the crop
        if lost.any():
            label = np.where(lost, 0, label).astype(np.asarray(label).dtype, copy=False)
        return image, torch.as_tensor(label), torch.from_numpy(np.ascontiguousarray(points))
