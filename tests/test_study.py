import json

import matplotlib
import numpy as np
import pytest
from sklearn.utils import Bunch

from luab_sk.study import METHODS, _clicked_tokens, run_study, to_backbone_frame

matplotlib.use("Agg")

TINY = {
    "n_train": 24,
    "n_val": 8,
    "n_test": 16,
    "image_size": 64,
    "seeds": (0, 1),
    "byproduct_weights": (0.0, 1.0),
    "backbone": "timm:resnet10t",
    "pretrained": None,
    "min_decodability": 0.0,
    "n_decodability": 20,
    "verbose": 0,
    "luab_params": {"max_iter": 5, "n_components": 8, "hidden_size": 8},
}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_run_study_writes_table_record_and_plots(tmp_path):
    result = run_study(**TINY, cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"))
    assert [row["method"] for row in result.table] == list(METHODS)
    for row in result.table:
        for metric in ("accuracy", "worst_group_accuracy"):
            mean, std = row[metric]
            assert 0 <= mean <= 1 and std >= 0
        assert (row["pointing_game"] is None) == (
            row["method"] in ("linear probe (pooled)", "generalized distillation")
        )
    # the plain probe is deterministic: no spread over seeds
    assert result.table[0]["accuracy"][1] == 0.0
    assert len(result.runs) == 2 and result.byproduct_weight in (0.0, 1.0)
    names = sorted(p.rsplit("/", 1)[1] for p in result.files)
    assert names == ["luab_study.json", "luab_study.md", "luab_study_attention.png", "luab_study_weights.png"]
    record = json.loads((tmp_path / "out" / "luab_study.json").read_text())
    assert record["grid_search"]["byproduct_weight"] == [0.0, 1.0]
    assert record["config"]["seeds"] == [0, 1] and "total_s" in record["timings_s"]
    markdown = (tmp_path / "out" / "luab_study.md").read_text()
    assert "| LUAB, shuffled Z |" in markdown and "worst-group accuracy" in markdown


def test_run_study_stops_when_the_foreground_is_not_decodable():
    with pytest.raises(RuntimeError, match="min_decodability"):
        run_study(**{**TINY, "min_decodability": 1.01})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seeds": ()}, "seeds"),
        ({"byproduct_weights": (-1.0,)}, "byproduct_weights"),
        ({"luab_params": {"byproduct_weight": 2.0}}, "luab_params"),
    ],
)
def test_run_study_parameter_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_study(**{**TINY, **kwargs})


def test_clicked_tokens_pick_the_cell_under_the_click():
    tokens = np.arange(2 * 6 * 1, dtype=float).reshape(2, 6, 1)  # grid 2 x 3, token value = its index
    clicks = np.array([[0.9, 0.9], [np.nan, np.nan]])
    out = _clicked_tokens(tokens, clicks, (2, 3))
    assert out[0, 0] == 5.0  # row 1, column 2
    assert np.isnan(out[1]).all()
    edge = _clicked_tokens(tokens[:1], np.array([[1.0, 0.0]]), (2, 3))
    assert edge[0, 0] == 2.0  # x = 1 falls in the last column


def test_backbone_frame_follows_the_centre_crop():
    scenes = Bunch(
        images=np.zeros((2, 224, 224, 3), dtype=np.uint8),
        Z=np.array([[0.5, 0.5], [0.01, 0.5]]),
        boxes=np.array([[0.0, 0.25, 0.5, 0.75], [0.4, 0.4, 0.6, 0.6]]),
    )
    seen = to_backbone_frame(scenes, "timm:resnet10t")
    crop = 224 * 0.875  # resnet10t's crop_pct
    assert seen.crop_box[2] == pytest.approx(crop) and seen.images.shape == (2, 196, 196, 3)
    np.testing.assert_allclose(seen.Z[0], [0.5, 0.5])
    assert np.isnan(seen.Z[1]).all()  # outside the crop: masked
    scale = 224 / crop
    np.testing.assert_allclose(seen.boxes[0], [0.0, 0.5 - 0.25 * scale, 0.5, 0.5 + 0.25 * scale])
    np.testing.assert_allclose(seen.boxes[1], [0.5 + (v - 0.5) * scale for v in (0.4, 0.4, 0.6, 0.6)])
