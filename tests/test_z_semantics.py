"""Z semantics of the reference loaders (naver-ai/NeglectedFreeLunch), checked on files written by the
luab_sk generators or by hand: which click counts, how per-class columns line up with labels, what a crop
does to a COCO label, and what the fine-tuner's ``recipe="paper"`` sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.preprocessing import MultiLabelBinarizer

from luab_sk.byproducts import (
    ByproductEncoder,
    crop_points,
    heatmap_to_points,
    parse_imagenet_ab_xml,
    read_coco_ab,
    read_imagenet_ab,
    sample_resized_crop_box,
)
from luab_sk.datasets.imagenet_ab_like import make_coco_ab_like
from luab_sk.estimators._augment import (
    ImageByproductDataset,
    JointTransform,
    augmentation_recipe,
    sample_generator,
)
from luab_sk.estimators.finetune import LUABFineTuner

# ------------------------------------------------------------------ ImageNet-AB: the first selectedRecord
TWO_RECORDS = """<annotation>
  <metadata>
    <selected>True</selected>
    <selectedRecord><x>0.2</x><y>0.3</y><time>1633000001000</time></selectedRecord>
    <selectedRecord><x>0.9</x><y>0.9</y><time>1633000009000</time></selectedRecord>
  </metadata>
  <metadata>
    <selected>True</selected>
    <selectedRecord><x>0.6</x><x>0.1</x><y>0.7</y><y>0.1</y></selectedRecord>
    <selectedRecord><x>abc</x><y>7.5</y></selectedRecord>
  </metadata>
  <metadata>
    <selected>False</selected>
    <selected>True</selected>
    <selectedRecord><x>0.0</x><y>0.0</y></selectedRecord>
  </metadata>
</annotation>
"""


def test_imagenet_first_selected_record_counts(tmp_path):
    folder = tmp_path / "n01440764"
    folder.mkdir()
    path = folder / "n01440764_7.xml"
    path.write_text(TWO_RECORDS)
    rec = parse_imagenet_ab_xml(path)  # later records, even unparsable ones, are ignored: no error
    first, second, third = rec.tasks
    assert first.point == (0.2, 0.3) and first.selected_time == 1633000001000.0
    assert second.point == (0.6, 0.7)  # the first x and y inside the record, as Element.find gives
    assert third.selected is False  # the first <selected>
    # Z: mean over selected blocks of their first click.
    np.testing.assert_allclose(rec.point, [0.4, 0.5])
    records = read_imagenet_ab(tmp_path)
    z = ByproductEncoder("point").fit(records).transform(records.align(["n01440764_7.JPEG"]))
    np.testing.assert_allclose(z, [[0.4, 0.5]])


# ------------------------------------------------------------ COCO-AB: several icons of one class
@pytest.fixture(scope="module")
def two_dogs(tmp_path_factory):
    path = tmp_path_factory.mktemp("coco") / "ab.json"
    images = [
        (1, (640, 480), {"dog": [(0.15, 0.2), (0.85, 0.8)], "cat": (0.5, 0.15)}),
        (2, (400, 400), {"dog": (0.3, 0.6)}),
        (3, (500, 300), {}),
    ]
    truth = make_coco_ab_like(path, images, classes=["dog", "cat", "cow"], p_move=0.0, p_remove=0.0,
                              click_noise=0.002, random_state=0)  # fmt: skip
    return read_coco_ab(path), truth


@pytest.mark.parametrize(
    ("aggregate", "field"),
    [("last", "last_add_points"), ("first", "first_add_points"), ("mean", "add_points")],
)
def test_coco_aggregate_of_several_icons(two_dogs, aggregate, field):
    records, truth = two_dogs
    enc = ByproductEncoder("points_per_class", classes=truth.classes, aggregate=aggregate)
    z = enc.fit_transform(records.align(truth.image_ids))
    np.testing.assert_allclose(z, truth[field], atol=1e-12, equal_nan=True)


def test_coco_default_is_the_reference_last_add(two_dogs):
    records, truth = two_dogs
    z = ByproductEncoder("points_per_class", classes=truth.classes).fit_transform(records)
    assert ByproductEncoder().aggregate == "last"
    np.testing.assert_allclose(z[0, :2], [0.85, 0.8], atol=0.02)  # the second dog, on an object
    mean = ByproductEncoder("points_per_class", classes=truth.classes, aggregate="mean")
    mean = mean.fit_transform(records)
    np.testing.assert_allclose(mean[0, :2], [0.5, 0.5], atol=0.02)  # between the dogs: background


def test_coco_heatmaps_peak_at_every_instance(two_dogs):
    records, truth = two_dogs
    shape = (10, 10)
    enc = ByproductEncoder(["heatmap", "heatmaps_per_class"], classes=truth.classes, heatmap_shape=shape,
                           heatmap_sigma=0.05)  # fmt: skip
    z = enc.fit_transform(records.align(truth.image_ids))
    cells = 100
    assert z.shape == (3, cells + 3 * cells)
    image_level = z[0, enc.feature_slices_["heatmap"]].reshape(shape)
    per_class = z[:, enc.feature_slices_["heatmaps_per_class"]].reshape(3, 3, *shape)
    dog = per_class[0, 0]
    np.testing.assert_allclose(dog.sum(), 1.0)
    # Two peaks, at the two dogs (cells (row 2, col 1) and (row 8, col 8)), little mass between them.
    assert dog[2, 1] > 20 * dog[5, 5] and dog[8, 8] > 20 * dog[5, 5]
    assert abs(dog[2, 1] - dog[8, 8]) < 0.5 * dog.max()
    cat = per_class[0, 1]
    np.testing.assert_allclose(heatmap_to_points(cat.ravel(), shape), [0.55, 0.15])
    assert np.isnan(per_class[0, 2]).all() and np.isnan(per_class[2]).all()  # no cow; no icons at all
    # The image-level heatmap: half the mass on the cat, a quarter on each dog, nothing between.
    assert image_level[1, 5] > image_level[2, 1] > 20 * image_level[5, 5]
    np.testing.assert_allclose(image_level.sum(), 1.0)
    names = enc.get_feature_names_out()
    assert names[cells] == "heatmap_dog_0_0" and names[-1] == "heatmap_cow_9_9"


# --------------------------------------------------------------- COCO-AB: class order of the Z columns
@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Label columns in a non-alphabetical order: the Z columns must follow it."""
    path = tmp_path_factory.mktemp("zoo") / "ab.json"
    classes = ["zebra", "cat", "dog", "ant"]
    rng = np.random.default_rng(0)
    images = []
    for i in range(12):
        names = rng.choice(classes, size=int(rng.integers(1, 4)), replace=False)
        images.append((10 + i, (320, 240), {str(c): tuple(rng.uniform(0.1, 0.9, 2)) for c in names}))
    truth = make_coco_ab_like(path, images, classes=classes, p_remove=0.0, random_state=0)
    return read_coco_ab(path), truth, images


