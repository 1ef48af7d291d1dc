"""FeatureExtractor: outputs, inputs, projection, errors, caching and sklearn integration."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

from luab_sk.features import Backbone, FeatureExtractor, cache_info, clear_cache, load_backbone

TINY = "timm:test_vit"  # 160 px, 10 x 10 tokens of width 64


def make_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (n, 48, 64, 3), dtype=np.uint8)


@pytest.fixture
def image_files(tmp_path):
    paths = []
    for i, arr in enumerate(make_images(6, seed=1)):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(path)
        paths.append(str(path))
    return paths


def reference(images, **kw):
    bb = load_backbone(TINY, **kw).eval()
    x = torch.stack([bb.eval_transform()(Image.fromarray(a)) for a in images])
    with torch.no_grad():
        return bb(x)


def test_outputs_match_the_backbone():
    images = make_images(5)
    ref = reference(images)
    fe = FeatureExtractor(TINY, pretrained=None, output="both", batch_size=2)
    out = fe.fit(images).transform(images)
    np.testing.assert_allclose(out["pooled"], ref["pooled"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["tokens"], ref["tokens"].numpy(), rtol=1e-5, atol=1e-5)
    assert fe.grid_ == (10, 10) and fe.pooled_dim_ == 64 and fe.token_dim_ == 64
    assert fe.failed_ == [] and fe.n_encoded_ == 5 and fe.cache_key_ is None
    pooled = FeatureExtractor(TINY, pretrained=None).transform(images)
    assert pooled.shape == (5, 64) and pooled.dtype == np.float32


def test_every_input_kind_gives_the_same_rows(image_files):
    arrays = [np.asarray(Image.open(p)) for p in image_files]
    fe = FeatureExtractor(TINY, pretrained=None)
    expected = fe.transform(image_files)

    class Tuples(torch.utils.data.Dataset):
        def __len__(self):
            return len(arrays)

        def __getitem__(self, i):
            return Image.fromarray(arrays[i]), i % 2

    for images in (np.stack(arrays), arrays, [Image.fromarray(a) for a in arrays], Tuples()):
        np.testing.assert_allclose(fe.transform(images), expected, rtol=1e-5, atol=1e-5)


def test_layer_float16_and_projection(tmp_path):
    images = make_images(4)
    fe = FeatureExtractor(
        TINY, pretrained=None, output="tokens", layer=1, dtype="float16", token_dim=8, cache_dir=str(tmp_path)
    )
    tokens = fe.transform(images)
    assert tokens.shape == (4, 100, 8) and tokens.dtype == np.float16
    proj = fe.projection_
    np.testing.assert_allclose(proj.T @ proj, np.eye(8), atol=1e-5)
    full = FeatureExtractor(TINY, pretrained=None, output="tokens", layer=1).transform(images)
    np.testing.assert_allclose(tokens, (full @ proj).astype(np.float16), rtol=2e-2, atol=2e-2)
    stored = np.load(tmp_path / fe.cache_key_ / "projection.npy", allow_pickle=False)
    np.testing.assert_array_equal(stored, proj)
    other = FeatureExtractor(
        TINY,
        pretrained=None,
        output="tokens",
        layer=1,
        dtype="float16",
        token_dim=8,
        projection_seed=1,
        cache_dir=str(tmp_path),
    )
    other.transform(images)
    assert other.cache_key_ != fe.cache_key_ and other.n_encoded_ == 4


def test_on_error_skip_and_raise(tmp_path, image_files):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    items = [image_files[0], str(bad), str(tmp_path / "missing.png"), image_files[1]]
    for cache_dir in (None, str(tmp_path / "cache")):
        fe = FeatureExtractor(TINY, pretrained=None, on_error="skip", cache_dir=cache_dir)
        out = fe.transform(items)
        assert np.isnan(out[1:3]).all() and np.isfinite(out[[0, 3]]).all()
        assert [f[0] for f in fe.failed_] == [1, 2]
        assert "bad.jpg" in fe.failed_[0][1] and "missing.png" in fe.failed_[1][2]
        with pytest.raises(OSError, match="bad.jpg"):
            FeatureExtractor(TINY, pretrained=None, cache_dir=cache_dir).transform(items[:2])
        with pytest.raises(OSError, match="missing.png"):
            FeatureExtractor(TINY, pretrained=None, cache_dir=cache_dir).transform(items[2:])


def test_cache_reuse_memmap_and_helpers(tmp_path, image_files):
    cache_dir = str(tmp_path / "cache")
    fe = FeatureExtractor(TINY, pretrained=None, cache_dir=cache_dir, shard_size=4, batch_size=3)
    first = np.array(fe.transform(image_files))
    assert fe.n_encoded_ == 6 and fe.n_cached_ == 0
    again = fe.transform(image_files)
    assert fe.n_encoded_ == 0 and fe.n_cached_ == 6
    np.testing.assert_array_equal(again, first)
    head = fe.transform(image_files[:4])  # exactly the first shard: served as a memory map
    assert isinstance(head, np.memmap)
    np.testing.assert_allclose(
        first, FeatureExtractor(TINY, pretrained=None).transform(image_files), atol=1e-5
    )
    # Duplicates and a mix of cached and new images.
    mixed = fe.transform([image_files[2], image_files[2]] + [np.asarray(Image.open(image_files[0]))])
    assert fe.n_encoded_ == 1 and fe.n_cached_ == 2
    np.testing.assert_allclose(mixed[:2], first[[2, 2]], atol=1e-6)
    # Path identity reads no file contents but finds the same rows after encoding them once.
    by_path = clone(fe).set_params(image_id="path")
    by_path.transform(image_files)
    assert by_path.n_encoded_ == 6 and by_path.cache_key_ == fe.cache_key_
    by_path.transform(image_files)
    assert by_path.n_encoded_ == 0
    (info,) = cache_info(cache_dir)
    assert info["key"] == fe.cache_key_ and info["n_rows"] == 13 and info["config"]["backbone"] == TINY
    assert info["config"]["weights"] == "init:seed0" and info["bytes"] > 0
    assert clear_cache(cache_dir) == 1 and cache_info(cache_dir) == []
    fe.transform(image_files[:1])
    assert fe.n_encoded_ == 1


def test_pipeline_grid_search_encodes_each_image_once(tmp_path, monkeypatch):
    calls = []
    original = Backbone.forward

    def counting(self, images, **kw):
        calls.append(images.shape[0])
        return original(self, images, **kw)

    monkeypatch.setattr(Backbone, "forward", counting)
    images = make_images(24, seed=3)
    y = np.arange(24) % 2
    pipe = Pipeline(
        [
            ("features", FeatureExtractor(TINY, pretrained=None, cache_dir=str(tmp_path))),
            ("clf", LogisticRegression(max_iter=200)),
        ]
    )
    search = GridSearchCV(pipe, {"clf__C": [0.1, 1.0, 10.0]}, cv=3).fit(images, y)
    assert sum(calls) == 24  # 3 x 3 fits, 3 x 3 scorings and a refit: every image encoded once
    assert search.predict(images[:5]).shape == (5,)
    (info,) = cache_info(tmp_path)
    assert info["n_rows"] == 24


def test_sklearn_conventions():
    fe = FeatureExtractor(TINY, pretrained=None, token_dim=4)
    params = fe.get_params()
    assert all(isinstance(v, (str, int, type(None))) for v in params.values())
    assert clone(fe).get_params() == params
    tags = fe.__sklearn_tags__()
    assert tags.requires_fit is False and tags.input_tags.two_d_array is False
    assert FeatureExtractor().get_params()["backbone"] == "timm:tf_efficientnet_lite0"


def test_progress_bar(capsys):
    FeatureExtractor(TINY, pretrained=None, verbose=1).transform(make_images(2))
    assert "img/s" in capsys.readouterr().err


@pytest.mark.parametrize(
    "params, images, match",
    [
        ({"output": "logits"}, None, "'output' parameter of FeatureExtractor must be"),
        ({"dtype": "int8"}, None, "'dtype' parameter of FeatureExtractor must be"),
        ({"precision": "fp8"}, None, "'precision' parameter of FeatureExtractor must be"),
        ({"image_id": "name"}, None, "'image_id' parameter of FeatureExtractor must be"),
        ({"on_error": "ignore"}, None, "'on_error' parameter of FeatureExtractor must be"),
        ({"batch_size": 0}, None, "'batch_size' parameter of FeatureExtractor must be"),
        ({"token_dim": 0, "output": "tokens"}, None, "'token_dim' parameter of FeatureExtractor must be"),
        ({"token_dim": 65, "output": "tokens"}, None, "token_dim=65 exceeds the token width 64"),
        ({}, "one.jpg", "not a single path"),
        ({}, np.zeros((2, 8, 8, 3), np.float32), r"uint8 of shape \(n, H, W, 3\)"),
        ({}, np.zeros((2, 8)), "got shape"),
        ({}, [], "images is empty"),
        ({}, 12, "got int"),
    ],
)
def test_bad_params_and_inputs(params, images, match):
    fe = FeatureExtractor(TINY, pretrained=None, **params)
    with pytest.raises(ValueError, match=match):
        fe.transform(make_images(2) if images is None else images)


def test_package_import_is_light():
    import subprocess
    import sys

    code = "import sys, luab_sk.features; print(sorted(m for m in ('open_clip', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_worker_processes_decode(tmp_path, image_files):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG broken")
    fe = FeatureExtractor(TINY, pretrained=None, num_workers=1, batch_size=4, on_error="skip")
    out = fe.transform(image_files + [str(bad)])
    np.testing.assert_allclose(
        out[:-1], FeatureExtractor(TINY, pretrained=None).transform(image_files), atol=1e-5
    )
    assert np.isnan(out[-1]).all() and fe.failed_[0][0] == len(image_files)
    with pytest.raises(OSError, match="broken.png"):
        fe.set_params(on_error="raise").transform([str(bad)])


def test_large_jpegs_are_decoded_at_a_reduced_scale(tmp_path):
    from skimage import data

    from luab_sk.features import load_image

    path = tmp_path / "astronaut.jpg"
    Image.fromarray(np.concatenate([data.astronaut()] * 2, axis=1)).save(path, quality=90)  # 512 x 1024
    bb = load_backbone(TINY, pretrained=None).eval()
    resize, min_size = bb.eval_resize()
    assert min(load_image(path, min_size).size) < 512  # the case at hand
    out = FeatureExtractor(TINY, pretrained=None, output="both").transform([str(path)])
    with torch.no_grad():
        drafted = bb(bb.eval_transform()(load_image(path, min_size))[None])
        full = bb(bb.eval_transform()(load_image(path))[None])
    np.testing.assert_allclose(out["tokens"], drafted["tokens"].numpy(), rtol=1e-5, atol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(out["pooled"]), full["pooled"])
    assert cosine.item() > 0.99  # what the full-size decode gives, up to resampling differences
    fe = FeatureExtractor(TINY, pretrained=None, cache_dir=str(tmp_path / "cache"))
    fe.transform([str(path)])
    config = json.loads((tmp_path / "cache" / fe.cache_key_ / "config.json").read_text())["config"]
    assert config["decode"] == "jpeg-draft+upright"  # the reduced-scale decoding is part of the cache key
