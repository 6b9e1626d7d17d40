"""Reference photos that are merely unusual must work: validated, run through `squeeze gen` on the tiny
preset, and handed to the model as the upright 8-bit RGB image a viewer would show.

One `squeeze gen` run covers every kind (one subject per image); a spy on `SqueezePipeline.encode_subject`
keeps the PIL images the model received, and the tests below check their pixels.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from squeeze_cli import images as image_io
from squeeze_cli.gen import worker
from squeeze_cli.images import check_image
from squeeze_cli.pipelines.squeeze import SqueezePipeline

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 160, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
HAS_WEBP = features.check("webp")


def halves(mode: str, size: tuple[int, int], left, right) -> Image.Image:
    """An image whose left half is `left` and right half `right`."""
    image = Image.new(mode, size, left)
    image.paste(Image.new(mode, (size[0] - size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return image


def save(image: Image.Image, path: Path, **kwargs) -> None:
    image.save(path, **kwargs)


def cmyk_jpeg(path: Path) -> None:
    save(Image.new("CMYK", (40, 24), (0, 255, 255, 0)), path, quality=95)  # red in ink


def gray_png(path: Path) -> None:
    save(Image.new("L", (24, 40), 100), path)


def gray16_png(path: Path) -> None:
    pixels = np.full((24, 40), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    pixels[:, 20:] = 65535
    image = Image.fromarray(pixels)
    assert image.mode == "I;16"
    save(image, path)


def palette_png(path: Path) -> None:
    image = halves("P", (40, 24), 0, 1)
    image.putpalette([*RED, *BLUE] + [0] * 762)
    save(image, path)


def palette_transparent_png(path: Path) -> None:
    image = halves("P", (40, 24), 0, 1)
    image.putpalette([*RED, *BLUE] + [0] * 762)
    save(image, path, transparency=0)  # the red half is see-through


def rgba_png(path: Path) -> None:
    image = halves("RGBA", (40, 24), (0, 0, 0, 0), (*GREEN, 255))
    image.paste(Image.new("RGBA", (8, 24), (0, 0, 0, 128)), (0, 0))  # half-transparent black strip
    save(image, path)


def la_png(path: Path) -> None:
    save(halves("LA", (40, 24), (0, 0), (0, 255)), path)


def rgb_trns_png(path: Path) -> None:
    save(halves("RGB", (40, 24), BLACK, BLUE), path, transparency=BLACK)  # PNG tRNS colour key


def exif_rotated_jpeg(path: Path) -> None:
    """Stored 48 wide x 32 high with a red block in the stored top-left corner; EXIF orientation 6 says
    "rotate 90° clockwise to view", so it is seen 32 wide x 48 high with the block top-right."""
    image = Image.new("RGB", (48, 32), (128, 128, 128))
    image.paste(Image.new("RGB", (16, 16), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    save(image, path, quality=95, exif=exif)


def webp(path: Path) -> None:
    save(Image.new("RGB", (40, 24), GREEN), path, lossless=True)


def bmp(path: Path) -> None:
    save(Image.new("RGB", (40, 24), BLUE), path)


def tiff_16bit(path: Path) -> None:
    save(Image.fromarray(np.full((24, 40), 32768, dtype=np.uint16)), path)


def tiff_float(path: Path) -> None:
    save(Image.fromarray(np.full((24, 40), 0.5, dtype=np.float32)), path)


def gif(path: Path) -> None:
    save(Image.new("RGB", (40, 24), RED).convert("P"), path)


def bilevel_png(path: Path) -> None:
    save(halves("1", (40, 24), 0, 1), path)


def progressive_jpeg(path: Path) -> None:
    save(Image.new("RGB", (40, 24), BLUE), path, quality=95, progressive=True)


def png_named_jpg(path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 24), GREEN).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())


def one_pixel(path: Path) -> None:
    save(Image.new("RGB", (1, 1), RED), path)


def very_wide(path: Path) -> None:
    save(Image.new("RGB", (400, 8), BLUE), path)


# name -> (file name, builder)
KINDS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "cmyk": ("cmyk.jpg", cmyk_jpeg),
    "gray": ("gray.png", gray_png),
    "gray16": ("gray16.png", gray16_png),
    "palette": ("palette.png", palette_png),
    "palette-alpha": ("palette-alpha.png", palette_transparent_png),
    "rgba": ("rgba.png", rgba_png),
    "la": ("la.png", la_png),
    "rgb-trns": ("rgb-trns.png", rgb_trns_png),
    "exif-rotated": ("exif-rotated.jpg", exif_rotated_jpeg),
    "bmp": ("photo.bmp", bmp),
    "tiff16": ("gray16.tif", tiff_16bit),
    "tiff-float": ("float.tif", tiff_float),
    "gif": ("photo.gif", gif),
    "bilevel": ("bilevel.png", bilevel_png),
    "progressive": ("progressive.jpg", progressive_jpeg),
    "png-named-jpg": ("really-a-png.JPG", png_named_jpg),
    "one-pixel": ("dot.png", one_pixel),
    "very-wide": ("strip.png", very_wide),
}
if HAS_WEBP:
    KINDS["webp"] = ("photo.webp", webp)


def near(pixel, expected, tolerance: int = 6) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected, strict=True))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("unusual")
    for name, (file_name, build) in KINDS.items():
        (folder / "refs" / name).mkdir(parents=True)
        build(folder / "refs" / name / file_name)
    subjects = "".join(
        f"  - name: {name}\n    references: [refs/{name}/{file_name}]\n"
        '    prompts: ["a photo of {subject}"]\n'
        for name, (file_name, _) in KINDS.items()
    )
    (folder / "manifest.yaml").write_text(
        "version: 1\nrecipe: tiny\n"
        "defaults: {height: 32, width: 32, num_inference_steps: 2, reference_size: 32, seeds: [0]}\n"
        f"subjects:\n{subjects}"
    )
    return folder


@pytest.fixture(scope="module")
def received(images, squeeze) -> dict[str, list[Image.Image]]:
    """Run `squeeze gen` once; per subject, the PIL images `encode_subject` was given."""
    loaded: dict[int, str] = {}  # id of a load_rgb result -> the subject folder it came from
    calls: dict[str, list[Image.Image]] = {}
    real_load_rgb = image_io.load_rgb
    real_encode = SqueezePipeline.encode_subject

    def load_rgb(path, *args, **kwargs):
        image = real_load_rgb(path, *args, **kwargs)
        loaded[id(image)] = Path(path).parent.name
        return image

    def encode_subject(self, reference_images, *args, **kwargs):
        references = reference_images if isinstance(reference_images, list) else [reference_images]
        calls[loaded[id(references[0])]] = [image.copy() for image in references]
        return real_encode(self, reference_images, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(worker, "load_rgb", load_rgb)
        patch.setattr(SqueezePipeline, "encode_subject", encode_subject)
        code = squeeze("gen", str(images / "manifest.yaml"), "--out", str(images / "out"), "--quiet").code
    assert code == 0, f"squeeze gen exited {code}"
    return calls


@pytest.mark.parametrize("name", list(KINDS))
def test_each_unusual_image_validates(images, name):
    file_name = KINDS[name][0]
    assert check_image(str(images / "refs" / name / file_name)) is None


def test_gen_runs_every_kind_and_writes_its_image(images, received):
    assert sorted(received) == sorted(KINDS)
    for name in KINDS:
        assert len(received[name]) == 1
        assert (images / "out" / name / "000-s0.png").is_file()
        assert received[name][0].mode == "RGB"


def test_cmyk_is_converted_to_sensible_rgb(received):
    image = received["cmyk"][0]
    assert image.size == (40, 24)
    assert near(image.getpixel((20, 12)), RED, tolerance=20)


def test_grayscale_becomes_grey_rgb(received):
    assert received["gray"][0].getpixel((5, 5)) == (100, 100, 100)
    assert received["bilevel"][0].getpixel((2, 2)) == BLACK
    assert received["bilevel"][0].getpixel((38, 2)) == WHITE


@pytest.mark.parametrize("name", ["gray16", "tiff16"])
def test_16_bit_is_scaled_not_clipped(received, name):
    image = received[name][0]
    assert near(image.getpixel((2, 2)), (128, 128, 128), tolerance=2)  # mid-grey stays mid-grey
    if name == "gray16":
        assert image.getpixel((38, 2)) == WHITE


def test_float_grayscale_in_0_1_is_scaled(received):
    assert near(received["tiff-float"][0].getpixel((2, 2)), (128, 128, 128), tolerance=2)


def test_palette_images(received):
    opaque = received["palette"][0]
    assert opaque.getpixel((2, 2)) == RED and opaque.getpixel((38, 2)) == BLUE
    transparent = received["palette-alpha"][0]
    assert transparent.getpixel((2, 2)) == WHITE  # see-through red is composited on white
    assert transparent.getpixel((38, 2)) == BLUE
    assert near(received["gif"][0].getpixel((5, 5)), RED, tolerance=10)


def test_alpha_is_composited_on_white(received):
    rgba = received["rgba"][0]
    assert near(rgba.getpixel((4, 12)), (127, 127, 127), tolerance=2)  # 50% black over white
    assert rgba.getpixel((12, 12)) == WHITE  # fully transparent (black) pixels
    assert rgba.getpixel((30, 12)) == GREEN
    la = received["la"][0]
    assert la.getpixel((2, 2)) == WHITE and la.getpixel((38, 2)) == BLACK
    keyed = received["rgb-trns"][0]
    assert keyed.getpixel((2, 2)) == WHITE and keyed.getpixel((38, 2)) == BLUE


def test_exif_rotated_jpeg_arrives_upright(received):
    image = received["exif-rotated"][0]
    assert image.size == (32, 48)  # width and height swapped: the stored image is 48x32
    assert near(image.getpixel((28, 4)), RED, tolerance=30)  # the marked corner is now top-right
    for corner in ((4, 4), (4, 44), (28, 44)):
        assert near(image.getpixel(corner), (128, 128, 128), tolerance=30)


@pytest.mark.skipif(not HAS_WEBP, reason="this Pillow has no WebP support")
def test_webp(received):
    assert received["webp"][0].getpixel((5, 5)) == GREEN


def test_other_formats_and_shapes(received):
    assert received["bmp"][0].getpixel((5, 5)) == BLUE
    assert near(received["progressive"][0].getpixel((5, 5)), BLUE, tolerance=10)
    assert received["png-named-jpg"][0].getpixel((5, 5)) == GREEN
    assert received["one-pixel"][0].size == (1, 1)
    assert received["very-wide"][0].size == (400, 8)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_load_rgb_ignores_a_broken_exif_block(tmp_path):
    path = tmp_path / "bad-exif.jpg"
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), BLUE).save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    # An APP1 "Exif" segment right after SOI whose TIFF header is garbage.
    app1 = b"Exif\x00\x00" + b"MM\x00\x2a\xff\xff\xff\xff" + b"\x00" * 8
    path.write_bytes(data[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + data[2:])
    assert check_image(str(path)) is None
    image = image_io.load_rgb(path)
    assert image.mode == "RGB" and image.size == (16, 8)
    assert near(image.getpixel((8, 4)), BLUE, tolerance=10)


def test_dark_16_bit_stays_dark(tmp_path):
    """16-bit values that all happen to be below 256 are nearly black, not 8-bit values."""
    path = tmp_path / "dark16.png"
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint16)).save(path)
    assert max(image_io.load_rgb(path).getpixel((4, 4))) <= 1


def test_validation_stays_cheap_on_a_large_photo(tmp_path, monkeypatch):
    """The completeness check reads the file but does not decode it: a 12-megapixel JPEG and PNG are
    checked without a single pixel decoded (work counted, not timed: a busy machine cannot fail it)."""
    decoders = []
    getdecoder = Image._getdecoder

    def counting_getdecoder(mode, decoder_name, args, extra=()):
        decoders.append(decoder_name)
        return getdecoder(mode, decoder_name, args, extra)

    monkeypatch.setattr(Image, "_getdecoder", counting_getdecoder)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    jpeg, png = tmp_path / "big.jpg", tmp_path / "big.png"
    Image.fromarray(pixels).save(jpeg, quality=85)
    Image.fromarray(pixels[:1500, :2000]).save(png, compress_level=1)
    for path in (jpeg, png):
        decoders.clear()
        assert check_image(str(path)) is None
        assert decoders == [], path.name  # no decoder was even made
        with Image.open(path) as image:
            image.load()
        assert decoders, path.name  # a full decode goes through the counter: the spy works


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
