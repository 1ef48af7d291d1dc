"""The public study API: StudyData on your images or features, the Method registry, the weight search."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.utils import Bunch

import luab_sk.study
from luab_sk.cli import main
from luab_sk.features import FeatureExtractor
from luab_sk.study import (
    DEFAULT_BYPRODUCT_WEIGHTS,
    METHODS,
    Method,
    StudyData,
    default_methods,
    evaluate_method,
    run_study,
    select_byproduct_weight,
    to_backbone_frame,
)

FAST = {"max_iter": 5, "n_components": 4, "hidden_size": 4}
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _features(n_per_split=(24, 16, 16, 16), grid=(2, 2), d=6, seed=0):
    """Separable toy features with a background shortcut: the group decides one pooled dimension."""
    rng = np.random.default_rng(seed)
    names = ("train", "val", "test", "train_balanced")
    split = np.concatenate([[s] * n for s, n in zip(names, n_per_split)])
    n = len(split)
    y = np.tile([0, 1], n // 2)
    background = np.where(split == "train", y, rng.integers(0, 2, n))
    pooled = rng.normal(size=(n, d))
    pooled[:, 0] += 4 * y
    pooled[:, 1] += 3 * background
    L = grid[0] * grid[1]
    tokens = rng.normal(size=(n, L, d))
    tokens[np.arange(n), 0, 0] += 2 * y  # the object sits in cell 0, the top-left quarter
    Z = np.tile([0.25, 0.25], (n, 1)) + 0.02 * rng.normal(size=(n, 2))
    Z[::7] = np.nan
    boxes = np.tile([0.0, 0.0, 0.5, 0.5], (n, 1))
    return dict(
        y=np.array(["cat", "dog"])[y],
        split=split,
        pooled=pooled,
        tokens=tokens,
        grid=grid,
        group=y * 2 + background,
        Z=Z,
        boxes=boxes,
    )


def test_study_data_from_features_and_the_methods_it_can_run():
    cols = _features()
    data = StudyData.from_features(cols.pop("y"), cols.pop("split"), **cols)
    assert data.class_names == ["cat", "dog"] and data.grid == (2, 2)
    assert [k for k in data.splits] == ["train", "val", "test", "train_balanced"]
    assert all(data.has(w) for w in ("pooled", "tokens", "Z", "group", "boxes", "train_balanced"))
    assert not data.has("images")
    np.testing.assert_array_equal(data["train"].Z_seen, data["train"].Z)  # features: their own frame
    assert all(not m.missing(data) for m in METHODS.values())
    pooled_only = StudyData.from_features(
        _features()["y"][:56], _features()["split"][:56], pooled=_features()["pooled"][:56]
    )
    assert set(METHODS["LUAB, Z"].missing(pooled_only)) == {"Z"}
    assert METHODS["oracle (balanced training)"].missing(pooled_only) == ["train_balanced"]
    with pytest.raises(ValueError, match="'val'"):
        StudyData.from_features([0, 1], ["train", "test"], pooled=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="Z"):
        StudyData.from_features(
            [0, 1, 0], ["train", "val", "test"], pooled=np.zeros((3, 2)), Z=np.ones((3, 3))
        )


def test_run_study_on_features_with_a_custom_method(tmp_path):
    cols = _features()
    np.savez(tmp_path / "feats.npz", **cols)
    calls = []

    def majority(data, seed, context):
        calls.append((seed, context.byproduct_weight, context.input, context.extractor))
        return Bunch(pred=np.zeros(len(data["test"].y), dtype=int))

    keep = ("linear probe (pooled)", "LUAB, Z", "DFR (group-balanced val)", "oracle (balanced training)")
    methods = {
        **{k: METHODS[k] for k in keep},
        "always cat": Method(majority, requires=("pooled",), uses="nothing"),
    }
    result = run_study(
        str(tmp_path / "feats.npz"),
        methods=methods,
        seeds=(0, 1),
        byproduct_weights=(0.0, 1.0),
        extend_weights=False,
        luab_params=FAST,
        verbose=0,
        output_dir=str(tmp_path / "out"),
        plots=False,
    )
    names = [row["method"] for row in result.table]
    assert names == [*keep, "always cat"]
    assert result.decodability is None and result.skipped == {}
    assert [c[0] for c in calls] == [0, 1] and calls[0][2:] == ("tokens", None)
    assert calls[0][1] == result.byproduct_weight in (0.0, 1.0)
    cat = result.table[-1]
    assert cat["accuracy"] == (0.5, 0.0) and cat["worst_group_accuracy"][0] == 0.0
    oracle = next(r for r in result.table if r["method"] == "oracle (balanced training)")
    assert oracle["kind"] == "reference" and oracle["worst_group_accuracy"][0] > 0.5
    record = json.loads((tmp_path / "out" / "luab_study.json").read_text())
    assert record["config"]["source"] == "data" and record["config"]["n_runs"] == 2
    assert "over 2 runs" in result.markdown


def test_pooled_only_data_skips_what_it_cannot_run():
    cols = _features(n_per_split=(24, 16, 16, 0))
    data = StudyData.from_features(cols["y"], cols["split"], pooled=cols["pooled"], Z=cols["Z"])
    result = run_study(
        data,
        seeds=(0,),
        byproduct_weights=(0.0, 1.0),
        extend_weights=False,
        luab_params={"max_iter": 5},
        verbose=0,
    )
    names = [row["method"] for row in result.table]
    assert names == ["linear probe (pooled)", "LUAB, Z", "LUAB, shuffled Z", "LUAB, kNN-imputed Z"]
    assert result.skipped["DFR (group-balanced val)"] == ["group"]
    assert all(row["worst_group_accuracy"] is None for row in result.table)
    assert "Skipped" in result.markdown
    with pytest.raises(ValueError, match="data_seeds"):
        run_study(data, data_seeds=(0, 1), verbose=0)


def test_weight_grid_widens_while_its_top_wins(monkeypatch):
    class FakeSearch:  # validation accuracy peaks at byproduct_weight = 1000
        def __init__(self, estimator, grid, **kwargs):
            self.weights = grid["byproduct_weight"]

        def fit(self, X, y, Z=None):
            w = np.asarray(self.weights, dtype=float)
            self.cv_results_ = {"mean_test_score": 1 - np.abs(np.log10(np.maximum(w, 1e-3) / 1000)) / 10}
            return self

    monkeypatch.setattr(luab_sk.study, "GridSearchCV", FakeSearch)
    cols = _features()
    data = StudyData.from_features(cols.pop("y"), cols.pop("split"), **cols)
    search = select_byproduct_weight(data)
    assert max(DEFAULT_BYPRODUCT_WEIGHTS) == 300.0
    assert search.extended == [1000.0, 3000.0] and search.weight == 1000.0 and search.interior
    assert search.weights[-3:] == [300.0, 1000.0, 3000.0]
    capped = select_byproduct_weight(data, (0.0, 1.0), max_extensions=2)
    assert capped.extended == [3.0, 10.0] and capped.weight == 10.0 and not capped.interior
    assert select_byproduct_weight(data, (0.0, 1.0), extend=False).extended == []


def test_evaluate_method_and_a_fresh_registry():
    cols = _features()
    data = StudyData.from_features(cols.pop("y"), cols.pop("split"), **cols)
    metrics = evaluate_method(METHODS["LUAB, Z"], data, seed=0, luab_params=FAST)
    assert set(metrics) == {"accuracy", "worst_group_accuracy", "pointing_game", "fit_s", "output"}
    assert 0 <= metrics["pointing_game"] <= 1 and metrics["output"].attention.shape[0] == 16
    fresh = default_methods()
    fresh.pop("LUAB, Z")
    assert "LUAB, Z" in METHODS  # the registry is read-only; default_methods() returns a copy
    with pytest.raises(TypeError):
        METHODS["mine"] = fresh["LUAB, shuffled Z"]
    with pytest.raises(ValueError, match="unknown methods"):
        run_study(
            StudyData.from_features(cols["group"][:3], ["train", "val", "test"], pooled=np.zeros((3, 2))),
            methods=["nope"],
            verbose=0,
        )


def test_backbone_frame_of_images_of_any_size(tmp_path):
    wide = np.zeros((100, 200, 3), np.uint8)  # w=200, h=100: the centre crop is the middle square, side 87.5
    tall = tmp_path / "tall.png"
    Image.fromarray(np.zeros((200, 100, 3), np.uint8)).save(tall)
    scenes = Bunch(
        images=[wide, str(tall)],
        Z=np.array([[0.5, 0.5], [0.5, 0.2]]),
        boxes=np.array([[0.4, 0.0, 0.6, 1.0], [0.0, 0.0, 1.0, 0.1]]),
    )
    seen = to_backbone_frame(scenes, "timm:resnet10t")  # crop_pct 0.875
    side = 100 * 0.875
    np.testing.assert_allclose(seen.crop_box, [[50 + 6.25, 6.25, side, side], [6.25, 50 + 6.25, side, side]])
    np.testing.assert_allclose(seen.Z[0], [0.5, 0.5])
    assert np.isnan(seen.Z[1]).all()  # y = 0.2 of 200 px = 40 px, above the crop (56.25 .. 143.75)
    x0 = (0.4 * 200 - 56.25) / side
    np.testing.assert_allclose(seen.boxes[0], [x0, 0.0, 1 - x0, 1.0])
    assert seen.images is None


def _write_csv(folder, n=24):
    """Small scenes on disk with a CSV: faces vs non-faces, clicks and boxes in image coordinates."""
    from luab_sk.datasets import make_spurious_scenes

    scenes = make_spurious_scenes(n, image_size=48, correlation=0.5, missing_rate=0.2, random_state=0)
    split = np.array(["train", "val", "test"])[np.arange(n) % 3]
    rows = []
    for i in range(n):
        name = f"img{i}.png"
        Image.fromarray(scenes.images[i]).save(folder / name)
        click = ["" if np.isnan(v) else f"{v:.4f}" for v in scenes.Z[i]]
        rows.append(
            [
                name,
                scenes.class_names[scenes.y[i]],
                split[i],
                f"bg{scenes.background[i]}",
                *click,
                *(f"{v:.4f}" for v in scenes.boxes[i]),
            ]
        )
    with open(folder / "data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["path", "label", "split", "group", "click_x", "click_y", "box_x0", "box_y0", "box_x1", "box_y1"]
        )
        writer.writerows(rows)
    return scenes


@pytest.mark.slow
def test_run_study_on_a_csv_of_images(tmp_path):
    scenes = _write_csv(tmp_path)
    data = StudyData.from_csv(tmp_path / "data.csv")
    assert data.has("images") and data.has("Z") and data.has("group") and "train_balanced" not in data
    assert data.class_names == ["faces", "nonfaces"]
    cache = str(tmp_path / "cache")
    fe = FeatureExtractor("timm:resnet10t", pretrained=None, output="both", token_dim=8, cache_dir=cache)
    seen = data.featurize(fe)
    expected = to_backbone_frame(Bunch(images=scenes.images[::3], Z=scenes.Z[::3]), "timm:resnet10t").Z
    np.testing.assert_allclose(seen["train"].Z_seen, expected, atol=1e-4)  # mapped inside, not by the user
    assert seen["train"].tokens.shape[2] == 8 and seen.grid == fe.grid_
    result = run_study(
        str(tmp_path / "data.csv"),
        seeds=(0,),
        byproduct_weights=(0.0, 1.0),
        extend_weights=False,
        methods=[
            "linear probe (pooled)",
            "LUAB, Z",
            "DFR (group-balanced val)",
            "oracle (balanced training)",
        ],
        backbone="timm:resnet10t",
        pretrained=None,
        token_dim=8,
        cache_dir=cache,
        luab_params=FAST,
        min_decodability=0.0,
        verbose=0,
        output_dir=str(tmp_path / "out"),
    )
    assert 0.0 <= result.decodability <= 1.0  # on the images cut to their boxes
    assert result.skipped == {"oracle (balanced training)": ["train_balanced"]}
    luab = next(r for r in result.table if r["method"] == "LUAB, Z")
    assert luab["pointing_game"] is not None and luab["worst_group_accuracy"] is not None
    assert len(result.files) == 4 and all(Path(f).stat().st_size > 0 for f in result.files)


def test_luab_study_passes_data_features_and_backgrounds(monkeypatch, tmp_path):
    calls = []

    def record(**kwargs):
        calls.append(kwargs)
        return Bunch(files=[])

    monkeypatch.setattr(luab_sk.study, "run_study", record)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("path,label,split\n")
    np.savez(tmp_path / "feats.npz", y=[0])
    assert main(["study", "--data", "data.csv", "--seeds", "2"]) == 0
    assert calls[-1]["data"] == "data.csv" and calls[-1]["seeds"] == (0, 1) and "n_train" not in calls[-1]
    assert calls[-1]["output_name"] == "luab_study_data"
    assert main(["study", "--features", "feats.npz"]) == 0 and calls[-1]["data"] == "feats.npz"
    assert main(["study", "--backgrounds", "photos", "--quick"]) == 0
    assert calls[-1]["backgrounds"] == "photos" and calls[-1]["output_name"] == "luab_study_photos_quick"
    assert main(["study", "--data", "missing.csv"]) == 1
    assert main(["study", "--data", "data.csv", "--features", "feats.npz"]) == 1
    assert len(calls) == 3


def test_two_stage_hook_is_two_method_entries():
    from luab_sk.study import two_stage_methods

    lines = two_stage_methods(crop_size=0.3)
    assert list(lines) == ["two-stage, Z", "two-stage, shuffled Z"]
    assert lines["two-stage, shuffled Z"].kind == "control" and lines["two-stage, Z"].uses == "labels + Z"
    cols = _features()
    data = StudyData.from_features(cols.pop("y"), cols.pop("split"), **cols)
    assert lines["two-stage, Z"].missing(data) == ["images"]  # it crops images: features are not enough


@pytest.mark.parametrize(
    ("cell", "column"),
    [("abc", "click_x"), ("0_5", "click_x"), ("1.7", "click_x"), ("inf", "click_x"), ("-0.1", "click_y")],
)
def test_csv_numbers_are_strict_and_errors_name_the_cell(tmp_path, cell, column):
    click = {"click_x": "0.5", "click_y": "0.5", column: cell}
    rows = ["path,label,split,click_x,click_y", "a.png,0,train,0.5,0.5"]
    rows.append(f"b.png,1,test,{click['click_x']},{click['click_y']}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    match = rf"data\.csv' line 3, column '{column}': '{cell}' is not a number in \[0, 1\]"
    with pytest.raises(ValueError, match=match):
        StudyData.from_csv(tmp_path / "data.csv")


def test_npz_with_object_arrays_is_refused_naming_the_file(tmp_path):
    np.savez(tmp_path / "f.npz", y=np.array([0, 1], dtype=object), split=np.array(["train", "test"]))
    with pytest.raises(ValueError, match=r"f\.npz' is not a readable \.npz of plain arrays"):
        StudyData.from_npz(tmp_path / "f.npz")
