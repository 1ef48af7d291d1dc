"""load_image and ImageDataset: inputs, conversions and precise errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from luab_sk.features import ImageDataset, ImageLoadError, load_image


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_load_image_inputs(photo):
    img = load_image(photo)
    assert img.mode == "RGB" and img.size == (40, 30)
    assert load_image(str(photo)).size == (40, 30)
    assert load_image(Image.new("L", (5, 4), 7)).mode == "RGB"
    grey = load_image(np.full((4, 5), 9, np.uint8))
    assert np.asarray(grey).shape == (4, 5, 3) and (np.asarray(grey) == 9).all()
    rgb = np.random.default_rng(1).integers(0, 255, (6, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(rgb)), rgb)


def test_load_image_errors_name_the_file(tmp_path, photo):
    with pytest.raises(ImageLoadError, match="not found: '.*missing.png'"):
        load_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ImageLoadError, match="junk.jpg"):
        load_image(junk)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(photo.read_bytes()[: len(photo.read_bytes()) // 2])
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        load_image(truncated)


@pytest.mark.parametrize(
    "item, match",
    [
        (np.zeros((4, 4, 3), np.float32), "must be uint8"),
        (np.zeros((4, 4, 4), np.uint8), r"shape \(H, W, 3\)"),
        (3.5, "Unsupported image item of type float"),
    ],
)
def test_load_image_bad_items(item, match):
    with pytest.raises(ValueError, match=match):
        load_image(item)


def test_dataset_skip_and_raise(tmp_path, photo):
    items = [photo, tmp_path / "gone.jpg", np.zeros((8, 8, 3), np.uint8)]

    def transform(img):
        return torch.from_numpy(np.array(img.resize((16, 16)))).permute(2, 0, 1).float()

    ds = ImageDataset(items, transform=transform, on_error="skip")
    shapes_ok = [(ds[i][0].shape, ds[i][1]) for i in range(3)]
    assert shapes_ok == [((3, 16, 16), True), ((3, 16, 16), False), ((3, 16, 16), True)]
    batch, ok = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch.shape == (3, 3, 16, 16) and ok.tolist() == [True, False, True]
    with pytest.raises(ImageLoadError, match="gone.jpg"):
        ImageDataset(items)[1]
    tensor = torch.ones(3, 4, 4)
    assert ImageDataset([tensor], transform=transform)[0][0] is tensor
    with pytest.raises(ValueError, match="on_error must be one of"):
        ImageDataset(items, on_error="ignore")


def test_min_size_decodes_large_jpegs_at_a_reduced_scale(tmp_path):
    path = tmp_path / "large.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(path)
    assert load_image(path, min_size=100).size == (200, 150)  # 1/2 scale: the shorter side stays >= 100
    assert load_image(path, min_size=40).size == (100, 75)  # 1/4 scale
    assert load_image(path, min_size=151).size == (400, 300)  # 1/2 would go below the request
    png = tmp_path / "large.png"
    Image.open(path).save(png)
    assert load_image(png, min_size=40).size == (400, 300)  # only JPEG has reduced-scale decoding
    img, ok = ImageDataset([path], min_size=100)[0]
    assert img.size == (200, 150) and ok


@pytest.mark.parametrize("min_size", [0, 2.5, True, "64"])
def test_load_image_bad_min_size(photo, min_size):
    with pytest.raises(ValueError, match="min_size must be None or a positive int"):
        load_image(photo, min_size=min_size)
