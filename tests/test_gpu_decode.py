"""The tensor (GPU-style) JPEG decode path: header sniffing, per-image CPU fallback, closeness to PIL.

Without a GPU the same batched pipeline runs with ``decode_jpeg(..., device="cpu")`` and tensor resizes;
the CUDA test runs only where CUDA is available.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from luab_sk.features import extractor as extractor_module
from luab_sk.features import gpu_decode
from luab_sk.features.backbones import load_backbone
from luab_sk.features.extractor import FeatureExtractor
from luab_sk.features.gpu_decode import (
    TensorDecodeLoader,
    decode_cache_tag,
    inspect_jpeg,
    jpeg_fallback_reason,
    resolve_decode_device,
)
from luab_sk.features.images import ImageDataset, ImageLoadError

BACKBONE = "timm:test_vit"  # random init, bicubic resize 168 + centre crop 160


def _photos():
    from skimage import data

    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]


def _cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BACKBONE, None).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """Plain YCbCr JPEGs of several sizes and aspect ratios (some large enough for draft decoding)."""
    root = tmp_path_factory.mktemp("jpegs")
    paths = []
    for i, photo in enumerate(_photos()):
        img = Image.fromarray(photo)
        for j, size in enumerate([(500, 380), (230, 300), (700, 520)]):
            path = root / f"img{i}_{j}.jpg"
            img.resize(size, Image.Resampling.LANCZOS).save(path, quality=90)
            paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    """Files the tensor path must hand to the CPU loader, by the reason it should give."""
    root = tmp_path_factory.mktemp("odd")
    photo = Image.fromarray(_photos()[1]).resize((320, 240))
    files = {}
    files["not a JPEG"] = root / "a.png"
    photo.save(files["not a JPEG"])
    files["greyscale/CMYK JPEG"] = root / "grey.jpg"
    photo.convert("L").save(files["greyscale/CMYK JPEG"], quality=90)
    files["cmyk"] = root / "cmyk.jpg"
    photo.convert("CMYK").save(files["cmyk"], quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    files["EXIF orientation"] = root / "rotated.jpg"
    photo.save(files["EXIF orientation"], quality=90, exif=exif)
    good = root / "good.jpg"
    photo.save(good, quality=90)
    files["truncated JPEG"] = root / "truncated.jpg"
    files["truncated JPEG"].write_bytes(good.read_bytes()[:3000])
    files["corrupt"] = root / "corrupt.jpg"  # valid header and end marker, garbage scan data
    raw = bytearray(good.read_bytes())
    sos = raw.index(b"\xff\xda")
    garbage = len(raw) - 2 - (sos + 20)
    raw[sos + 20 : -2] = b"\xff\xd8" * (garbage // 2) + b"\x00" * (garbage % 2)
    files["corrupt"].write_bytes(bytes(raw))
    exif1 = Image.Exif()
    exif1[0x0112] = 1
    files["orientation 1"] = root / "upright.jpg"
    photo.save(files["orientation 1"], quality=90, exif=exif1)
    files["good"] = good
    return {k: str(v) for k, v in files.items()}


def test_fallback_reasons(odd_files):
    read = lambda key: open(odd_files[key], "rb").read()  # noqa: E731
    for reason in ("not a JPEG", "greyscale/CMYK JPEG", "truncated JPEG"):
        assert jpeg_fallback_reason(read(reason)) == reason
    assert jpeg_fallback_reason(read("cmyk")) == "greyscale/CMYK JPEG"
    assert inspect_jpeg(read("EXIF orientation")) == (None, 6)  # decoded on the tensor path, then turned
    assert inspect_jpeg(read("orientation 1")) == (None, 1)
    assert inspect_jpeg(read("good")) == (None, 1)
    assert jpeg_fallback_reason(read("good")) is None
    assert jpeg_fallback_reason(read("corrupt")) is None  # only the decoder can tell


def _cpu_dataset(backbone, items, on_error="raise", min_size="auto"):
    resize, size = backbone.eval_resize()
    return ImageDataset(
        items,
        transforms.Compose([resize, np.asarray]),
        on_error=on_error,
        min_size=size if min_size == "auto" else min_size,
    )


def test_pixels_close_to_pil(backbone, jpegs):
    """Full-size decode: the tensor pipeline's resized pixels are within a few grey levels of PIL's."""
    dataset = _cpu_dataset(backbone, jpegs, min_size=None)
    loader = TensorDecodeLoader(dataset, backbone, "cpu", batch_size=5)
    tensor = torch.cat([batch for batch, ok in loader]).numpy().astype(np.int16)
    assert loader.n_tensor_ == len(jpegs) and not loader.fallbacks_
    pil = np.stack([dataset[k][0] for k in range(len(jpegs))]).astype(np.int16)
    assert tensor.shape == pil.shape == (len(jpegs), 160, 160, 3)
    diff = np.abs(tensor - pil)
    assert diff.mean() < 1.0, diff.mean()
    assert np.percentile(diff, 99) <= 4


def test_features_match_cpu_path(backbone, jpegs, monkeypatch, tmp_path):
    """FeatureExtractor end to end with the tensor path (decode on the CPU) vs the PIL path (draft)."""
    common = dict(backbone=BACKBONE, pretrained=None, device="cpu", batch_size=5, cache_dir=str(tmp_path))
    cpu = FeatureExtractor(decode_device="cpu", **common)
    ref = cpu.transform(jpegs)
    monkeypatch.setattr(extractor_module, "resolve_decode_device", lambda dd, dev: torch.device("cpu"))
    tensor = FeatureExtractor(decode_device="auto", **common)
    out = tensor.transform(jpegs)
    assert tensor.n_encoded_ == len(jpegs)  # a cache key of its own: nothing reused from the PIL run
    assert tensor.cache_key_ != cpu.cache_key_
    cos = _cosine(ref, out)
    assert cos.min() >= 0.99, cos


def test_mixed_batch_falls_back_per_image(backbone, jpegs, odd_files, monkeypatch):
    items = [
        jpegs[0],
        odd_files["not a JPEG"],
        odd_files["greyscale/CMYK JPEG"],
        odd_files["cmyk"],
        odd_files["EXIF orientation"],
        odd_files["truncated JPEG"],
        odd_files["corrupt"],
        np.asarray(Image.open(jpegs[1]).convert("RGB")),
        Image.open(jpegs[2]),
        odd_files["good"],
        str(odd_files["good"]) + ".missing",
    ]
    corrupt = {5, 6, 10}
    common = dict(backbone=BACKBONE, pretrained=None, device="cpu", batch_size=4, on_error="skip")
    cpu = FeatureExtractor(decode_device="cpu", **common)
    ref = cpu.transform(items)

    made = []

    class Recording(TensorDecodeLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(extractor_module, "resolve_decode_device", lambda dd, dev: torch.device("cpu"))
    monkeypatch.setattr(extractor_module, "TensorDecodeLoader", Recording)
    tensor = FeatureExtractor(decode_device="auto", **common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # libjpeg's "corrupt data" messages
        out = tensor.transform(items)
    (loader,) = made
    assert loader.n_tensor_ == 3  # jpegs[0], the EXIF-rotated file and good.jpg
    assert loader.fallbacks_["decode failure"] == 1
    assert loader.fallbacks_["truncated JPEG"] == 1
    assert "EXIF orientation" not in loader.fallbacks_
    assert loader.fallbacks_["greyscale/CMYK JPEG"] == 2
    assert loader.fallbacks_["unreadable file"] == 1
    # the same images fail with the same messages as on the CPU path
    assert [f[0] for f in tensor.failed_] == [f[0] for f in cpu.failed_] == sorted(corrupt)
    assert [f[2] for f in tensor.failed_] == [f[2] for f in cpu.failed_]
    good = [i for i in range(len(items)) if i not in corrupt]
    assert np.isnan(out[sorted(corrupt)]).all()
    fallback = [1, 2, 3, 7, 8]  # decoded by the CPU loader in both runs: the same pixels
    np.testing.assert_allclose(out[fallback], ref[fallback], rtol=1e-4, atol=1e-4)
    assert _cosine(out[good], ref[good]).min() >= 0.99


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_cpu_loader(backbone, tmp_path, orientation):
    """Every EXIF orientation turns the tensor path's pixels as load_image turns the PIL image."""
    photo = Image.fromarray(_photos()[3]).resize((420, 260))  # not square: a wrong turn changes the shape
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    photo.save(path, quality=92, exif=exif)
    dataset = _cpu_dataset(backbone, [str(path)], min_size=None)
    ((batch, ok),) = list(TensorDecodeLoader(dataset, backbone, "cpu", batch_size=1))
    assert ok.all()
    pil = dataset[0][0].astype(np.int16)
    diff = np.abs(batch[0].numpy().astype(np.int16) - pil)
    assert diff.mean() < 1.0, diff.mean()
    # and a wrong turn would be far off
    assert np.abs(np.rot90(batch[0].numpy(), 1).astype(np.int16) - pil).mean() > 5


