"""How a grid and a contact-sheet page look (docs/outputs.md, "Grids and contact sheets"): the references,
then every seed of a prompt, labelled, in rows; a missing image as a grey tile; references of any mode
shown upright, as a viewer shows them. Drawn through `draw_views`, as a run draws them (test_views.py:
which views are drawn, and by whom)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageStat
from test_outputs import solid, temp_files

from squeeze_cli.outputs import grids
from squeeze_cli.outputs.grids import (
    GRID_MAX_COLUMNS,
    GRID_THUMB_HEIGHT,
    SHEET_MAX_COLUMNS,
    SHEET_THUMB_HEIGHT,
    PageViews,
    PromptViews,
)
from squeeze_cli.outputs.views import draw_views


def close(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 8) -> bool:
    """JPEG references come back a few levels off."""
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def dark_pixels(image: Image.Image, box: tuple[int, int, int, int]) -> int:
    """Pixels darker than mid grey in `box`: label text on the white background."""
    return sum(image.crop(box).convert("L").histogram()[:128])


def draw(out: Path, page: PageViews) -> None:
    draw_views(out, [page], lambda: False, workers=1)


def grid_page(references, prompt_index: int, prompt: str, entries) -> PageViews:
    """One prompt's grid to draw, and no contact sheet."""
    entries = tuple((seed, None if path is None else str(path)) for seed, path in entries)
    views = PromptViews(prompt_index, prompt, entries, grid_inputs="inputs")
    return PageViews("dog", 1, tuple(str(path) for path in references), (views,), sheet_inputs=None)


def test_prompt_grid_shows_references_and_seeds_with_labels(tmp_path):
    references = []
    rotated = Image.new("RGB", (120, 60), (0, 0, 255))  # stored sideways; EXIF says rotate 90
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "ref-rotated.jpg", exif=exif)
    references.append(tmp_path / "ref-rotated.jpg")
    Image.new("RGBA", (80, 80), (0, 255, 0, 128)).save(tmp_path / "ref-alpha.png")
    references.append(tmp_path / "ref-alpha.png")
    Image.new("I;16", (50, 50), 40000).save(tmp_path / "ref-16bit.png")
    references.append(tmp_path / "ref-16bit.png")
    generated = []
    for seed in (1, 2):
        path = tmp_path / f"gen-{seed}.png"
        solid((255, 0, 0), (128, 128)).save(path)
        generated.append((seed, path))
    generated.append((3, None))  # a failed job: a grey tile

    draw(tmp_path / "out", grid_page(references, 4, "a dog " * 100, generated))
    grid = tmp_path / "out" / "dog" / "grid-004.png"
    with Image.open(grid) as image:
        assert image.info[grids.VIEW_INPUTS_KEY] == "inputs"
        image = image.convert("RGB")
    # caption + one row; tiles h high: ref 1 is upright (60 wide x 120 high → h/2 x h), ref 2 and 3 h x h,
    # three h x h generated tiles.
    h = GRID_THUMB_HEIGHT
    pad, gap = grids._PAD, grids._GAP
    caption_height = grids._line_height(grids._font(18)) + 2 * pad
    label_height = grids._line_height(grids._font(14)) + 6
    assert image.height == caption_height + h + label_height + pad + pad
    assert image.width == pad + (h // 2 + pad) + 2 * (h + pad) + gap + 3 * (h + pad)
    y = caption_height
    assert close(image.getpixel((pad + h // 4, y + h // 2)), (0, 0, 255))  # upright reference, blue
    second_x = pad + h // 2 + pad
    assert image.getpixel((second_x + h // 2, y + h // 2))[1] > 200  # alpha flattened onto white: light green
    third_x = second_x + h + pad
    assert 140 < image.getpixel((third_x + h // 2, y + h // 2))[0] < 170  # 16-bit scaled, not clipped
    first_generated_x = pad + (h // 2 + pad) + 2 * (h + pad) + gap
    assert image.getpixel((first_generated_x + h // 2, y + h // 2)) == (255, 0, 0)
    failed_x = first_generated_x + 2 * (h + pad)
    assert image.getpixel((failed_x + h // 2, y + h // 4)) == grids._PLACEHOLDER  # above its "missing"
    assert dark_pixels(image, (0, 0, image.width, caption_height)) > 50  # the caption
    label_box = (first_generated_x, y + h, first_generated_x + h, y + h + label_height)
    assert dark_pixels(image, label_box) > 20  # "seed 1"
    assert temp_files(tmp_path) == []


def test_prompt_grid_wraps_many_seeds(tmp_path):
    path = tmp_path / "gen.png"
    solid((0, 128, 0), (32, 32)).save(path)
    seeds = 2 * GRID_MAX_COLUMNS + 1
    draw(tmp_path, grid_page([], 0, "p", [(seed, path) for seed in range(seeds)]))
    with Image.open(tmp_path / "dog" / "grid-000.png") as image:
        rows, h, pad = 3, GRID_THUMB_HEIGHT, grids._PAD
        label_height = grids._line_height(grids._font(14)) + 6
        caption_height = grids._line_height(grids._font(18)) + 2 * pad
        assert image.height == caption_height + rows * (h + label_height + pad) + pad
        assert image.width == max(pad + GRID_MAX_COLUMNS * (h + pad), 2 * h)


def test_contact_sheet_has_a_reference_row_and_one_row_per_prompt(tmp_path):
    reference = tmp_path / "ref.jpg"
    solid((0, 0, 200), (100, 100)).save(reference)
    colors = [(250, 0, 0), (0, 160, 0)]
    prompts = []
    for prompt_index, color in enumerate(colors):
        entries = []
        for seed in range(SHEET_MAX_COLUMNS + 1):  # one more than a row shows
            path = tmp_path / f"{prompt_index}-{seed}.png"
            solid(color, (96, 96)).save(path)
            entries.append((seed, str(path)))
        prompts.append(PromptViews(prompt_index, f"prompt {prompt_index}", tuple(entries), grid_inputs=None))

    draw(tmp_path / "out", PageViews("dog", 1, (str(reference),), tuple(prompts), sheet_inputs="inputs"))
    assert sorted(path.name for path in (tmp_path / "out" / "dog").iterdir()) == ["contact-sheet.png"]
    with Image.open(tmp_path / "out" / "dog" / "contact-sheet.png") as image:
        image = image.convert("RGB")
    h, pad = SHEET_THUMB_HEIGHT, grids._PAD
    caption_height = grids._line_height(grids._font(16)) + pad
    block = caption_height + h + grids._line_height(grids._font(14)) + 6 + pad
    assert image.size == (max(pad + SHEET_MAX_COLUMNS * (h + pad), 3 * h), 3 * block + pad)
    assert close(image.getpixel((pad + h // 2, pad + caption_height + h // 2)), (0, 0, 200))
    for row, color in enumerate(colors, start=1):
        top = pad + row * block
        assert image.getpixel((pad + h // 2, top + caption_height + h // 2)) == color
        assert (
            dark_pixels(image, (0, top, image.width, top + caption_height)) > 30
        )  # "#000  prompt 0  (+1 more)"
    assert ImageStat.Stat(image).extrema[0][0] < 50  # not blank