def test_z_columns_follow_the_label_columns(zoo):
    records, truth, images = zoo
    mlb = MultiLabelBinarizer(classes=truth.classes)
    y = mlb.fit_transform([list(objects) for _, _, objects in images])
    np.testing.assert_array_equal(y, truth.labels)
    enc = ByproductEncoder("points_per_class", classes=mlb.classes_).fit(records, y)
    Z = enc.transform(records.align(truth.image_ids))
    assert Z.shape == (len(images), 2 * y.shape[1])
    for i in range(y.shape[1]):
        col = Z[:, 2 * i : 2 * i + 2]
        has = y[:, i] == 1
        assert not np.isnan(col[has]).any() and np.isnan(col[~has]).all()
        np.testing.assert_allclose(col[has], truth.true_points[has, 2 * i : 2 * i + 2], atol=0.15)
        assert enc.get_feature_names_out()[2 * i] == f"point_{mlb.classes_[i]}_x"
    # A sorted class list would silently misalign: the encoder now refuses to guess.
    with pytest.raises(ValueError, match="needs classes="):
        ByproductEncoder("points_per_class").fit(records, y)
    with pytest.raises(ValueError, match="4 label columns but classes has 3"):
        ByproductEncoder("points_per_class", classes=["zebra", "cat", "dog"]).fit(records, y)


