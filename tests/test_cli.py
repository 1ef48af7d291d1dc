"""The ``luab`` command line: demo, extract and fit, end to end on small data."""

import joblib
import numpy as np
import pytest
from PIL import Image

from luab_sk.cli import main
from luab_sk.datasets.synthetic import make_embedding_classification


def test_demo_prints_the_three_lines(capsys):
    assert main(["demo", "--n-samples", "400", "--train-size", "200", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    for line in ("no Z (byproduct_weight=0)", "LUAB with Z", "LUAB with shuffled Z (control)"):
        assert line in out


def test_extract_writes_features_and_reports_corrupt_images(tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "feats.npz"
    args = ["extract", str(folder), "--out", str(out), "--backbone", "timm:test_vit", "--pretrained", "none"]
    assert main([*args, "--output", "both", "--cache-dir", str(tmp_path / "cache")]) == 0
    data = np.load(out)
    assert data["pooled"].shape[0] == data["tokens"].shape[0] == len(data["paths"]) == 4
    broken = list(data["paths"]).index(str(folder / "broken.jpg"))
    assert np.isnan(data["pooled"][broken]).all()
    assert np.isfinite(np.delete(data["pooled"], broken, axis=0)).all()
    assert "broken.jpg" in capsys.readouterr().err


def test_extract_names_a_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(["extract", str(tmp_path / "nowhere"), "--out", str(tmp_path / "f.npz")])


def test_fit_saves_a_model_that_predicts(tmp_path, capsys):
    X, y, Z = make_embedding_classification(150, 32, n_classes=3, random_state=0)
    for name, array in (("X", X), ("y", y), ("Z", Z)):
        np.save(tmp_path / f"{name}.npy", array)
    model = tmp_path / "model.joblib"
    argv = ["fit", *(f"--{name}={tmp_path / name}.npy" for name in ("X", "y", "Z"))]
    assert main([*argv, "--head", "linear", "--cv", "3", "--out", str(model)]) == 0
    assert "3-fold accuracy" in capsys.readouterr().out
    clf = joblib.load(model)
    assert clf.n_byproducts_ == Z.shape[1]
    assert clf.score(X, y) > 0.5
