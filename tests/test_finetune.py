"""Tests of LUABFineTuner and its joint image + byproduct augmentation (tiny random-init timm backbones)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.model_selection import GridSearchCV

from luab_sk.estimators._augment import ImageByproductDataset, JointTransform, sample_generator
from luab_sk.estimators.finetune import LUABFineTuner, _warmup_cosine
from luab_sk.features.images import ImageLoadError

SIZE = 32


def make_scenes(n=12, size=SIZE, seed=0):
    """Grey noise scenes with a coloured square; the colour is the class, its centre is the click."""
    rng = np.random.default_rng(seed)
    X = rng.integers(60, 120, size=(n, size, size, 3), dtype=np.uint8)
    y = np.arange(n) % 2
    Z = np.empty((n, 2), np.float32)
    for i in range(n):
        cx, cy = rng.integers(6, size - 6, size=2)
        X[i, cy - 4 : cy + 4, cx - 4 : cx + 4] = (230, 40, 40) if y[i] else (40, 40, 230)
        Z[i] = (cx / size, cy / size)
    return X, y, Z


def tiny(**params):
    defaults = dict(
        backbone="timm:test_vit",
        pretrained=None,
        image_size=SIZE,
        batch_size=4,
        max_iter=1,
        random_state=0,
    )
    defaults.update(params)
    return LUABFineTuner(**defaults)


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------------------------ augmentation
def _dot_image(point, size=(60, 40)):
    """A black image with a white 3x3 dot at a normalised point."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    px, py = int(point[0] * size[0]), int(point[1] * size[1])
    arr[max(py - 1, 0) : py + 2, max(px - 1, 0) : px + 2] = 255
    return Image.fromarray(arr), np.array([(px + 0.5) / size[0], (py + 0.5) / size[1]], np.float32)


@pytest.mark.parametrize("seed", range(40))
def test_points_follow_the_pixels_through_crop_and_flip(seed):
    rng = np.random.default_rng(1000 + seed)
    image, point = _dot_image(rng.uniform(0.05, 0.95, size=2))
    transform = JointTransform(48, (0.0,) * 3, (1.0,) * 3, train=True, crop_scale=(0.3, 1.0), color_jitter=0)
    x, z = transform(image, np.concatenate([point, [np.nan, np.nan]]), sample_generator(seed, 0, 0))
    assert np.isnan(z[2:]).all()  # a missing point stays missing
    if np.isnan(z[0]):
        assert np.isnan(z[1])  # both coordinates of a cut-off point are masked
        return
    assert 0 <= z[:2].min() and z[:2].max() <= 1
    brightness = x.sum(0).numpy()
    iy, ix = np.nonzero(brightness > brightness.max() / 2)
    centroid = np.array([(ix + 0.5).mean() / 48, (iy + 0.5).mean() / 48])
    # The 3-pixel dot covers at most 1.5 source pixels either side of the point: 0.07 of a >= 23 px crop.
    np.testing.assert_allclose(centroid, z[:2], atol=0.07)


def test_crop_masks_points_outside_for_that_step_only():
    X = np.zeros((1, 40, 40, 3), np.uint8)
    Z = np.array([[0.02, 0.02]], np.float32)
    transform = JointTransform(16, (0.5,) * 3, (0.5,) * 3, train=True, crop_scale=(0.05, 0.05))
    ds = ImageByproductDataset(X, np.array([0]), Z, transform, seed=3)
    masked = 0
    for epoch in range(20):
        ds.epoch = epoch
        _, _, z = ds[0]
        masked += bool(torch.isnan(z).all())
    assert masked >= 15  # a 5%-area crop rarely holds the corner point
    np.testing.assert_array_equal(Z, np.array([[0.02, 0.02]], np.float32))  # the stored Z is untouched


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    X, y, Z = make_scenes(3)
    transform = JointTransform(SIZE, (0.5,) * 3, (0.5,) * 3, train=True)
    ds = ImageByproductDataset(X, y, Z, transform, seed=7)
    a = ds[1]
    b = ImageByproductDataset(X, y, Z, transform, seed=7)[1]
    torch.testing.assert_close(a[0], b[0])
    ds.epoch = 1
    assert not torch.equal(ds[1][0], a[0])


