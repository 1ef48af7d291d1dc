"""The README's code runs as written, on ImageNet-AB-format files and images made here."""

import re
from pathlib import Path

import numpy as np
from PIL import Image

from luab_sk.datasets.imagenet_ab_like import make_imagenet_ab_like

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    (code,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    truth = make_imagenet_ab_like(
        tmp_path / "train_xml", n_classes=2, n_per_class=10, n_malformed=1, random_state=0
    )
    rng = np.random.default_rng(0)
    images = []
    for key, (width, height) in zip(truth.image_keys, truth.image_sizes):
        path = tmp_path / "images" / f"{key}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (int(height) // 4, int(width) // 4, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        images.append(str(path))
    y = [key.split("/")[0] for key in truth.image_keys]

    namespace = {"images": images, "y": y}
    exec(compile(code, str(README), "exec"), namespace)

    records, Z, X, search = (namespace[name] for name in ("records", "Z", "X", "search"))
    assert len(records.errors) == 1  # the malformed file is reported, not fatal
    np.testing.assert_allclose(Z, truth.points, equal_nan=True)
    assert X.shape == (len(images), 1280)
    assert (tmp_path / ".cache" / "luab_sk").is_dir()  # "~" expanded, the cache lives in HOME
    assert search.best_params_["byproduct_weight"] in (0, 0.3, 1, 3)
