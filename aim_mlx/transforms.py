"""The upstream evaluation transform, in PIL and numpy.

`Resize(ceil(size / 0.875))` of the shorter side (PIL bicubic, antialiased), `CenterCrop(size)`,
scale to [0, 1], normalise with the ImageNet mean and std: what AIM's `val_transforms` does with
torchvision on a PIL image. Two deliberate differences from upstream, both before the transform:
the EXIF orientation is applied, and 16-bit images are scaled to 8 bits (PIL's `convert("RGB")`
clips them instead).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError, features

from .checks import is_whole
from .constants import CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD
from .errors import AimMlxError, SettingError
from .process_wide import ProcessWide

MEAN = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
STD = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
MAX_PIXELS_ENV = "AIM_MLX_MAX_PIXELS"

HEIF_SUFFIXES = {".heic", ".heif", ".hif"}  # iPhone photos among them; read by pillow-heif
AVIF_SUFFIXES = {".avif"}  # read by Pillow itself from 11.3, when built with libavif

# PIL's warnings about damaged metadata, common in photos and harmless to the pixels, are
# ignored for the whole process, not only in the blocks below: images are decoded in threads,
# and `catch_warnings` is not thread-safe (a thread leaving its block drops another's filter).
warnings.filterwarnings(
    "ignore",
    "(possibly )?corrupt exif|metadata warning|tag (offset|data)|truncated file read|"
    "palette images with transparency|image appears to be a malformed mpo",
    UserWarning,
    r"PIL\.",
)

# Modes holding more than 8 bits per sample: scaled down, not clipped.
_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageError(AimMlxError, ValueError):
    """An image that cannot be read or is refused (the message names the reason)."""


def _quiet_filters() -> None:
    warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _quiet_block() -> warnings.catch_warnings:
    block = warnings.catch_warnings()
    block.__enter__()
    _quiet_filters()
    return block


_QUIET_PIL = ProcessWide(_quiet_block, lambda block: block.__exit__(None, None, None))


@contextmanager
def quiet_pil():
    """PIL's UserWarnings (bad EXIF and the like) ignored and its DecompressionBombWarning an
    error, in the block. Warning filters are process-wide and `catch_warnings` is not
    thread-safe, so the decoding threads' blocks share one (`ProcessWide`), unless filters are
    per thread (Python 3.14's context-aware warnings)."""
    if getattr(sys.flags, "context_aware_warnings", False):
        with warnings.catch_warnings():
            _quiet_filters()
            yield
    else:
        with _QUIET_PIL.held():
            yield


def upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF orientation says (a copy without the tag), or `img` itself
    (`ImageOps.exif_transpose` would copy it)."""
    with quiet_pil():  # bad EXIF
        if img.getexif().get(ExifTags.Base.Orientation, 1) not in range(2, 9):
            return img
        return ImageOps.exif_transpose(img)


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB, upright (EXIF orientation applied).

    Raises ImageError for a missing, unreadable, truncated or oversized file. Images with more
    pixels than AIM_MLX_MAX_PIXELS (default: PIL's limit, about 89 million) are refused as
    possible decompression bombs; 0 lifts the limit.
    """
    limit = apply_pixel_limit()
    register_heif()
    try:
        # Past Image.MAX_IMAGE_PIXELS PIL only warns (it raises past twice that): refuse both.
        with quiet_pil(), Image.open(path) as img:  # bad EXIF ignored too
            # Checked again: warning filters are process-wide, and another thread leaving its
            # catch_warnings can drop quiet_pil's before PIL warns.
            if limit and img.width * img.height > limit:
                raise Image.DecompressionBombError(f"{img.width}x{img.height}")
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))  # a copy: img is closed below
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"refused as a possible decompression bomb: more than {limit} pixels. If the image "
            f"is genuine, set the environment variable {MAX_PIXELS_ENV} to a larger number of "
            "pixels (0: no limit)"
        ) from None
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image") from None
    except PermissionError:
        raise ImageError("cannot be read: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(unreadable_reason(path)) from None
    except Exception as e:  # truncated or corrupt data, bad EXIF: PIL raises many kinds
        raise ImageError(f"cannot decode the image: {e}") from None


@functools.cache
def register_heif() -> bool:
    """Teach PIL to read HEIC / HEIF through pillow-heif; False where it is not installed."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def unreadable_reason(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in HEIF_SUFFIXES and not register_heif():
        return "a HEIC/HEIF image, which needs pillow-heif: pip install pillow-heif"
    if suffix in AVIF_SUFFIXES and not features.check("avif"):
        return "an AVIF image, which this Pillow cannot decode: pip install -U pillow (11.3+)"
    return "not an image PIL can read (empty, damaged or another format)"


def apply_pixel_limit() -> int | None:
    """Set PIL's pixel limit from AIM_MLX_MAX_PIXELS when it is set (empty: unset, as the other
    settings); the limit in force."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if value:
        try:
            pixels = int(value)
            if pixels < 0:
                raise ValueError
        except ValueError:
            raise SettingError(
                f"{MAX_PIXELS_ENV}={value!r}: expected a whole number of pixels (0: no limit)"
            ) from None
        Image.MAX_IMAGE_PIXELS = pixels or None
    return Image.MAX_IMAGE_PIXELS


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; alpha is dropped as `convert("RGB")` does.

    16- and 32-bit integer samples are scaled down to 8 bits (mode I as 16-bit when its values
    fit in 0..65535, else over 0..2^31 - 1; negative ones are refused); floating-point samples
    (mode F) are read as 0..1 intensities, and refused outside that range.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ImageError(
                f"floating-point image with values from {np.nanmin(a):.4g} to {np.nanmax(a):.4g}; "
                "expected intensities in 0..1: save it with 8- or 16-bit integer samples"
            )
        a = np.round(np.multiply(a, 255.0, out=a), out=a).astype(np.uint8)  # in place: 8 B/px
        return Image.fromarray(a, mode="L").convert("RGB")
    if img.mode in _WIDE_MODES:
        a = np.asarray(img, dtype=np.float64)
        if a.size and a.min() < 0:
            raise ImageError(
                f"32-bit integer image with negative values (down to {a.min():.0f}): save it "
                "with 8- or 16-bit samples"
            )
        # Mode I holds 16-bit PNGs (0..65535) as well as 32-bit samples (0..2^31 - 1).
        top = 65535.0 if not a.size or a.max() <= 65535 else 2.0**31 - 1
        a = np.round(np.divide(a, top / 255.0, out=a), out=a).astype(np.uint8)  # in place
        return Image.fromarray(a, mode="L").convert("RGB")
    with quiet_pil():
        # "Palette images with Transparency expressed in bytes should be converted to RGBA".
        return img.convert("RGB")


