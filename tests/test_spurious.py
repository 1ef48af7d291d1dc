import inspect

import numpy as np
import pytest
from PIL import Image

from luab_sk.datasets.spurious import (
    BACKGROUND_SETS,
    DEFAULT_SCENE_PARAMS,
    foreground_crops,
    make_spurious_benchmark,
    make_spurious_scenes,
)


@pytest.fixture(scope="module")
def scenes():
    return make_spurious_scenes(400, image_size=32, correlation=0.9, with_trace=True, random_state=0)


def test_deterministic_given_seed():
    a = make_spurious_scenes(6, image_size=32, random_state=3)
    b = make_spurious_scenes(6, image_size=32, random_state=3)
    c = make_spurious_scenes(6, image_size=32, random_state=4)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.Z, b.Z)
    assert not np.array_equal(a.images, c.images)


def test_labels_balanced_and_background_follows_correlation(scenes):
    assert np.bincount(scenes.y).tolist() == [200, 200]
    agree = np.mean(scenes.background == scenes.y)
    assert 0.85 < agree < 0.95
    np.testing.assert_array_equal(scenes.group, scenes.y * 2 + scenes.background)
    always = make_spurious_scenes(50, image_size=32, correlation=1.0, random_state=0)
    np.testing.assert_array_equal(always.background, always.y)
    never = make_spurious_scenes(50, image_size=32, correlation=0.0, random_state=0)
    assert not np.any(never.background == never.y)


def test_boxes_hold_the_pasted_object_and_clicks_fall_near_it(scenes):
    b = scenes.boxes
    assert np.all((b >= 0) & (b <= 1)) and np.all(b[:, 2:] > b[:, :2])
    side = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    assert np.all((side > 0.15) & (side < 0.35))  # object_scale=(0.2, 0.3), up to pixel rounding
    seen = ~np.isnan(scenes.Z).any(axis=1)
    inside = np.all((scenes.Z[seen] >= b[seen, :2]) & (scenes.Z[seen] <= b[seen, 2:]), axis=1)
    assert inside.mean() > 0.85  # click_noise=0.15 object sizes: most clicks land on the object
    # the background is a tinted texture, so pixels far from every box differ from the photo's pixels
    exact = make_spurious_scenes(20, image_size=64, click_noise=0.0, missing_rate=0.0, random_state=1)
    np.testing.assert_allclose(exact.Z, (exact.boxes[:, :2] + exact.boxes[:, 2:]) / 2)


def test_missing_rate_and_traces(scenes):
    missing = np.isnan(scenes.Z).any(axis=1)
    assert np.isnan(scenes.Z[missing]).all()
    assert 0.08 < missing.mean() < 0.2
    assert np.isnan(scenes.hover_ms[missing]).all() and np.all(scenes.hover_ms[~missing] > 0)
    for i in np.flatnonzero(~missing)[:20]:
        trace = scenes.traces[i]
        assert trace.shape[1] == 3 and np.all(np.diff(trace[:, 0]) > 0)
        np.testing.assert_allclose(np.diff(trace[:, 0]), 1000 / 60)
        np.testing.assert_allclose(trace[-1, 1:], scenes.Z[i], atol=1e-9)
    assert all(len(scenes.traces[i]) == 0 for i in np.flatnonzero(missing))


def test_benchmark_splits_train_spurious_test_balanced():
    splits = make_spurious_benchmark(
        100, 40, 400, image_size=32, random_state=0, classes=("faces", "nonfaces")
    )
    train, test = splits["train"], splits["test"]
    assert np.mean(train.background == train.y) > 0.9
    counts = np.bincount(test.group, minlength=4)
    assert counts.min() > 70  # four groups of about 100
    assert test.class_names == ("faces", "nonfaces")