def test_eval_transform_keeps_point_coordinates():
    transform = JointTransform(16, (0.5,) * 3, (0.5,) * 3, train=False)
    z_in = np.array([0.1, 0.9, 0.5, 0.5], np.float32)
    x, z = transform(Image.new("RGB", (50, 20)), z_in)
    assert x.shape == (3, 16, 16)
    np.testing.assert_array_equal(z, z_in)


def test_warmup_cosine_schedule():
    factors = [_warmup_cosine(s, warmup=2, total=10) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == 1.0 and factors[-1] > 0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    assert _warmup_cosine(10, warmup=2, total=10) == pytest.approx(0.0)


# ------------------------------------------------------------------------------------ fit / predict
def test_fit_predict_with_string_labels_and_attention_head():
    X, y, Z = make_scenes()
    labels = np.array(["cat", "dog"])[y]
    ft = tiny(max_iter=2).fit(X, labels, Z=Z)
    assert ft.classes_.tolist() == ["cat", "dog"] and ft.n_iter_ == 2 and len(ft.loss_curve_) == 2
    assert set(ft.predict(X)) <= {"cat", "dog"}
    proba = ft.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-6)
    points = ft.predict_byproducts(X)
    assert points.shape == (12, 2) and (points >= 0).all() and (points <= 1).all()
    maps = ft.attention_maps(X)
    assert maps.shape == (12, *ft.grid_shape_)
    np.testing.assert_allclose(maps.sum((1, 2)), 1, rtol=1e-5)


def test_inputs_as_paths_pil_and_arrays_agree(tmp_path):
    X, y, Z = make_scenes(6)
    paths = []
    for i, img in enumerate(X):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    ft = tiny().fit(X, y, Z=Z)
    from_array = ft.predict_proba(X)
    np.testing.assert_allclose(ft.predict_proba([str(p) for p in paths]), from_array, atol=1e-6)
    np.testing.assert_allclose(ft.predict_proba([Image.fromarray(a) for a in X]), from_array, atol=1e-6)


def test_per_class_points_give_per_class_maps():
    X, y, _ = make_scenes(9)
    y = np.arange(9) % 3
    Z = np.full((9, 6), np.nan, np.float32)
    Z[np.arange(9), 2 * y] = 0.5
    Z[np.arange(9), 2 * y + 1] = 0.25
    ft = tiny(byproduct_target="point", warm_start=True).fit(X, y, Z=Z)
    assert ft.attention_maps(X[:2]).shape == (2, 3, *ft.grid_shape_)
    assert ft.predict_byproducts(X[:2]).shape == (2, 6)
    ft.fit(X, y)  # warm start without Z keeps the per-class maps, and so does a pickle round trip
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ft)).attention_maps(X), ft.attention_maps(X))


def test_pooled_head_learns_to_regress_the_points():
    X, y, _ = make_scenes(8)
    Z = np.tile(np.array([[0.2, 0.7]], np.float32), (8, 1))
    ft = tiny(head="mlp", augment=False, head_learning_rate=0.02, max_iter=1, warmup_epochs=0)
    before = np.abs(ft.fit(X, y, Z=Z).predict_byproducts(X) - Z).mean()
    after = np.abs(ft.set_params(max_iter=8).fit(X, y, Z=Z).predict_byproducts(X) - Z).mean()
    assert after < 0.5 * before


def test_byproduct_weight_changes_the_model():
    X, y, Z = make_scenes(8)
    a = tiny(byproduct_weight=0.0).fit(X, y, Z=Z).predict_proba(X)
    b = tiny(byproduct_weight=5.0).fit(X, y, Z=Z).predict_proba(X)
    assert not np.allclose(a, b)