def test_corrupt_raises_like_cpu_path(backbone, odd_files):
    dataset = _cpu_dataset(backbone, [odd_files["good"], odd_files["corrupt"]])
    loader = TensorDecodeLoader(dataset, backbone, "cpu", batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageLoadError, match="corrupt.jpg"):
            list(loader)


def test_skip_placeholder_keeps_batch_shape(backbone, odd_files):
    dataset = _cpu_dataset(backbone, [odd_files["good"], odd_files["truncated JPEG"]], on_error="skip")
    ((batch, ok),) = list(TensorDecodeLoader(dataset, backbone, "cpu", batch_size=4))
    assert batch.dtype == torch.uint8 and tuple(batch.shape) == (2, 160, 160, 3)
    assert ok.tolist() == [True, False]


def test_float_tensor_items_pass_through(backbone, odd_files):
    """Items of a torch Dataset may be already-normalised float tensors: the batch becomes a list."""
    pre = torch.zeros(3, 160, 160)
    dataset = _cpu_dataset(backbone, [odd_files["good"], pre])
    ((rows, ok),) = list(TensorDecodeLoader(dataset, backbone, "cpu", batch_size=4))
    assert isinstance(rows, list) and isinstance(rows[0], np.ndarray) and rows[1] is pre
    x = FeatureExtractor._model_input(backbone, rows, torch.device("cpu"))
    assert tuple(x.shape) == (2, 3, 160, 160)


