"""The evaluation transform, image modes, EXIF orientation and refused files."""

import re
import struct
import zlib

import numpy as np
import pytest
from conftest import REF
from PIL import Image

import aim_mlx
from aim_mlx.transforms import ImageError, open_image, preprocess

EXPECTED = np.load(REF / "preprocessed_224.npz")


@pytest.mark.parametrize("name", sorted(EXPECTED.files))
def test_matches_the_reference_transform(name):
    x = aim_mlx.preprocess(REF / "images" / name)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    np.testing.assert_allclose(x, EXPECTED[name], rtol=0, atol=1e-5)
    # A PIL image and a string path give the same.
    np.testing.assert_array_equal(preprocess(Image.open(REF / "images" / name)), x)
    np.testing.assert_array_equal(preprocess(str(REF / "images" / name)), x)


def test_other_sizes_resize_to_size_over_0875():
    img = Image.open(REF / "images" / "chelsea.png")  # 451 x 300
    x = preprocess(img, size=112)
    assert x.shape == (3, 112, 112)
    # Hand-made: shorter side to ceil(112 / 0.875) = 128, longer int(128 * 451 / 300) = 192,
    # centre crop at (round((192 - 112) / 2), round((128 - 112) / 2)) = (40, 8).
    small = img.convert("RGB").resize((192, 128), Image.Resampling.BICUBIC)
    crop = np.asarray(small, dtype=np.float32)[8:120, 40:152].transpose(2, 0, 1) / 255.0
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
    np.testing.assert_allclose(x, (crop - mean) / std, atol=1e-6)


def rgb_photo() -> Image.Image:
    return Image.open(REF / "images" / "rocket.jpg").convert("RGB")


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    gray8 = Image.open(REF / "images" / "camera.png")  # 8-bit grayscale
    wide = (np.asarray(gray8).astype(np.uint16) * 257).astype(np.uint16)  # same image, 16-bit
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I")
    np.testing.assert_array_equal(preprocess(path), EXPECTED["camera.png"])