def test_foreground_crops():
    images, y = foreground_crops(6, classes=("chelsea", "rocket", "astronaut"), image_size=48, random_state=0)
    assert images.shape == (6, 48, 48, 3) and images.dtype == np.uint8
    assert np.bincount(y).tolist() == [2, 2, 2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"correlation": 1.5}, "correlation"),
        ({"missing_rate": -0.1}, "missing_rate"),
        ({"click_noise": -1.0}, "click_noise"),
        ({"object_scale": (0.5, 0.2)}, "object_scale"),
        ({"object_scale": 0.0}, "object_scale"),
        ({"object_scale": (0.1, 0.2, 0.3)}, "object_scale"),
        ({"object_scale": "big"}, "object_scale"),
        ({"classes": ("chelsea", "dog")}, "'dog'"),
        ({"classes": ("chelsea",)}, "classes"),
        ({"backgrounds": ("grass",)}, "backgrounds"),
        ({"backgrounds": ("grass", "sea")}, "'sea'"),
        ({"n_samples": 0}, "n_samples"),
        ({"image_size": 8}, "image_size"),
    ],
)
def test_bad_parameters_are_named(kwargs, match):
    params = {"n_samples": 2, "image_size": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_spurious_scenes(**params)


def test_benchmark_requires_int_seed():
    with pytest.raises(ValueError, match="random_state"):
        make_spurious_benchmark(4, 4, 4, image_size=32, random_state=None)


def test_generator_benchmark_and_study_share_their_defaults():
    from luab_sk.study import run_study

    for func in (make_spurious_scenes, make_spurious_benchmark, run_study):
        params = inspect.signature(func).parameters
        for name, value in DEFAULT_SCENE_PARAMS.items():
            if name in params:
                assert params[name].default == value, (func.__name__, name)
    assert DEFAULT_SCENE_PARAMS["classes"] == ("faces", "nonfaces")
    assert DEFAULT_SCENE_PARAMS["object_scale"] == (0.2, 0.3) and DEFAULT_SCENE_PARAMS["correlation"] == 0.99


def test_photo_backgrounds_are_crops_of_two_real_photos():
    scenes = make_spurious_scenes(40, backgrounds="photos", image_size=32, correlation=0.5, random_state=0)
    assert scenes.background_names == BACKGROUND_SETS["photos"] == ("china", "flower")
    assert scenes.images.shape == (40, 32, 32, 3)
    # different photos: the temple scene (pale sky) is far brighter on average than the flower (dark leaves)
    brightness = scenes.images.reshape(40, -1).astype(float).mean(axis=1)
    assert brightness[scenes.background == 0].mean() > brightness[scenes.background == 1].mean() + 40


def test_foregrounds_and_backgrounds_as_images_and_folders(tmp_path):
    from skimage import data

    folder = tmp_path / "mugs"
    folder.mkdir()
    for i, img in enumerate((data.coffee(), data.coffee()[:, ::-1])):
        Image.fromarray(img).save(folder / f"mug{i}.png")
    scenes = make_spurious_scenes(
        8,
        classes=[data.chelsea(), str(folder)],  # an array, a folder
        backgrounds=[data.brick(), [data.grass(), Image.fromarray(data.gravel())]],  # arrays: no TypeError
        image_size=32,
        random_state=0,
    )
    assert scenes.class_names == ("class0", "mugs")
    assert scenes.background_names == ("background0", "background1")
    assert scenes.images.shape == (8, 32, 32, 3)
    mixed = make_spurious_scenes(4, backgrounds=("china", "grass"), image_size=32, random_state=0)
    assert mixed.background_names == ("china", "grass")
    images, y = foreground_crops(4, classes=(str(folder), data.rocket()), image_size=32, random_state=0)
    assert images.shape == (4, 32, 32, 3) and sorted(set(y.tolist())) == [0, 1]
    with pytest.raises(ValueError, match="holds no image"):
        make_spurious_scenes(2, classes=(str(tmp_path / "mugs"), str(tmp_path)), image_size=32)
    with pytest.raises(ValueError, match="backgrounds"):
        make_spurious_scenes(2, backgrounds="sunset", image_size=32)


def test_balanced_training_split_leaves_the_others_unchanged():
    plain = make_spurious_benchmark(8, 4, 4, image_size=32, random_state=0)
    more = make_spurious_benchmark(8, 4, 4, image_size=32, random_state=0, n_train_balanced=40)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(plain[name].images, more[name].images)
    balanced = more["train_balanced"]
    assert 0.3 < np.mean(balanced.background == balanced.y) < 0.7