def test_aligned_z_drops_the_right_label_through_a_crop(zoo):
    """End to end: y column i and Z columns 2i, 2i+1 meet in the fine-tuner's data pipeline."""
    records, truth, images = zoo
    y = truth.labels.astype(np.float32)
    Z = ByproductEncoder("points_per_class", classes=truth.classes).fit_transform(records)
    Z = Z.astype(np.float32)
    row = int(np.flatnonzero(y.sum(1) >= 2)[0])
    size, seed = (320, 240), 5
    transform = JointTransform(32, (0.5,) * 3, (0.5,) * 3, train=True, crop_scale=(0.1, 0.2), color_jitter=0)
    box = sample_resized_crop_box(size, (0.1, 0.2), random_state=sample_generator(seed, 0, 0))
    inside = ((box[0] + box[2] / 2) / size[0], (box[1] + box[3] / 2) / size[1])
    keep, cut = np.flatnonzero(y[row])[:2]
    z = Z[row : row + 1].copy()
    z[0, 2 * keep : 2 * keep + 2] = inside
    z[0, 2 * cut : 2 * cut + 2] = (0.0, 0.0) if box[0] > 0 and box[1] > 0 else (1.0, 1.0)
    image = np.zeros((size[1], size[0], 3), np.uint8)
    ds = ImageByproductDataset(image[None], y[row : row + 1], z, transform, seed=seed, label_clicks=z)
    _, label, points = ds[0]
    # Expected independently: a positive class whose click leaves the box loses its label.
    cropped = crop_points(z[0], box, size)
    lost = ~np.isnan(z[0, 0::2]) & np.isnan(cropped[0::2])
    expected = np.where(lost, 0, y[row])
    assert lost[cut] and not lost[keep] and expected[keep] == 1
    np.testing.assert_array_equal(label.numpy(), expected)
    assert torch.isnan(points[2 * cut]) and not torch.isnan(points[2 * keep])


# --------------------------------------------------- COCO-AB: a crop that cuts off a click drops its label
def _crop_scene(seed=3, size=(80, 60), scale=(0.1, 0.15)):
    """Clicks for 4 classes around the first training crop of sample 0 in epoch 0."""
    box = sample_resized_crop_box(size, scale, random_state=sample_generator(seed, 0, 0))
    left, top, w, h = box
    inside = ((left + w / 2) / size[0], (top + h / 2) / size[1])
    outside = (0.0, 0.0) if left > 0 and top > 0 else (1.0, 1.0)
    # class 0: clicked outside the crop; 1: clicked inside; 2: positive without a click; 3: negative.
    clicks = np.array([[*outside, *inside, np.nan, np.nan, *inside]], np.float32)
    y = np.array([[1, 1, 1, 0]], np.float32)
    image = np.zeros((size[1], size[0], 3), np.uint8)
    return image[None], y, clicks, scale


def test_dataset_drops_the_label_whose_click_the_crop_cut_off():
    X, y, clicks, scale = _crop_scene()
    transform = JointTransform(16, (0.5,) * 3, (0.5,) * 3, train=True, crop_scale=scale, color_jitter=0)
    _, label, z = ImageByproductDataset(X, y, clicks, transform, seed=3, label_clicks=clicks)[0]
    assert label.tolist() == [0, 1, 1, 0]
    assert torch.isnan(z[:2]).all() and not torch.isnan(z[2:4]).any()
    # Default: every label is kept, only the point is masked.
    _, label, z2 = ImageByproductDataset(X, y, clicks, transform, seed=3)[0]
    assert label.tolist() == [1, 1, 1, 0]
    torch.testing.assert_close(z, z2, equal_nan=True)
    # The rule does not need Z to be trained on (byproduct_weight=0 drops Z, not the rule).
    _, label, z = ImageByproductDataset(X, y, None, transform, seed=3, label_clicks=clicks)[0]
    assert label.tolist() == [0, 1, 1, 0] and z.numel() == 0
    # Evaluation transforms never drop labels.
    evaluation = JointTransform(16, (0.5,) * 3, (0.5,) * 3, train=False)
    assert ImageByproductDataset(X, y, clicks, evaluation, label_clicks=clicks)[0][1].tolist() == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="label_clicks needs a multi-label"):
        ImageByproductDataset(X, np.array([1]), clicks, transform, label_clicks=clicks)


def tiny(**params):
    defaults = dict(backbone="timm:test_vit", pretrained=None, image_size=32, batch_size=4, max_iter=1,
                    random_state=0)  # fmt: skip
    defaults.update(params)
    return LUABFineTuner(**defaults)


def _multilabel_scenes(n=8, k=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 255, size=(n, 32, 32, 3), dtype=np.uint8)
    y = (rng.uniform(size=(n, k)) < 0.6).astype(int)
    y[:, 0] = np.arange(n) % 2
    Z = np.where(np.repeat(y, 2, axis=1) == 1, rng.uniform(0.05, 0.95, size=(n, 2 * k)), np.nan)
    return X, y, Z


