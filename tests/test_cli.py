"""The ``luab`` command line: demo, extract and fit end to end on small data, and its one-line errors."""

import os

import joblib
import numpy as np
import pytest
from PIL import Image

from luab_sk import __version__
from luab_sk.cli import main
from luab_sk.datasets.synthetic import make_embedding_classification

TINY_BACKBONE = ["--backbone", "timm:test_vit", "--pretrained", "none"]


def _error_line(capsys, argv, *expected):
    """Run ``luab argv``; assert exit status 1 and one stderr line naming every ``expected`` text."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "%|" not in line]  # progress bars aside
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("luab: error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture
def arrays(tmp_path):
    X, y, Z = make_embedding_classification(150, 32, n_classes=3, random_state=0)
    for name, array in (("X", X), ("y", y), ("Z", Z)):
        np.save(tmp_path / f"{name}.npy", array)
    return X, y, Z


def _fit_argv(tmp_path, out="model.joblib", **files):
    paths = {name: str(tmp_path / f"{name}.npy") for name in ("X", "y", "Z")}
    paths.update(files)
    argv = ["fit", *(f"--{name}={path}" for name, path in paths.items() if path is not None)]
    return [*argv, "--head", "linear", "--out", f"{tmp_path}{os.sep}{out}"]


def _images(folder, n=3, suffix=".png"):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}{suffix}")
    return folder


# -- the happy paths --------------------------------------------------------------------------------------
def test_demo_prints_the_three_lines(capsys):
    assert main(["demo", "--n-samples", "400", "--train-size", "200", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    for line in ("no Z (byproduct_weight=0)", "LUAB with Z", "LUAB with shuffled Z (control)"):
        assert line in out


def test_extract_writes_features_and_reports_corrupt_images(tmp_path, capsys):
    folder = _images(tmp_path / "images")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "feats.npz"
    args = ["extract", str(folder), "--out", str(out), *TINY_BACKBONE]
    assert main([*args, "--output", "both", "--cache-dir", str(tmp_path / "cache")]) == 0
    data = np.load(out)
    assert data["pooled"].shape[0] == data["tokens"].shape[0] == len(data["paths"]) == 4
    broken = list(data["paths"]).index(str(folder / "broken.jpg"))
    assert np.isnan(data["pooled"][broken]).all()
    assert np.isfinite(np.delete(data["pooled"], broken, axis=0)).all()
    err = capsys.readouterr().err
    assert "1 of 4 images could not be read" in err and str(folder / "broken.jpg") in err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_extract_finds_every_pillow_format_and_says_what_it_ignored(tmp_path, capsys):
    folder = _images(tmp_path / "images", n=1, suffix=".webp")
    _images(folder / "sub", n=1, suffix=".tif")
    (folder / "notes.txt").write_text("not an image")
    (folder / "._img0.webp").write_bytes(b"AppleDouble junk")
    out = tmp_path / "feats.npz"
    assert main(["extract", str(folder), "--out", str(out), *TINY_BACKBONE]) == 0
    assert sorted(os.path.basename(p) for p in np.load(out)["paths"]) == ["img0.tif", "img0.webp"]
    err = capsys.readouterr().err
    assert "ignored 2 file(s)" in err and "could not be read" not in err


def test_extract_normalises_the_suffix_and_reports_the_written_path(tmp_path, capsys):
    folder = _images(tmp_path / "images", n=2)
    assert main(["extract", str(folder), "--out", str(tmp_path / "feats"), *TINY_BACKBONE]) == 0
    assert (tmp_path / "feats.npz").is_file() and not (tmp_path / "feats").exists()
    assert capsys.readouterr().out.strip().endswith(f"to {tmp_path / 'feats.npz'}")


def test_extract_fails_when_no_image_can_be_read(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        (folder / f"broken{i}.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "feats.npz"
    line = _error_line(capsys, ["extract", str(folder), "--out", str(out), *TINY_BACKBONE], "none of the 2")
    assert "broken0.jpg" in line
    assert not out.exists()


def test_fit_saves_a_model_that_predicts(tmp_path, arrays, capsys):
    X, y, Z = arrays
    assert main([*_fit_argv(tmp_path, out="model"), "--cv", "3"]) == 0
    out = capsys.readouterr().out
    assert "3-fold accuracy" in out and out.strip().endswith(str(tmp_path / "model.joblib"))
    clf = joblib.load(tmp_path / "model.joblib")
    assert clf.n_byproducts_ == Z.shape[1]
    assert clf.score(X, y) > 0.5
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "model.joblib").st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_existing_outputs_need_force(tmp_path, arrays, capsys):
    model = tmp_path / "model.joblib"
    model.write_bytes(b"precious")
    _error_line(capsys, _fit_argv(tmp_path), "--out", "exists", "--force")
    assert model.read_bytes() == b"precious"
    assert main([*_fit_argv(tmp_path), "--force"]) == 0
    assert joblib.load(model).n_features_in_ == arrays[0].shape[1]


# -- one line per user error ------------------------------------------------------------------------------
def test_usage_errors_are_one_line(capsys):
    _error_line(capsys, ["fit", "--X", "x.npy"], "required", "--y", "--out")
    _error_line(capsys, ["nonsense"], "invalid choice")
    _error_line(capsys, [], "required")


@pytest.mark.parametrize(
    "option, value",
    [
        ("--byproduct-weight", "inf"),
        ("--byproduct-weight", "nan"),
        ("--byproduct-weight", "-1"),
        ("--cv", "1"),
        ("--cv", "two"),
    ],
)
def test_bad_fit_options_are_one_line(tmp_path, arrays, capsys, option, value):
    _error_line(capsys, [*_fit_argv(tmp_path), option, value], option, repr(value))
    assert not (tmp_path / "model.joblib").exists()


def test_output_errors_come_before_any_work(tmp_path, arrays, capsys, monkeypatch):
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("inputs were read before --out was checked"))
    _error_line(capsys, _fit_argv(tmp_path, out="missing_dir/m.joblib"), "--out", "missing_dir", "not exist")
    _error_line(capsys, _fit_argv(tmp_path, out="sub/"), "--out", "is a folder")
    images = ["extract", str(tmp_path), *TINY_BACKBONE, "--out"]
    _error_line(capsys, [*images, str(tmp_path / "nowhere" / "f.npz")], "--out", "nowhere")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_folder_is_one_line(tmp_path, arrays, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _error_line(capsys, _fit_argv(tmp_path, out="locked/m.joblib"), "--out", "not writable")


def test_input_file_errors_are_one_line(tmp_path, arrays, capsys):
    X, y, Z = arrays
    _error_line(capsys, _fit_argv(tmp_path, X=str(tmp_path / "nope.npy")), "--X", "nope.npy", "no such file")
    (tmp_path / "garbage.npy").write_bytes(b"not a numpy file at all")
    _error_line(capsys, _fit_argv(tmp_path, X=str(tmp_path / "garbage.npy")), "--X", "garbage.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}] * len(y), dtype=object), allow_pickle=True)
    _error_line(capsys, _fit_argv(tmp_path, y=str(tmp_path / "objects.npy")), "--y", "Python objects")
    np.savez(tmp_path / "feats.npz", pooled=X)
    _error_line(capsys, _fit_argv(tmp_path, X=str(tmp_path / "feats.npz")), "--X", ".npz archive", "pooled")
    _error_line(capsys, _fit_argv(tmp_path, X=str(tmp_path)), "--X", "folder")
    assert not (tmp_path / "model.joblib").exists()


@pytest.mark.parametrize(
    "name, bad, expected",
    [
        ("Z", lambda X, y, Z: Z.T, "--Z"),
        ("Z", lambda X, y, Z: Z[:-1], "--Z"),
        ("Z", lambda X, y, Z: Z[:, 0], "--Z"),
        ("y", lambda X, y, Z: y[:-1], "--y"),
        ("y", lambda X, y, Z: y[:, None], "--y"),
        ("y", lambda X, y, Z: np.where(np.arange(len(y)) == 0, np.nan, y.astype(float)), "--y"),
        ("X", lambda X, y, Z: X[:, 0], "--X"),
        ("X", lambda X, y, Z: X.astype(str), "--X"),
    ],
)
def test_input_shape_errors_are_one_line(tmp_path, arrays, capsys, name, bad, expected):
    np.save(tmp_path / "bad.npy", bad(*arrays))
    _error_line(capsys, _fit_argv(tmp_path, **{name: str(tmp_path / "bad.npy")}), expected, "bad.npy")
    assert not (tmp_path / "model.joblib").exists()


def test_attention_head_needs_tokens(tmp_path, arrays, capsys):
    _error_line(capsys, [*_fit_argv(tmp_path), "--head", "attention"], "--head attention", "(n, L, C)")


def test_estimator_value_errors_are_one_line(tmp_path, arrays, capsys, monkeypatch):
    from luab_sk.estimators.classifier import LUABClassifier

    def refuse(self, *args, **kwargs):
        raise ValueError("byproduct_weight must be a finite number >= 0,\n got inf.")

    monkeypatch.setattr(LUABClassifier, "fit", refuse)
    _error_line(capsys, _fit_argv(tmp_path), "could not be fitted", "byproduct_weight")
    _error_line(capsys, [*_fit_argv(tmp_path), "--cv", "2"], "--cv 2", "byproduct_weight")
    assert not (tmp_path / "model.joblib").exists()


def test_a_model_with_non_finite_predictions_is_never_saved(tmp_path, arrays, capsys, monkeypatch):
    from luab_sk.estimators.classifier import LUABClassifier

    monkeypatch.setattr(LUABClassifier, "predict_proba", lambda self, X: np.full((len(X), 3), np.nan))
    _error_line(capsys, _fit_argv(tmp_path), "NaN or infinite", "not saved")
    assert not (tmp_path / "model.joblib").exists()


def test_a_failed_write_leaves_nothing_behind(tmp_path, arrays, capsys, monkeypatch):
    def broken_dump(value, fh):
        fh.write(b"half a model")
        raise OSError("No space left on device")

    monkeypatch.setattr(joblib, "dump", broken_dump)
    _error_line(capsys, _fit_argv(tmp_path), "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X.npy", "Z.npy", "y.npy"]


def test_image_errors_are_one_line(tmp_path, capsys):
    out = ["--out", str(tmp_path / "f.npz")]
    _error_line(capsys, ["extract", str(tmp_path / "nowhere"), *out], "image path", "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    _error_line(capsys, ["extract", str(empty), *out], "no images found", "empty")
    folder = _images(tmp_path / "images", n=1)
    argv = ["extract", str(folder), *out, "--pretrained", "none"]
    _error_line(capsys, [*argv, "--backbone", "timm:no_such_net"], "--backbone", "no_such_net")
    _error_line(capsys, [*argv, "--backbone", "nofamily"], "--backbone", "nofamily")
    _error_line(capsys, [*argv, "--batch-size", "0"], "--batch-size")
    missing = str(tmp_path / "missing.pt")
    _error_line(capsys, [*argv, "--backbone", "timm:resnet10t", "--pretrained", missing], "missing.pt")
    assert not (tmp_path / "f.npz").exists()


def test_debug_shows_the_traceback(tmp_path, arrays, capsys):
    argv = _fit_argv(tmp_path, X=str(tmp_path / "nope.npy"))
    for position in ([*argv, "--debug"], ["--debug", *argv]):
        assert main(position) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err
        assert err.strip().splitlines()[-1].startswith("luab: error: --X")


def test_unexpected_errors_are_one_line_too(tmp_path, arrays, capsys, monkeypatch):
    import luab_sk.cli

    monkeypatch.setattr(luab_sk.cli, "_check_fit_inputs", lambda *a: 1 / 0)
    _error_line(capsys, _fit_argv(tmp_path), "ZeroDivisionError", "--debug")


def test_version_and_the_pickle_warning_in_the_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"luab {__version__}"
    assert main(["fit", "--help"]) == 0
    assert "pickle" in " ".join(capsys.readouterr().out.split())


def test_extract_on_ray_needs_a_cache_dir_before_any_work(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    out = ["--out", str(tmp_path / "f")]
    _error_line(capsys, ["extract", str(image), "--ray", *out], "--ray needs --cache-dir")
    _error_line(
        capsys,
        ["extract", "--ray", str(image), str(image), "--cache-dir", str(tmp_path), *out],
        "--ray took",
        "write --ray=ADDRESS",
    )
    assert not (tmp_path / "f.npz").exists()
