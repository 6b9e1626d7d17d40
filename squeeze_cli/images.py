"""Reading reference images: header and completeness checks that decode nothing, and `load_rgb`, which
turns whatever a photo folder holds into the upright 8-bit RGB image the models see. Torch-free."""

from __future__ import annotations

import os
import warnings
from typing import BinaryIO

from PIL import ExifTags, Image, ImageOps

from squeeze_cli.reading import NotARegularFileError, open_regular_file

# Reference images larger than this (in pixels) are refused from their header alone: a decompression
# bomb must not get as far as the decoder.
MAX_REFERENCE_PIXELS = 8192 * 8192
REFERENCE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
_WHITE = (255, 255, 255)


IMAGE_HINTS = {
    "the file is empty": "replace it with the image, or remove it from the references",
    "the file is truncated": "the download or copy was cut short: copy the image again",
    "the file is damaged": "copy the image again, or re-save it with an image editor",
    "not a readable image": "use a PNG, JPEG, WebP, BMP, TIFF or GIF image",
    "not a regular file": "list image files only",
    "the image is too large": f"downscale it to at most {MAX_REFERENCE_PIXELS:,} pixels (e.g. 4096x4096)",
}


def image_hint(reason: str) -> str | None:
    """The fix for a `check_image` reason, when there is an obvious one."""
    return IMAGE_HINTS.get(reason.split(":")[0].split(" (")[0])


def check_image(path: str) -> str | None:
    """Why `path` is not a usable reference image; None when it is fine.

    The header gives the size (decompression bombs are refused before any pixel is decoded); then a
    cheap check that the pixel data is all there, so a truncated file is caught before anything runs:
    PNG chunks are read through to IEND with their checksums (no decompression), a JPEG's scans must
    reach its end-of-image marker, and the rarer formats are decoded.
    """
    try:
        with open_regular_file(path) as file:  # a FIFO or device swapped in must not block the check
            if os.fstat(file.fileno()).st_size == 0:
                return "the file is empty"
            return _check_open_image(file)
    except NotARegularFileError as error:
        return error.strerror
    except OSError as error:
        return f"cannot read it: {error.strerror or error}"


def _check_open_image(file: BinaryIO) -> str | None:
    # The plugins of REFERENCE_FORMATS, imported to register them: without them a WebP or TIFF reference
    # (or a file that is no image) makes `Image.open` call `Image.init()`, which imports all ~45 (~30 ms).
    from PIL import (  # noqa: F401
        BmpImagePlugin,
        GifImagePlugin,
        Image,
        JpegImagePlugin,
        PngImagePlugin,
        TiffImagePlugin,
        UnidentifiedImageError,
        WebPImagePlugin,
    )

    try:
        with warnings.catch_warnings():  # PIL warns between 1x and 2x its limit, raises above
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file, formats=REFERENCE_FORMATS) as image:
                width, height = image.size
                if width < 1 or height < 1:
                    return f"the image has no pixels ({width}x{height})"
                if (too_large := _too_large(image)) is not None:
                    return too_large
                if image.format == "PNG":
                    image.verify()
                elif image.format == "JPEG":
                    if not _jpeg_is_complete(file):
                        return "the file is truncated: the JPEG data stops before its end marker"
                else:
                    image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return (
            f"the image is too large: its header declares more than {Image.MAX_IMAGE_PIXELS:,} pixels "
            "(a decompression bomb?)"
        )
    except UnidentifiedImageError:
        return f"not a readable image (supported: {', '.join(REFERENCE_FORMATS)})"
    except (EOFError, OSError, SyntaxError, ValueError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, EOFError) or "truncated" in reason.lower():
            return f"the file is truncated: {reason}"
        if isinstance(error, SyntaxError) or "broken" in reason.lower() or "crc" in reason.lower():
            return f"the file is damaged: {reason}"
        if isinstance(error, OSError) and error.errno is not None:  # the file system's complaint
            return f"cannot read it: {error.strerror or reason}"
        return f"the file is damaged: {reason}"  # the decoder's
    except Exception as error:  # a decoder's unexpected complaint about a hostile file is still a refusal
        return f"the file is damaged: {type(error).__name__}: {' '.join(str(error).split())}"
    return None