def test_finetuner_drop_label_outside_crop_reaches_the_training_data(monkeypatch):
    X, y, Z = _multilabel_scenes()
    seen = {}
    original = LUABFineTuner._loader

    def spy(self, *args, **kwargs):
        loader = original(self, *args, **kwargs)
        if kwargs.get("train"):
            seen["dataset"] = loader.dataset
        return loader

    monkeypatch.setattr(LUABFineTuner, "_loader", spy)
    tiny(drop_label_outside_crop=True).fit(X, y, Z=Z)
    np.testing.assert_array_equal(seen["dataset"].label_clicks, Z.astype(np.float32))
    tiny(drop_label_outside_crop=True, byproduct_weight=0.0).fit(X, y, Z=Z)  # the rule stays on
    np.testing.assert_array_equal(seen["dataset"].label_clicks, Z.astype(np.float32))
    assert seen["dataset"].Z is None
    tiny().fit(X, y, Z=Z)
    assert seen["dataset"].label_clicks is None
    # Only ground-truth classes get a point (reference COCO-AB loader): a negative class's click is ignored.
    noisy = np.where(np.isnan(Z), 0.5, Z)
    tiny().fit(X, y, Z=noisy)
    np.testing.assert_array_equal(seen["dataset"].Z, Z.astype(np.float32))
    assert np.isnan(Z).any()


def test_finetuner_drop_label_outside_crop_is_multilabel_only():
    X, y, Z = _multilabel_scenes()
    with pytest.raises(ValueError, match="needs multi-label y"):
        tiny(drop_label_outside_crop=True).fit(X, y[:, 0], Z=Z[:, :2])
    with pytest.raises(ValueError, match="one click per label column"):
        tiny(drop_label_outside_crop=True).fit(X, y, Z=Z[:, :2])
    with pytest.raises(ValueError, match="drop_label_outside_crop"):
        tiny(drop_label_outside_crop="yes").fit(X, y, Z=Z)


# ------------------------------------------------------------------------------ the "paper" recipe
def test_augmentation_recipes_set_the_reference_transforms():
    imagenet = augmentation_recipe("paper", multilabel=False)
    coco = augmentation_recipe("paper", multilabel=True)
    ratio = (3 / 4, 4 / 3)
    assert imagenet == {"name": "paper_imagenet", "crop_scale": (0.08, 1.0), "crop_ratio": ratio,
                        "hflip": True, "color_jitter": 0.0, "interpolation": "bicubic"}  # fmt: skip
    assert coco == {"name": "paper_coco", "crop_scale": (0.08, 1.0), "crop_ratio": ratio, "hflip": True,
                    "color_jitter": 0.4, "interpolation": "bilinear"}  # fmt: skip
    assert augmentation_recipe("paper_coco") == coco  # the explicit switch, whatever the targets
    assert augmentation_recipe("paper_imagenet", multilabel=True) == imagenet
    default = augmentation_recipe("default", crop_scale=(0.5, 1), hflip=False, color_jitter=0.1)
    assert default == {"name": "default", "crop_scale": (0.5, 1), "crop_ratio": ratio, "hflip": False,
                       "color_jitter": 0.1, "interpolation": "bilinear"}  # fmt: skip
    with pytest.raises(ValueError, match="recipe must be"):
        augmentation_recipe("timm")


@pytest.mark.parametrize(
    ("recipe", "multilabel", "name"),
    [("paper", False, "paper_imagenet"), ("paper", True, "paper_coco"), ("paper_coco", False, "paper_coco"),
     ("default", True, "default")],
)  # fmt: skip
def test_finetuner_recipe_sets_the_transforms(recipe, multilabel, name):
    X, y, Z = _multilabel_scenes()
    if not multilabel:
        y, Z = y[:, 0], Z[:, :2]
    ft = tiny(recipe=recipe, crop_scale=(0.5, 1.0), color_jitter=0.2).fit(X, y, Z=Z)
    expected = augmentation_recipe(name, crop_scale=(0.5, 1.0), color_jitter=0.2)
    assert ft.augmentation_ == expected
    train, test = ft._transform(train=True), ft._transform(train=False)
    assert train.train and not test.train
    assert (train.crop_scale, train.crop_ratio, train.hflip) == (expected["crop_scale"], (3 / 4, 4 / 3), True)
    assert train.color_jitter == expected["color_jitter"]
    assert train.interpolation == test.interpolation == expected["interpolation"]
    assert ft.predict(X[:2]).shape[0] == 2


def test_bicubic_interpolation_is_used():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    t = JointTransform(16, (0.0,) * 3, (1.0,) * 3, interpolation="bicubic")
    x, _ = t(img, np.empty(0, np.float32))
    expected = np.asarray(img.resize((16, 16), Image.Resampling.BICUBIC), np.float32) / 255
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="interpolation"):
        JointTransform(16, (0.0,) * 3, (1.0,) * 3, interpolation="nearest")