def resize_shorter_side(img: Image.Image, short: int) -> Image.Image:
    """Scale so the shorter side is `short`, as torchvision's Resize(int) computes the sizes."""
    w, h = img.size
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    limit = apply_pixel_limit() or math.inf  # here too: a PIL image or array is not opened
    if new_w * new_h > limit:
        raise ImageError(
            f"resizing {w}x{h} to {new_w}x{new_h} for the model would pass the limit of {limit} "
            f"pixels; set {MAX_PIXELS_ENV} to a larger number of pixels (0: no limit)"
        )
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def transform(img: Image.Image, size: int = 224) -> np.ndarray:
    """An RGB PIL image -> normalised float32 array (3, size, size)."""
    img = center_crop(resize_shorter_side(img, math.ceil(size / CROP_RATIO)), size)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, size, size)
    return (x - MEAN) / STD


def preprocess(image: str | Path | Image.Image | np.ndarray, size: int = 224) -> np.ndarray:
    """An image path, a PIL image or a uint8 numpy array (H, W, 3) RGB or (H, W) grey -> the
    model's input, float32 (3, size, size); `size` a positive multiple of 14, the patch size.

    Paths are opened with `open_image` (EXIF orientation, 16-bit scaling, bomb check); a PIL
    image is turned upright as its EXIF orientation says (as a path is) and converted to RGB.
    """
    if not is_whole(size) or size <= 0 or size % 14:
        raise ValueError(f"size must be a positive multiple of 14 (the patch size), got {size!r}")
    if isinstance(image, (str, os.PathLike)):
        img = open_image(image)
    elif isinstance(image, Image.Image):
        img = to_rgb(upright(image))
    elif (
        isinstance(image, np.ndarray)
        and image.dtype == np.uint8
        and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3))
    ):
        img = to_rgb(Image.fromarray(image))
    else:
        what = f"a {image.dtype} array of shape {image.shape}" if hasattr(image, "shape") else ""
        raise TypeError(
            "preprocess takes an image path, a PIL image or a uint8 numpy array (H, W, 3) RGB "
            f"or (H, W) grey; got {what or type(image).__name__}"
        )
    if 0 in img.size:
        raise ImageError(f"the image is empty ({img.width}x{img.height} pixels)")
    return transform(img, int(size))
