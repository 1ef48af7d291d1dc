"""Backbones: one interface over timm, open_clip and torchvision (tiny random-init models)."""

import pytest
import torch

from luab_sk.features import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, load_backbone

TINY = [
    ("timm:test_efficientnet", None),
    ("timm:test_vit", None),
    ("timm:test_vit", 1),
    ("timm:resnet10t", 2),
    ("open_clip:ViT-S-32-alt", None),
    ("open_clip:ViT-S-32-alt", 3),
    ("torchvision:resnet18", None),
    ("torchvision:mobilenet_v3_small", 4),
]


@pytest.mark.parametrize("name, layer", TINY)
def test_interface_shapes_and_groups(name, layer):
    bb = load_backbone(name, layer=layer)
    assert bb.training and all(p.requires_grad for p in bb.parameters())
    _, h, w = bb.data_config["input_size"]
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        out = bb.eval()(x)
        tokens_only = bb(x, outputs=("tokens",))
    assert out["pooled"].shape == (2, bb.pooled_dim)
    assert out["tokens"].shape == (2, bb.grid[0] * bb.grid[1], bb.token_dim)
    torch.testing.assert_close(tokens_only["tokens"], out["tokens"])
    assert "pooled" not in tokens_only
    if layer is not None:
        c, gh, gw = bb.layer_shapes[layer]
        assert (bb.token_dim, *bb.grid) == (c, gh, gw)
    groups = bb.layer_groups()
    flat = [id(p) for g in groups for p in g]
    assert len(groups) >= 3
    assert len(flat) == len(set(flat)) == len(list(bb.parameters()))


def test_tokens_are_row_major_over_grid():
    bb = load_backbone("timm:resnet10t").eval()
    _, h, w = bb.data_config["input_size"]
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        fmap = bb.model.forward_features(x)
        tokens = bb(x)["tokens"]
    gh, gw = bb.grid
    torch.testing.assert_close(tokens[0, 1 * gw + 2], fmap[0, :, 1, 2])


def test_random_init_is_seeded_and_trainable():
    a, b = load_backbone("timm:test_vit"), load_backbone("timm:test_vit")
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    assert a.weights_id == "init:seed0"
    bb = load_backbone("timm:test_efficientnet")
    _, h, w = bb.data_config["input_size"]
    loss = bb(torch.randn(2, 3, h, w))["tokens"].square().mean()
    loss.backward()
    assert bb.layer_groups()[0][0].grad is not None


def test_eval_transform_matches_config():
    import numpy as np
    from PIL import Image

    bb = load_backbone("open_clip:ViT-S-32-alt")
    img = Image.fromarray(np.full((300, 400, 3), 255, np.uint8))
    t = bb.eval_transform()(img)
    assert t.shape == bb.data_config["input_size"]
    expected = (1.0 - torch.tensor(bb.data_config["mean"])) / torch.tensor(bb.data_config["std"])
    torch.testing.assert_close(t[:, 5, 5], expected.float(), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "resnet18"}, "family:architecture"),
        ({"name": "keras:resnet18"}, "Unknown backbone family"),
        ({"name": "timm:no_such_net"}, "Unknown timm model"),
        ({"name": "open_clip:No-Such"}, "Unknown open_clip architecture"),
        ({"name": "torchvision:no_such"}, "Unknown torchvision model"),
        ({"name": "timm:test_vit", "layer": 99}, "layer=99 is out of range"),
        ({"name": "timm:test_vit", "layer": 1.5}, "layer must be None or an int"),
        ({"name": "timm:resnet10t", "pretrained": DEFAULT_PRETRAINED}, "only fits"),
        ({"name": "open_clip:ViT-S-32-alt", "pretrained": "not-a-tag"}, "not a known tag"),
        ({"name": "torchvision:resnet18", "pretrained": "NOPE"}, "not a weights name"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_backbone(**kwargs)


def test_missing_checkpoint_is_named(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_backbone("timm:test_vit", pretrained=str(missing))


def test_local_checkpoint_roundtrip(tmp_path):
    src = load_backbone("timm:test_vit")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    path = tmp_path / "vit.pth"
    torch.save(src.model.state_dict(), path)
    bb = load_backbone("timm:test_vit", pretrained=str(path))
    torch.testing.assert_close(next(bb.parameters()), next(src.parameters()))
    assert bb.weights_id.startswith("sha256:")


def test_offline_tag_fails_fast_with_advice(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="pass its local path"):
        load_backbone("open_clip:ViT-B-32", pretrained="laion2b_e16")
    with pytest.raises(RuntimeError, match="pretrained='/path/to/checkpoint"):
        load_backbone("torchvision:resnet18", pretrained="IMAGENET1K_V1")
    assert time.perf_counter() - t0 < 20


def test_default_backbone_lite0_classifies_coffee():
    """The real offline default: ImageNet-pretrained EfficientNet-Lite0 on scikit-image's coffee photo."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    bb = load_backbone(DEFAULT_BACKBONE, DEFAULT_PRETRAINED).eval()
    assert bb.weights_id.startswith("sha256:")
    assert bb.data_config["mean"] == (0.5, 0.5, 0.5) and bb.data_config["std"] == (0.5, 0.5, 0.5)
    x = bb.eval_transform()(Image.fromarray(skimage_data.coffee())).unsqueeze(0)
    with torch.no_grad():
        top = bb.model(x).softmax(-1).argmax(-1).item()
        out = bb(x)
    assert top in (967, 968)  # espresso, cup
    assert out["tokens"].shape == (1, 49, 1280) and out["pooled"].shape == (1, 1280)
    mid = load_backbone(DEFAULT_BACKBONE, DEFAULT_PRETRAINED, layer=3)
    assert mid.grid == (14, 14) and mid.token_dim == 112


def test_eval_resize_and_normalize_reproduce_eval_transform():
    import numpy as np
    from PIL import Image

    bb = load_backbone("timm:test_vit", pretrained=None)
    resize, min_size = bb.eval_resize()
    _, height, width = bb.data_config["input_size"]
    assert min_size == int(max(height, width) / bb.data_config["crop_pct"])
    rng = np.random.default_rng(0)
    shapes = [(90, 300, 3), (400, 200, 3)]
    images = [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in shapes]
    pixels = torch.from_numpy(np.stack([np.asarray(resize(img)) for img in images]))
    assert pixels.shape == (2, height, width, 3) and pixels.dtype == torch.uint8
    x = bb.normalize(pixels)
    assert x.is_contiguous() and x.dtype == torch.float32
    assert torch.equal(x, torch.stack([bb.eval_transform()(img) for img in images]))  # bitwise
    with pytest.raises(ValueError, match=r"pixels must be a uint8 tensor of shape \(B, H, W, 3\)"):
        bb.normalize(x)


def test_random_init_is_identical_in_threads():
    """Random init goes through torch's global generator: parallel builds must not interleave their draws."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    reference = [p.detach().clone() for p in load_backbone("timm:test_vit").parameters()]
    barrier = threading.Barrier(4)

    def build(_):
        barrier.wait()
        return [p.detach() for p in load_backbone("timm:test_vit").parameters()]

    state = torch.get_rng_state()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(build, range(4)))
    for params in results:
        for got, want in zip(params, reference, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left as it was