def test_resolve_decode_device(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_decode_device("auto", cpu) is None
    assert resolve_decode_device("cpu", cpu) is None
    with pytest.raises(ValueError, match="decode_device"):
        resolve_decode_device("gpu", cpu)
    with pytest.raises(ValueError, match="decode_device"):
        FeatureExtractor(decode_device="gpu").fit()
    assert decode_cache_tag(None) == "jpeg-draft+upright"
    assert decode_cache_tag(torch.device("cuda", 0)) == "jpeg-tensor+upright:cuda"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_decode_device("cuda", cpu)
    # a CUDA machine whose torchvision cannot decode on the GPU: "auto" warns and uses the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(gpu_decode, "probe_decode", lambda device: "RuntimeError: nvjpeg missing")
    with pytest.warns(RuntimeWarning, match="nvjpeg missing"):
        assert resolve_decode_device("auto", torch.device("cuda", 0)) is None
    with pytest.raises(RuntimeError, match="nvjpeg missing"):
        resolve_decode_device("cuda", torch.device("cuda", 0))
    monkeypatch.setattr(gpu_decode, "probe_decode", lambda device: None)
    assert resolve_decode_device("auto", torch.device("cuda")) == torch.device("cuda", 0)


def test_probe_on_cpu():
    assert gpu_decode.probe_decode("cpu") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_cuda_decode_matches_cpu_path(jpegs, odd_files):
    items = [*jpegs, odd_files["not a JPEG"], odd_files["EXIF orientation"], odd_files["corrupt"]]
    common = dict(
        backbone=BACKBONE, pretrained=None, device="cuda", precision="fp32", batch_size=8, on_error="skip"
    )
    cpu = FeatureExtractor(decode_device="cpu", **common)
    ref = cpu.transform(items)
    gpu = FeatureExtractor(decode_device="cuda", **common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = gpu.transform(items)
    # nvJPEG must notice the corrupt file too (reported as on the CPU path, not decoded into garbage)
    assert [f[0] for f in gpu.failed_] == [f[0] for f in cpu.failed_] == [len(items) - 1]
    good = slice(0, len(items) - 1)
    assert _cosine(ref[good], out[good]).min() >= 0.99
    assert resolve_decode_device("auto", torch.device("cuda")) is not None