def test_32_bit_integer_images_are_scaled_not_clipped(tmp_path):
    gray8 = np.asarray(Image.open(REF / "images" / "camera.png")).astype(np.int64)
    for name, top in (("as16.tif", 65535), ("as32.tif", 2**31 - 1)):  # both load as mode I
        path = tmp_path / name
        Image.fromarray((gray8 * top // 255).astype(np.int32)).save(path)
        assert Image.open(path).mode == "I"
        np.testing.assert_array_equal(preprocess(path), EXPECTED["camera.png"])
    path = tmp_path / "negative.tif"
    Image.fromarray((gray8 - 128).astype(np.int32)).save(path)
    with pytest.raises(ImageError, match="negative values"):
        open_image(path)


@pytest.mark.parametrize("mode, value, expected", [("I;16", 30000, 117), ("F", 0.5, 128)])
def test_wide_and_float_images_are_scaled_in_one_float64_copy(mode, value, expected):
    """Under PIL's pixel limit (89 million pixels), each float64 copy of an image takes 700 MB:
    the scaling to 8 bits works in place on one copy, not on three."""
    import tracemalloc

    from aim_mlx.transforms import to_rgb

    img = Image.fromarray(np.full((1000, 1000), value, np.uint16 if mode == "I;16" else "f4"))
    assert img.mode == mode
    tracemalloc.start()
    try:
        rgb = to_rgb(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rgb.mode == "RGB" and rgb.getpixel((500, 500)) == (expected,) * 3
    assert peak < 1.6 * 8 * 1000 * 1000, f"{peak / 1e6:.1f} MB for a 1-megapixel image"


def test_modes_become_rgb_like_convert(tmp_path):
    photo = rgb_photo()
    cmyk = tmp_path / "cmyk.jpg"
    photo.convert("CMYK").save(cmyk, quality=95)
    assert Image.open(cmyk).mode == "CMYK"
    expected = preprocess(Image.open(cmyk).convert("RGB"))
    np.testing.assert_array_equal(preprocess(cmyk), expected)

    rgba = photo.copy()
    rgba.putalpha(0)  # fully transparent: alpha is dropped, colours kept
    np.testing.assert_array_equal(preprocess(rgba), preprocess(photo))

    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    path = tmp_path / "palette.png"
    palette.save(path)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    np.testing.assert_array_equal(preprocess(path), preprocess(palette.convert("RGB")))


def test_exif_orientation_is_applied(tmp_path):
    photo = rgb_photo()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.png"
    photo.save(path, exif=exif)
    upright = photo.transpose(Image.Transpose.ROTATE_270)
    np.testing.assert_array_equal(preprocess(path), preprocess(upright))
    assert not np.array_equal(preprocess(path), preprocess(photo))
    with Image.open(path) as opened:  # a PIL image as an app opens it: the same, upright
        np.testing.assert_array_equal(preprocess(opened), preprocess(upright))


def test_a_pil_image_with_nothing_to_turn_is_not_copied(tmp_path):
    """No EXIF, or an orientation of 1 (already upright): preprocess uses the caller's image as
    it is (ImageOps.exif_transpose returns a full copy, 36 MB for a 12-megapixel photo)."""
    from aim_mlx.transforms import upright

    photo = rgb_photo()
    exif = Image.Exif()
    exif[0x0112] = 1  # "upright"
    photo.save(tmp_path / "upright.jpg", exif=exif)
    with Image.open(tmp_path / "upright.jpg") as opened:
        for img in (photo, opened):
            assert upright(img) is img
    exif[0x0112] = 6
    photo.save(tmp_path / "turned.jpg", exif=exif)
    with Image.open(tmp_path / "turned.jpg") as turned:
        assert upright(turned).size == photo.size[::-1]  # still turned


@pytest.mark.parametrize("name", ["anim.gif", "anim.png", "anim.webp", "pages.tif"])
def test_animated_and_multi_page_images_give_their_first_frame(tmp_path, name):
    red, blue = (Image.new("RGB", (64, 48), c) for c in ((200, 30, 40), (30, 40, 200)))
    options = {"lossless": True} if name.endswith(".webp") else {}
    red.save(tmp_path / name, save_all=True, append_images=[blue], **options)
    assert getattr(Image.open(tmp_path / name), "n_frames", 1) == 2
    np.testing.assert_array_equal(preprocess(tmp_path / name), preprocess(red))


def test_heic_photos_are_read_upright_like_the_same_png(tmp_path):
    """iPhone photos: HEIC, often with an orientation, found in folders and read upright."""
    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif reads HEIC")
    from aim_mlx import images

    photo = rgb_photo()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "IMG_0001.HEIC"
    pillow_heif.from_pillow(photo).save(path, quality=95, exif=exif.tobytes())
    assert images.walk_images(str(tmp_path)) == [str(path)]
    upright = preprocess(photo.transpose(Image.Transpose.ROTATE_270))
    sideways = preprocess(photo)
    got = preprocess(path)
    assert np.abs(got - upright).mean() < 0.03  # lossy HEVC at quality 95
    assert np.abs(got - sideways).mean() > 10 * np.abs(got - upright).mean()


def test_heic_and_avif_without_a_decoder_say_what_to_install(tmp_path, monkeypatch):
    from aim_mlx import transforms

    monkeypatch.setattr(transforms, "register_heif", lambda: False)  # pillow-heif missing
    monkeypatch.setattr(transforms.features, "check", lambda name: False)  # Pillow without AVIF
    for name, reason in [
        ("IMG_0002.heic", "a HEIC/HEIF image, which needs pillow-heif: pip install pillow-heif"),
        ("photo.avif", "an AVIF image, which this Pillow cannot decode"),
        ("photo.jpg", "not an image PIL can read"),
    ]:
        (tmp_path / name).write_bytes(b"\x00\x00\x00\x18ftypheic")  # a header cut short
        with pytest.raises(ImageError, match=re.escape(reason)):
            open_image(tmp_path / name)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (and holds no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [12_000, 100_000])  # past the limit, and past twice the limit
def test_decompression_bombs_are_refused(tmp_path, side):
    assert side * side > Image.MAX_IMAGE_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(side, side))
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(path)


def test_the_pixel_limit_holds_when_another_thread_dropped_the_warning_filter(
    tmp_path, monkeypatch
):
    """Warning filters are process-wide: a decoding thread leaving its catch_warnings restores
    the list it saw, dropping another's "error" filter. PIL then only warns past its limit (up
    to twice it), and the image must still be refused, not decoded."""
    from aim_mlx import transforms

    monkeypatch.setenv("AIM_MLX_MAX_PIXELS", "10000")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    Image.new("RGB", (120, 120), (200, 30, 40)).save(tmp_path / "over.png")  # 14400 pixels
    monkeypatch.setattr(transforms.warnings, "simplefilter", lambda *a, **k: None)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageError) as e:
        open_image(tmp_path / "over.png")
    assert str(e.value).startswith("refused as a possible decompression bomb: more than 10000")


def test_damaged_exif_is_ignored_without_warnings(tmp_path):
    """Photos with slightly damaged EXIF are common: read, without PIL's warnings on stderr."""
    import io
    import warnings

    jpeg = io.BytesIO()
    Image.new("RGB", (60, 40), (200, 30, 40)).save(jpeg, "JPEG")
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 0xFFFF) + bytes(20)  # 65535 entries
    app1 = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    (tmp_path / "exif.jpg").write_bytes(jpeg.getvalue()[:2] + app1 + jpeg.getvalue()[2:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert open_image(tmp_path / "exif.jpg").size == (60, 40)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize(
    "entries",
    [
        struct.pack("<H", 0xFFFF) + bytes(20),  # 65535 entries: corrupt EXIF data
        struct.pack("<HHHIII", 1, 0x010F, 2, 8, 20, 0),  # Make's text past the end: truncated
    ],
    ids=["corrupt", "truncated"],
)
def test_damaged_exif_stays_quiet_outside_aim_mlx_blocks(tmp_path, entries):
    """Images are decoded in threads, and one thread leaving its `catch_warnings` drops the
    filters of another still inside its own: PIL warned on stderr now and then. The filter holds
    for the process: as if another thread had dropped aim-mlx's, PIL reads the EXIF here (in a
    program of its own: pytest imports aim_mlx inside a `catch_warnings` of its own)."""
    import io
    import subprocess
    import sys

    jpeg = io.BytesIO()
    Image.new("RGB", (60, 40)).save(jpeg, "JPEG")
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + entries
    app1 = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    (tmp_path / "exif.jpg").write_bytes(jpeg.getvalue()[:2] + app1 + jpeg.getvalue()[2:])
    program = (
        "import sys, aim_mlx.transforms\n"
        "from PIL import Image\n"
        "with Image.open(sys.argv[1]) as img:\n"
        "    img.getexif()\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", program, str(tmp_path / "exif.jpg")], capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stderr == "", run.stderr


def test_unreadable_files_are_refused_with_a_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not a picture\n")
    full = (REF / "images" / "rocket.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    for name, reason in [
        ("empty.jpg", "not an image"),
        ("text.jpg", "not an image"),
        ("truncated.jpg", "truncated"),
        ("missing.jpg", "no such file"),
    ]:
        with pytest.raises(ImageError, match=reason):
            open_image(tmp_path / name)
        with pytest.raises(ImageError) as e:  # the public API names the file
            aim_mlx.preprocess(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: ") and reason in str(e.value)


def test_a_file_without_read_permission_says_so(tmp_path, monkeypatch):
    """As root reads any file, the denial is simulated where PIL opens the file."""
    import builtins

    path = tmp_path / "locked.jpg"
    path.write_bytes((REF / "images" / "rocket.jpg").read_bytes())
    real_open = builtins.open

    def deny(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(ImageError) as e:
        open_image(path)
    assert str(e.value) == "cannot be read: permission denied"


def test_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1), (200, 30, 40)).save(tmp_path / "dot.png")
    x = preprocess(tmp_path / "dot.png")
    expected = (np.array([200, 30, 40]) / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(x[:, 100, 100], expected, atol=1e-5)
    assert np.ptp(x, axis=(1, 2)).max() < 1e-6  # a flat colour stays flat


def test_a_numpy_array_is_accepted_and_bad_arguments_are_clear():
    photo = Image.open(REF / "images" / "rocket.jpg").convert("RGB")
    pixels = np.asarray(photo)
    np.testing.assert_array_equal(preprocess(pixels), preprocess(photo))
    grey = np.asarray(photo.convert("L"))
    np.testing.assert_array_equal(preprocess(grey), preprocess(photo.convert("L")))
    with pytest.raises(TypeError, match="uint8 numpy array.*got a float32 array"):
        preprocess(pixels.astype(np.float32))
    with pytest.raises(TypeError, match="image path, a PIL image.*got int"):
        preprocess(3)
    for size in (0, -14, 2.5, 100, True):
        with pytest.raises(ValueError, match=f"size must be a positive multiple of 14.*{size!r}"):
            preprocess(photo, size)


@pytest.mark.parametrize("pixels", ["0", "5000000"])
def test_the_pixel_limit_set_holds_for_images_given_in_memory(monkeypatch, pixels):
    """AIM_MLX_MAX_PIXELS lifts the limit on the resized size of a PIL image or an array too,
    before any file is opened; such an image was refused, saying to set the variable set."""
    monkeypatch.setenv("AIM_MLX_MAX_PIXELS", pixels)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # PIL's, made small; restored after
    wide = np.full((2, 100, 3), 90, np.uint8)  # resized to 12800x256 for 224
    for image in (Image.fromarray(wide), wide):
        assert preprocess(image).shape == (3, 224, 224)


def test_images_read_in_threads_leave_the_warning_filters_as_they_were(tmp_path):
    """`catch_warnings` is not thread-safe: decoding threads that left their blocks out of order
    kept PIL's DecompressionBombWarning an error and its UserWarnings ignored, for good, in the
    user's code too (a pool of `preprocess` calls, or classify's decoding threads)."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (300, 200), (i, 30, 40)).save(paths[-1])
        paths.append(tmp_path / f"{i}-palette.png")  # converted in a block of its own
        Image.new("P", (200, 300), i).save(paths[-1], transparency=b"\x00" * 8)
    preprocess(paths[0])  # the process-wide filter of PIL's damaged-metadata warnings is set
    before = list(warnings.filters)
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            list(pool.map(preprocess, paths))
    assert warnings.filters == before


def test_with_context_aware_warnings_each_thread_has_its_own_block(tmp_path, monkeypatch):
    """Python 3.14's context-aware warnings keep filters per thread: a block shared between
    threads would then filter only the first thread's warnings."""
    import types
    import warnings

    from aim_mlx import transforms

    flags = types.SimpleNamespace(context_aware_warnings=True)
    monkeypatch.setattr(transforms, "sys", types.SimpleNamespace(flags=flags))
    with transforms.quiet_pil():
        with pytest.raises(Image.DecompressionBombWarning):
            warnings.warn("too big", Image.DecompressionBombWarning, stacklevel=1)
        assert transforms._QUIET_PIL._blocks == 0  # not the shared block
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    Image.new("RGB", (120, 120)).save(tmp_path / "over.png")  # 14400 pixels: PIL only warns
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(tmp_path / "over.png")
