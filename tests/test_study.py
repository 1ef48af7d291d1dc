import inspect
import json
import os
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from sklearn.utils import Bunch

import luab_sk.study
from luab_sk.cli import DEFAULT_STUDY_DIR, main
from luab_sk.study import (
    DEFAULT_SEEDS,
    METHODS,
    PRESETS,
    _clicked_tokens,
    output_names,
    run_study,
    to_backbone_frame,
)

REPO = Path(__file__).resolve().parents[1]
TRACKED_RESULTS = REPO / "benchmarks" / "results"

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
    "extend_weights": False,
    "n_train_balanced": 8,
}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_run_study_writes_table_record_and_plots(tmp_path):
    result = run_study(**TINY, cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"))
    assert [row["method"] for row in result.table] == list(METHODS)
    assert {row["kind"] for row in result.table} == {"method", "control", "reference"}
    for row in result.table:
        for metric in ("accuracy", "worst_group_accuracy"):
            mean, std = row[metric]
            assert 0 <= mean <= 1 and std >= 0
        assert (row["pointing_game"] is None) == (
            row["method"] in ("linear probe (pooled)", "generalized distillation")
            or row["kind"] == "reference"
        )
    # the plain probe is deterministic: no spread over seeds
    assert result.table[0]["accuracy"][1] == 0.0
    assert len(result.runs) == 2 and result.byproduct_weight in (0.0, 1.0)
    names = sorted(p.rsplit("/", 1)[1] for p in result.files)
    assert names == ["luab_study.json", "luab_study.md", "luab_study_attention.png", "luab_study_weights.png"]
    assert sorted(os.listdir(tmp_path / "out")) == names == sorted(output_names())  # no temporary files left
    record = json.loads((tmp_path / "out" / "luab_study.json").read_text())
    assert record["grid_search"][0]["byproduct_weight"] == [0.0, 1.0]
    assert record["config"]["seeds"] == [0, 1] and "total_s" in record["timings_s"]
    assert 0 <= record["config"]["background_decodability"] <= 1  # the shortcut's strength
    assert record["config"]["n_train_balanced"] == 8  # the oracle's group-balanced training scenes
    assert [r["seed"] for r in record["runs"]] == [0, 1] and record["runs"][0]["data_seed"] == 0
    markdown = (tmp_path / "out" / "luab_study.md").read_text()
    assert "| LUAB, shuffled Z (control) |" in markdown and "worst-group accuracy" in markdown
    assert "| DFR (group-balanced val) (reference) | labels + groups |" in markdown


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


# -- where the study writes: never the tracked benchmarks/results/ (only benchmarks/luab_study.py does)
@pytest.fixture
def fake_study(monkeypatch, tmp_path):
    """``luab study`` with run_study replaced by a recorder that writes empty files; the cwd is tmp_path."""
    calls = []

    def record(**kwargs):
        calls.append(kwargs)
        files = [Path(kwargs["output_dir"]) / n for n in output_names(kwargs["output_name"])]
        for f in files:
            f.write_text("")
        return Bunch(files=[str(f) for f in files])

    monkeypatch.setattr(luab_sk.study, "run_study", record)
    monkeypatch.chdir(tmp_path)
    return calls


def test_the_seeds_default_has_one_source():
    assert inspect.signature(run_study).parameters["seeds"].default == DEFAULT_SEEDS
    assert PRESETS["default"]["seeds"] == DEFAULT_SEEDS


def test_luab_study_writes_to_its_own_folder_with_the_preset_seeds(fake_study, tmp_path, capsys):
    assert main(["study"]) == 0
    (call,) = fake_study
    out = Path(call["output_dir"]).resolve()
    assert out == tmp_path / DEFAULT_STUDY_DIR
    assert call["seeds"] == DEFAULT_SEEDS and call["n_train"] == PRESETS["default"]["n_train"]
    assert sorted(os.listdir(out)) == sorted(output_names("luab_study"))
    assert os.path.join(DEFAULT_STUDY_DIR, "luab_study.md") in capsys.readouterr().out
    assert main(["study", "--quick", "--seeds", "4", "--output-dir", "elsewhere"]) == 0
    assert fake_study[1]["seeds"] == (0, 1, 2, 3) and fake_study[1]["output_name"] == "luab_study_quick"
    assert main(["study", "--quick"]) == 0
    assert fake_study[2]["seeds"] == PRESETS["quick"]["seeds"]


def test_luab_study_never_targets_the_tracked_results(fake_study, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in TRACKED_RESULTS.iterdir()}
    monkeypatch.chdir(REPO)  # even from the repository root, the default is ./luab_output/
    from luab_sk.cli import build_parser

    default = Path(build_parser().parse_args(["study"]).output_dir).resolve()
    assert default == REPO / DEFAULT_STUDY_DIR
    assert TRACKED_RESULTS not in (default, *default.parents)
    assert {p.name: p.stat().st_mtime_ns for p in TRACKED_RESULTS.iterdir()} == before
    gitignore = (REPO / ".gitignore").read_text().split()
    assert f"/{DEFAULT_STUDY_DIR}/" in gitignore


def test_luab_study_needs_force_to_overwrite(fake_study, tmp_path, capsys):
    assert main(["study"]) == 0
    capsys.readouterr()
    assert main(["study"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("luab: error: --output-dir") and "--force" in err and "\n" not in err
    assert len(fake_study) == 1
    assert main(["study", "--force"]) == 0 and len(fake_study) == 2


def test_luab_study_output_errors_are_one_line(fake_study, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    for argv, expected in (
        (["study", "--output-dir", "a_file"], "not a folder"),
        (["study", "--output-dir", "no/such/parent"], "does not exist"),
        (["study", "--seeds", "0"], "--seeds"),
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("luab: error: ") and expected in err and "\n" not in err
    assert fake_study == []


def test_run_study_checks_its_output_folder_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(luab_sk.study, "check_decodability", lambda *a, **k: pytest.fail("work started"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError, match="a_file"):
        run_study(**TINY, output_dir=str(tmp_path / "a_file" / "out"))
    with pytest.raises(ValueError, match="output_name"):
        run_study(**TINY, output_dir=str(tmp_path / "out"), output_name="../escape")
