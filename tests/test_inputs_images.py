"""Images decode as the annotators saw them, and every per-image failure is one image's error (issue 10)."""

import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps

from luab_sk.estimators._augment import ImageByproductDataset, JointTransform
from luab_sk.features import FeatureExtractor, ImageDataset, ImageLoadError, load_image
from luab_sk.features import images as images_module


def _quadrant_image(size=(80, 64)):
    """An RGB image, black but for a white top-left quadrant: shows where the stored top-left ends up."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2] = 255
    return Image.fromarray(arr)


def _save_jpeg_with_orientation(path, image, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif.tobytes())
    return path


def _white_corner(arr):
    """Which corner of an (H, W, 3) array holds the white quadrant."""
    h, w = arr.shape[:2]
    q, r = h // 4, w // 4
    corners = {
        "top-left": arr[:q, :r],
        "top-right": arr[:q, -r:],
        "bottom-left": arr[-q:, :r],
        "bottom-right": arr[-q:, -r:],
    }
    return max(corners, key=lambda k: corners[k].mean())


# -- 16-bit, float and other modes ------------------------------------------------------------------------


def test_16bit_png_is_scaled_not_saturated(tmp_path):
    values = np.array([[0, 257 * 10, 257 * 100], [257 * 200, 65535, 30000]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # Pillow opens it as 16-bit greyscale
    arr = np.asarray(load_image(path))
    assert arr.shape == (2, 3, 3) and (arr == arr[..., :1]).all()
    np.testing.assert_array_equal(arr[..., 0], [[0, 10, 100], [200, 255, round(30000 / 257)]])
    # A realistic 16-bit photo (values over the whole range) is not 99.6% white any more.
    ramp = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(path)
    assert (np.asarray(load_image(path)) == 255).mean() < 0.02


def test_mode_i_image_is_taken_as_16_bit():
    img = Image.fromarray(np.array([[0, 257 * 50, 70000, -5]], np.int32))
    assert img.mode == "I"
    np.testing.assert_array_equal(np.asarray(load_image(img))[0, :, 0], [0, 50, 255, 0])


def test_float_images(tmp_path):
    unit = np.array([[0.0, 0.5, 1.0]], np.float32)
    path = tmp_path / "float.tiff"
    Image.fromarray(unit).save(path)
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(np.asarray(load_image(path))[0, :, 0], [0, 128, 255])
    wide = Image.fromarray(np.array([[0.0, 100.0, 300.0, np.nan]], np.float32))
    np.testing.assert_array_equal(np.asarray(load_image(wide))[0, :, 0], [0, 100, 255, 0])


def test_cmyk_and_palette(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    r, g, b = np.asarray(load_image(path)).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60
    pal = Image.new("RGB", (4, 4), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    np.testing.assert_allclose(np.asarray(load_image(pal))[0, 0], [10, 200, 30], atol=2)


# -- transparency -----------------------------------------------------------------------------------------


def test_transparent_png_shows_the_background_not_the_hidden_colour(tmp_path):
    hidden = np.zeros((8, 8, 4), np.uint8)
    hidden[..., 0] = 255  # red under fully transparent pixels
    path = tmp_path / "clear.png"
    Image.fromarray(hidden, "RGBA").save(path)
    assert (np.asarray(load_image(path)) == 255).all()  # white, as on the annotation page
    assert (np.asarray(load_image(path, background=(0, 0, 0))) == 0).all()
    half = np.zeros((2, 2, 4), np.uint8)
    half[..., 3] = 128  # black at 50% over white
    Image.fromarray(half, "RGBA").save(path)
    np.testing.assert_allclose(np.asarray(load_image(path)), 127, atol=1)
    with pytest.raises(ValueError, match="background must be"):
        load_image(path, background=(0, 0, 300))


def test_la_and_palette_transparency(tmp_path):
    la = tmp_path / "la.png"
    Image.fromarray(np.stack([np.full((4, 4), 30, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA").save(la)
    assert (np.asarray(load_image(la)) == 255).all()
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    path = tmp_path / "p.png"
    pal.save(path, transparency=1)  # palette entry 1 (red) is transparent
    arr = np.asarray(load_image(path))
    assert tuple(arr[0, 0]) == (0, 0, 0) and (arr.reshape(-1, 3)[1:] == 255).all()
    grey = tmp_path / "grey_trns.png"
    Image.new("L", (3, 3), 40).save(grey, transparency=40)
    assert (np.asarray(load_image(grey)) == 255).all()
    deep = tmp_path / "deep_trns.png"
    Image.fromarray(np.array([[1000, 2000]], np.uint16)).save(deep, transparency=1000)
    np.testing.assert_array_equal(np.asarray(load_image(deep))[0, :, 0], [255, round(2000 / 257)])


# -- EXIF orientation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("orientation", "corner"), [(1, "top-left"), (6, "top-right"), (8, "bottom-left"),
                                                     (3, "bottom-right")])  # fmt: skip
def test_exif_orientation_is_applied(tmp_path, orientation, corner):
    path = _save_jpeg_with_orientation(tmp_path / "phone.jpg", _quadrant_image((80, 64)), orientation)
    img = load_image(path)
    assert img.size == ((64, 80) if orientation in (6, 8) else (80, 64))  # displayed, not stored, size
    assert _white_corner(np.asarray(img)) == corner
    np.testing.assert_array_equal(np.asarray(img), np.asarray(ImageOps.exif_transpose(Image.open(path))))
    # A PIL image opened (not turned) from the file gives the same pixels; a turned one is not turned twice.
    np.testing.assert_array_equal(np.asarray(load_image(Image.open(path))), np.asarray(img))
    upright = ImageOps.exif_transpose(Image.open(path))
    np.testing.assert_array_equal(np.asarray(load_image(upright)), np.asarray(img))
    np.testing.assert_array_equal(np.asarray(load_image(img)), np.asarray(img))  # loading is idempotent


def test_draft_decoding_happens_before_the_exif_turn(tmp_path):
    path = _save_jpeg_with_orientation(tmp_path / "big.jpg", _quadrant_image((400, 320)), 6)
    img = load_image(path, min_size=100)
    assert img.size == (160, 200)  # stored 400x320, drafted to 1/2 (200x160), then turned upright
    assert _white_corner(np.asarray(img)) == "top-right"
    full = load_image(path).resize(img.size)
    assert np.abs(np.asarray(full, float) - np.asarray(img, float)).mean() < 10


def test_fine_tuner_dataset_and_extractor_decode_alike(tmp_path):
    """Both the fine-tuner's dataset and the extractor go through load_image: same upright pixels."""
    path = _save_jpeg_with_orientation(tmp_path / "phone.jpg", _quadrant_image((80, 64)), 6)
    t = JointTransform(16, mean=(0.0,) * 3, std=(1.0,) * 3)
    x, _, z = ImageByproductDataset([path], np.array([0]), np.array([[0.9, 0.1]], np.float32), t)[0]
    expected = np.asarray(load_image(path).resize((16, 16), Image.Resampling.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert float(x[:, :4, -4:].mean()) > 0.9  # the click at (0.9, 0.1) lies on the white corner
    fe = FeatureExtractor("timm:test_efficientnet", pretrained=None, batch_size=2)
    rows = fe.transform([path, load_image(path)])
    np.testing.assert_allclose(rows[0], rows[1], atol=1e-5)


# -- per-image failures ------------------------------------------------------------------------------------


def test_decompression_bomb_is_one_images_error(tmp_path, monkeypatch):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good)
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (1000, 1000)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400_000)  # 1e6 pixels > 2 x 4e5: DecompressionBombError
    with pytest.raises(ImageLoadError, match="bomb.png.*too large"):
        load_image(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600_000)  # 1e6 > 6e5: a warning, an error under -W error
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageLoadError, match="bomb.png.*DecompressionBombWarning"):
            load_image(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400_000)
    ds = ImageDataset([good, bomb], transform=np.asarray, on_error="skip")
    assert [ds[i][1] for i in range(2)] == [True, False]
    fe = FeatureExtractor("timm:test_efficientnet", pretrained=None, on_error="skip", batch_size=2)
    rows = fe.transform([good, bomb])
    assert np.isfinite(rows[0]).all() and np.isnan(rows[1]).all()
    assert len(fe.failed_) == 1 and "bomb.png" in fe.failed_[0][1] and "too large" in fe.failed_[0][2]
    with pytest.raises(ImageLoadError, match="bomb.png"):
        FeatureExtractor("timm:test_efficientnet", pretrained=None).transform([good, bomb])


@pytest.mark.parametrize(
    "error",
    [RecursionError("deep"), MemoryError(), UnicodeDecodeError("utf-8", b"", 0, 1, "x"), KeyError("tag")],
)
def test_any_decoding_failure_names_the_file(tmp_path, monkeypatch, error):
    path = tmp_path / "odd.png"
    Image.new("RGB", (4, 4)).save(path)

    def broken(img):
        raise error

    monkeypatch.setattr(images_module, "_upright", broken)
    with pytest.raises(ImageLoadError, match="odd.png"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="PIL image"):
        load_image(Image.new("RGB", (4, 4)))
    assert ImageDataset([path], on_error="skip")[0][1] is False


def test_broken_exif_does_not_make_a_good_image_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "ok.jpg"
    _quadrant_image().save(path)

    def bad_exif(self):
        raise SyntaxError("broken EXIF")

    monkeypatch.setattr(Image.Image, "getexif", bad_exif)
    assert load_image(path).size == (80, 64)