def test_trainable_layers_freeze_groups_and_their_batchnorm_statistics():
    X, y, Z = make_scenes(8)
    fresh = tiny(backbone="timm:test_efficientnet")
    fresh.n_byproducts_ = 0
    reference = fresh._build_model(1, None)  # the same seeded initial weights every fit starts from
    frozen = tiny(backbone="timm:test_efficientnet", trainable_layers="frozen").fit(X, y, Z=Z)
    assert_same_state(state_of(frozen.model_.backbone), state_of(reference.backbone))  # stats included

    last = tiny(backbone="timm:test_efficientnet", trainable_layers=1).fit(X, y, Z=Z)
    changed = [
        any(not torch.equal(p, q) for p, q in zip(group, ref))
        for group, ref in zip(last.model_.backbone_groups, reference.backbone_groups)
    ]
    assert changed[-1] and not any(changed[:-1])
    ref_modules = dict(reference.backbone.named_modules())
    frozen_norms = [
        (name, m)
        for name, m in last.model_.backbone.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d) and not m.weight.requires_grad
    ]
    assert frozen_norms
    for name, module in frozen_norms:
        assert torch.equal(module.running_mean, ref_modules[name].running_mean), name


def test_layer_decay_learning_rates():
    X, y, Z = make_scenes(4)
    ft = tiny(learning_rate=1e-3, head_learning_rate=1e-2, layer_decay=0.5, trainable_layers=2)
    ft.n_byproducts_ = 0
    model = ft._build_model(1, None)
    rates = sorted({g["lr"] for g in ft._optimizer(model).param_groups})
    assert rates == [5e-4, 1e-3, 1e-2]


def test_early_stopping_records_validation_scores():
    X, y, Z = make_scenes(16)
    ft = tiny(early_stopping=True, validation_fraction=0.25, n_iter_no_change=1, max_iter=4).fit(X, y, Z)
    assert 1 <= ft.n_iter_ <= 4 and len(ft.validation_scores_) == ft.n_iter_
    assert all(s <= 0 for s in ft.validation_scores_)


def test_warm_start_continues_from_the_fitted_weights():
    X, y, Z = make_scenes(8)
    ft = tiny(warm_start=True).fit(X, y, Z=Z)
    model = ft.model_
    first = state_of(model)
    ft.fit(X, y, Z=Z)
    assert ft.model_ is model
    cold = tiny().fit(X, y, Z=Z)
    assert_same_state(state_of(cold.model_), first)  # the first warm-start fit is an ordinary fit
    assert not torch.equal(ft.model_.head.queries, cold.model_.head.queries)
    with pytest.raises(ValueError, match="classes of the previous fit"):
        ft.fit(X, np.arange(8) % 4, Z=Z)


def _nan_loss(monkeypatch):
    """Make every batch loss NaN (the gradients, then the weights, follow)."""
    original = LUABFineTuner._batch_loss

    def nan_loss(self, *args, **kwargs):
        return original(self, *args, **kwargs) * float("nan")

    monkeypatch.setattr(LUABFineTuner, "_batch_loss", nan_loss)


def test_non_finite_objective_leaves_no_fitted_model(monkeypatch):
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    from luab_sk.nn.engine import NonFiniteObjectiveError

    X, y, Z = make_scenes(8)
    _nan_loss(monkeypatch)
    ft = tiny()
    with pytest.raises(NonFiniteObjectiveError, match="learning_rate"):
        ft.fit(X, y, Z=Z)
    assert "model_" not in vars(ft)
    with pytest.raises(NotFittedError):
        check_is_fitted(ft)
    with pytest.raises(NotFittedError):
        ft.predict(X)