def _too_large(image: Image.Image) -> str | None:
    width, height = image.size
    if width * height > MAX_REFERENCE_PIXELS:
        return f"the image is too large: {width}x{height}, more than {MAX_REFERENCE_PIXELS:,} pixels"
    return None


def _jpeg_is_complete(file: BinaryIO) -> bool:
    """Whether the JPEG's entropy-coded data reaches an end-of-image marker (FFD9).

    Walks the marker segments to the first start-of-scan, then looks for FFD9 after it: inside scan data
    0xFF is always followed by 0x00 or a restart marker, so the first FFD9 there is the real end. Bytes
    after it (a camera's trailer, a motion photo's video) are allowed. Reads the file once, no decoding.
    """
    file.seek(0)
    data = file.read()
    position = 2  # after SOI
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return False
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:  # start of scan: the entropy-coded data follows its header
            return data.find(b"\xff\xd9", position + 2 + length) != -1
        if marker == 0xD9:
            return False  # an end marker before any scan: no image data
        position += 2 + length
    return False


def upright_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the image as `load_rgb` returns it, read from the header alone.

    Raises:
        `OSError`: `path` is not a regular file (e.g. swapped for a FIFO since validation), or unreadable.
    """
    with open_regular_file(path) as file, Image.open(file) as image:
        try:
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        except Exception:  # a malformed EXIF block: `load_rgb` uses the image as stored
            orientation = 1
        width, height = image.size
    # EXIF orientations 5-8 are rotations by 90 degrees: the upright image is the stored one turned.
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_rgb(path: str | os.PathLike, max_side: int | None = None) -> Image.Image:
    """An image as 8-bit RGB, upright (EXIF orientation applied), transparency flattened onto white.

    Every mode a photo folder may hold comes out as what a viewer shows: 16-bit grayscale is scaled to 8
    bits rather than clipped, 32-bit integer and float grayscale are scaled by their range, CMYK is
    converted, palette and grayscale transparency (including a PNG's tRNS colour) is composited on white.
    A broken EXIF block is ignored (the image is used as stored) rather than failing the subject.
    `max_side` lets JPEG decode at a reduced size, which is much faster for thumbnails of large photos.

    Raises:
        `OSError`: the file cannot be read or decoded. `PIL.Image.DecompressionBombError`: its header
            declares more than `MAX_REFERENCE_PIXELS` pixels (nothing is decoded).
    """
    with open_regular_file(path) as file, Image.open(file) as image:
        # From the header, before any pixel is decoded: `check_image` refused such a photo, but a run
        # trusts an unchanged photo's cached check (`reference_facts`: a file anyone may write) without
        # reading it, and may load a photo swapped in since its check. PIL itself refuses only above
        # 179 Mpx (and warns above 89).
        if (too_large := _too_large(image)) is not None:
            raise Image.DecompressionBombError(too_large)
        if max_side is not None and image.format == "JPEG":
            image.draft("RGB", (max_side, max_side))
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # a malformed EXIF block must not cost the subject its reference
            image.load()
        if image.mode.startswith("I;16"):
            # The bit depth is known: 0..65535 maps to 0..255. convert("L") would clip all above 255 to white.
            image = image.convert("I").point(lambda value: value * (255 / 65535)).convert("L")
            image.info.pop("transparency", None)  # a 16-bit tRNS value means nothing at 8 bits
        elif image.mode in ("I", "F"):
            low, high = image.getextrema()
            if image.mode == "F" and 0 <= low and high <= 1.0:
                scale = 255.0  # float images in [0, 1]
            elif high > 65535:
                scale = 255 / high
            elif high > 255:
                scale = 255 / 65535  # 16-bit data widened to 32 bits
            else:
                scale = 1.0
            image = image.point(lambda value: value * scale).convert("L")
            image.info.pop("transparency", None)  # a 16-bit tRNS value means nothing at 8 bits
        if image.mode in ("P", "PA") or "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "La", "RGBa"):
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, _WHITE)
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat
        return image.convert("RGB")