def test_non_finite_objective_keeps_the_warm_started_model(monkeypatch):
    from luab_sk.nn.engine import NonFiniteObjectiveError

    X, y, Z = make_scenes(8)
    ft = tiny(warm_start=True).fit(X, y, Z=Z)
    model, weights, proba = ft.model_, state_of(ft.model_), ft.predict_proba(X)
    attributes = {k: v for k, v in vars(ft).items() if k.endswith("_")}
    _nan_loss(monkeypatch)
    with pytest.raises(NonFiniteObjectiveError):
        ft.set_params(recipe="paper").fit(X, y)  # other fitted attributes too (Z=None, another recipe)
    assert ft.model_ is model and not model.training
    assert_same_state(state_of(ft.model_), weights)
    assert {k: v for k, v in vars(ft).items() if k.endswith("_")}.keys() == attributes.keys()
    assert ft.n_byproducts_ == 2 and ft.loss_curve_ is attributes["loss_curve_"]
    assert ft.augmentation_ is attributes["augmentation_"]
    np.testing.assert_array_equal(ft.predict_proba(X), proba)

    # A fresh refit that fails leaves the estimator unfitted (as LUABClassifier does), not half-fitted.
    ft.set_params(warm_start=False)
    with pytest.raises(NonFiniteObjectiveError):
        ft.fit(X, y, Z=Z)
    assert "model_" not in vars(ft)


def test_workers_do_not_change_the_result():
    X, y, Z = make_scenes(8)
    a = tiny(num_workers=0).fit(X, y, Z=Z)
    b = tiny(num_workers=2).fit(X, y, Z=Z)
    assert_same_state(state_of(a.model_), state_of(b.model_))


# ------------------------------------------------------------------------------------ checkpoints
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    X, y, Z = make_scenes(10)
    params = dict(max_iter=3, early_stopping=True, validation_fraction=0.2, n_iter_no_change=5)
    reference = tiny(checkpoint_dir=str(tmp_path / "a"), **params).fit(X, y, Z=Z)

    calls = {"n": 0}
    original = LUABFineTuner._train_epoch

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LUABFineTuner, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny(checkpoint_dir=str(tmp_path / "b"), **params).fit(X, y, Z=Z)
    monkeypatch.setattr(LUABFineTuner, "_train_epoch", original)
    checkpoint = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2

    resumed = tiny(checkpoint_dir=str(tmp_path / "b"), verbose=0, **params).fit(X, y, Z=Z)
    assert resumed.n_iter_ == reference.n_iter_ == 3
    assert resumed.loss_curve_ == reference.loss_curve_
    assert resumed.validation_scores_ == reference.validation_scores_
    assert_same_state(state_of(resumed.model_), state_of(reference.model_))


def test_checkpoint_of_other_params_or_data_is_refused(tmp_path):
    X, y, Z = make_scenes(8)
    tiny(checkpoint_dir=str(tmp_path)).fit(X, y, Z=Z)
    with pytest.raises(ValueError, match="last.pt.*other parameters or data"):
        tiny(checkpoint_dir=str(tmp_path), byproduct_weight=0.5).fit(X, y, Z=Z)
    with pytest.raises(ValueError, match="other parameters or data"):
        tiny(checkpoint_dir=str(tmp_path)).fit(X, y, Z=Z[::-1].copy())
    tiny(checkpoint_dir=str(tmp_path), byproduct_weight=0.5, resume=False).fit(X, y, Z=Z)  # overwrites


# ------------------------------------------------------------------------------------ sklearn
def test_grid_search_over_byproduct_weight_slices_z_per_fold():
    X, y, Z = make_scenes(12)
    search = GridSearchCV(tiny(), {"byproduct_weight": [0.0, 1.0]}, cv=2, error_score="raise")
    search.fit(X, y, Z=Z)  # a Z not sliced with X would fail the length check inside fit
    assert search.best_params_["byproduct_weight"] in (0.0, 1.0)
    assert search.predict(X).shape == (12,)


def test_pickle_round_trip_stores_weights_only():
    X, y, Z = make_scenes(6)
    ft = tiny().fit(X, y, Z=Z)
    blob = pickle.dumps(ft)
    state = ft.__getstate__()
    assert hasattr(ft, "model_")  # pickling does not change the estimator
    assert "model_" not in state and all(t.device.type == "cpu" for t in state["_model_state"].values())
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone.predict_proba(X), ft.predict_proba(X))


def test_unfitted_estimator_raises():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        tiny().predict(make_scenes(2)[0])


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_image_file_is_named(tmp_path, num_workers):
    X, y, Z = make_scenes(4)
    paths = []
    for i, img in enumerate(X):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(img).save(paths[-1])
    (tmp_path / "2.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ImageLoadError, match="2.png"):
        tiny(num_workers=num_workers).fit(paths, y, Z=Z)


@pytest.mark.parametrize(
    ("Z", "error", "match"),
    [
        (np.zeros((3, 2)), ValueError, "Z has 3 rows but X has 4 samples"),
        (np.zeros((2, 4)), ValueError, "Z has 2 rows but X has 4 samples"),
        ({"x": [0.1] * 4}, TypeError, "dict"),
        (np.zeros((4, 3)), ValueError, "3 columns"),
        (np.full((4, 2), 20.0), ValueError, r"in \[0, 1\] image coordinates"),
    ],
)
def test_bad_z_is_rejected(Z, error, match):
    X, y, _ = make_scenes(4)
    with pytest.raises(error, match=match):
        tiny().fit(X, y, Z=Z)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"head": "transformer"}, "'head' parameter of LUABFineTuner must be"),
        ({"head": "mlp", "byproduct_target": "heatmap"}, "does not fit head='mlp'"),
        ({"trainable_layers": "some"}, "trainable_layers"),
        ({"layer_decay": 0.0}, "layer_decay"),
        ({"amp": "fp16"}, "'amp' parameter of LUABFineTuner must be"),
        ({"max_iter": 0}, "max_iter"),
        ({"crop_scale": (0.5, 2.0)}, "crop_scale"),
        ({"image_size": 4}, "image_size"),
    ],
)
def test_bad_params_are_rejected(params, match):
    X, y, Z = make_scenes(4)
    with pytest.raises(ValueError, match=match):
        tiny(**params).fit(X, y, Z=Z)


@pytest.mark.parametrize(
    ("X", "error", "match"),
    [
        ("images/", TypeError, "single str"),
        (np.zeros((4, 8, 8, 3), np.float32), ValueError, "uint8"),
        ([1, 2, 3, 4], TypeError, r"X\[0\] is a int"),
    ],
)
def test_bad_images_are_rejected(X, error, match):
    with pytest.raises(error, match=match):
        tiny().fit(X, np.arange(4) % 2)


def test_bf16_autocast_and_channels_last_run_on_cpu():
    X, y, Z = make_scenes(8)
    ft = tiny(backbone="timm:test_efficientnet", amp=True, channels_last=True).fit(X, y, Z=Z)
    assert np.isfinite(ft.loss_curve_).all()
    assert ft.predict_proba(X).dtype == np.float64 and np.isfinite(ft.predict_proba(X)).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backbone", "size", "grid"), [("open_clip:ViT-B-32", 224, (7, 7)), ("torchvision:resnet18", 64, (2, 2))]
)
def test_other_backbone_families(backbone, size, grid):
    X, y, Z = make_scenes(4, size=size)
    ft = tiny(backbone=backbone, image_size=size, batch_size=4, trainable_layers=2).fit(X, y, Z=Z)
    assert ft.grid_shape_ == grid and ft.attention_maps(X).shape == (4, *grid)
    trainable = [p.requires_grad for group in ft.model_.backbone_groups for p in group]
    assert any(trainable) and not all(trainable)


def test_verbose_reports_progress(capsys):
    X, y, Z = make_scenes(4)
    tiny(verbose=1).fit(X, y, Z=Z)
    captured = capsys.readouterr()
    assert "Epoch 1: loss" in captured.out and "epoch 1/1" in captured.err
