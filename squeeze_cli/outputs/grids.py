"""What a view looks like: a labelled grid per prompt (the references, then every seed), the pages of a
subject's contact sheet (every prompt), and `squeeze train`'s validation grid. A grid or page records in
its PNG the hash of what it was drawn from (`views_inputs`), so `views.plan_views` can tell when it is out
of date."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import stat
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin

from squeeze_cli.images import load_rgb
from squeeze_cli.outputs.files import atomic_write_bytes, strict_json_dumps
from squeeze_cli.outputs.layout import contact_sheet_path, grid_path

GRID_THUMB_HEIGHT = 256
SHEET_THUMB_HEIGHT = 160
GRID_MAX_COLUMNS = 8  # generated images per grid row before wrapping
SHEET_MAX_COLUMNS = 12  # images per contact-sheet row; the rest are counted in the row's caption
_PAD = 8
_GAP = 24  # between the references and the generated images
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_MUTED = (110, 110, 110)
_PLACEHOLDER = (225, 225, 225)
VIEW_INPUTS_KEY = "squeeze-view"  # PNG text chunk: the hash of what a grid or sheet was drawn from
_VIEW_FORMAT = 1  # bumped when the drawing changes, so old views are redrawn
# zlib level 1: encoding was most of a grid's drawing time at the default 6; the file is ~10 % larger.
_VIEW_COMPRESS_LEVEL = 1


Thumb = Image.Image | None  # None: a grey "missing" tile


# ----------------------------------------------------------------------------------------------------
# What to draw
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptViews:
    """One prompt of a `PageViews`: its `(seed, image path or None)` entries, and the inputs hash to record
    in its grid when the grid is to be drawn (None: the grid on disk is up to date, or grids are off)."""

    prompt_index: int
    prompt: str
    entries: tuple[tuple[int, str | None], ...]
    grid_inputs: str | None


@dataclasses.dataclass(frozen=True)
class PageViews:
    """What to draw for one contact-sheet page of a subject: the stale grids of its prompts, and the page
    itself when `sheet_inputs` is set. One page's views are drawn together, so an image shown on both its
    grid and the page is decoded once. Plain data: it travels to other processes."""

    subject: str
    page: int
    references: tuple[str, ...]
    prompts: tuple[PromptViews, ...]  # every prompt of the page: the sheet shows them all
    sheet_inputs: str | None

    @property
    def cost(self) -> int:
        """Images to decode: what the drawing time follows."""
        sheet_columns = SHEET_MAX_COLUMNS if self.sheet_inputs is not None else 0
        return sum(
            len(p.entries) if p.grid_inputs is not None else min(len(p.entries), sheet_columns)
            for p in self.prompts
        )


# ----------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(font: Any, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def _line_height(font: Any) -> int:
    _, top, _, bottom = font.getbbox("Ag|")
    return int(bottom - min(top, 0)) + 2


def _fit(font: Any, text: str, max_width: int) -> str:
    """`text` on one line, cut with '...' to fit `max_width` pixels."""
    text = " ".join(text.split())
    if _text_width(font, text) <= max_width:
        return text
    low, high = 0, len(text)
    while low < high:  # longest prefix that fits with the ellipsis
        middle = (low + high + 1) // 2
        if _text_width(font, text[:middle].rstrip() + "...") <= max_width:
            low = middle
        else:
            high = middle - 1
    return text[:low].rstrip() + "..."


def _decode(path: str | os.PathLike | None) -> Image.Image | None:
    """The image at `path` as RGB, or None when there is none or it is unreadable."""
    if path is None:
        return None
    try:
        return load_rgb(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # a grid is a view of the run; a missing or broken image is shown, not fatal


def _shrink(image: Image.Image | None, height: int) -> Image.Image | None:
    """`image` `height` pixels high (at most twice as wide)."""
    if image is None:
        return None
    return ImageOps.contain(image, (2 * height, height), Image.Resampling.LANCZOS)


def _thumbnail(path: str | os.PathLike | None, height: int) -> Image.Image | None:
    """A thumbnail `height` pixels high (at most twice as wide), or None when the image is unreadable."""
    if path is None:
        return None
    try:  # a JPEG reference decodes at a reduced size: much faster for a large photo
        image = load_rgb(path, max_side=2 * height)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return _shrink(image, height)


def _draw_tile(
    canvas: Image.Image, x: int, y: int, thumb: Image.Image | None, label: str, height: int
) -> int:
    """Paste `thumb` (or a grey placeholder) at (x, y) with `label` under it; returns the tile width."""
    font = _font(14)
    width = thumb.width if thumb is not None else height
    draw = ImageDraw.Draw(canvas)
    if thumb is None:
        draw.rectangle([x, y, x + width - 1, y + height - 1], fill=_PLACEHOLDER)
        note = _fit(font, "missing", width - 4)
        draw.text(
            (x + (width - _text_width(font, note)) // 2, y + height // 2 - 8), note, fill=_MUTED, font=font
        )
    else:
        canvas.paste(thumb, (x, y + (height - thumb.height) // 2))
    label = _fit(font, label, width)
    draw.text((x + (width - _text_width(font, label)) // 2, y + height + 3), label, fill=_TEXT, font=font)
    return width


def _tile_width(thumb: Image.Image | None, height: int) -> int:
    return thumb.width if thumb is not None else height


def _encode_plain_png(image: Image.Image, inputs: str | None = None) -> bytes:
    info = None
    if inputs is not None:  # what the view was drawn from, so a later run can tell when it is out of date
        info = PngImagePlugin.PngInfo()
        info.add_text(VIEW_INPUTS_KEY, inputs)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_VIEW_COMPRESS_LEVEL, pnginfo=info)
    return buffer.getvalue()


def _grid_canvas(
    prompt_index: int,
    prompt_text: str,
    references: Sequence[Thumb],
    generated: Sequence[tuple[int, Thumb]],
    thumb_height: int,
    max_columns: int,
) -> Image.Image:
    label_height = _line_height(_font(14)) + 6
    caption_font = _font(18)
    caption_height = _line_height(caption_font) + 2 * _PAD
    row_height = thumb_height + label_height + _PAD
    rows = [generated[i : i + max_columns] for i in range(0, len(generated), max(1, max_columns))] or [[]]

    references_width = sum(_tile_width(thumb, thumb_height) + _PAD for thumb in references)
    generated_x = _PAD + references_width + (_GAP if references else 0)
    rows_width = max(sum(_tile_width(thumb, thumb_height) + _PAD for _, thumb in row) for row in rows)
    width = max(generated_x + rows_width, 2 * thumb_height)
    height = caption_height + len(rows) * row_height + _PAD

    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    caption = _fit(caption_font, f"#{prompt_index:03d}  {prompt_text}", width - 2 * _PAD)
    draw.text((_PAD, _PAD), caption, fill=_TEXT, font=caption_font)

    x, y = _PAD, caption_height
    for number, thumb in enumerate(references, start=1):
        x += _draw_tile(canvas, x, y, thumb, f"ref {number}", thumb_height) + _PAD
    if references:  # a rule between what was given and what was made
        rule_x = generated_x - _GAP // 2 - _PAD // 2
        draw.line([rule_x, y, rule_x, y + thumb_height], fill=_MUTED, width=2)
    for row in rows:
        x = generated_x
        for seed, thumb in row:
            x += _draw_tile(canvas, x, y, thumb, f"seed {seed}", thumb_height) + _PAD
        y += row_height
    return canvas


def _sheet_canvas(
    subject: str,
    page: int,
    references: Sequence[Thumb],
    prompt_rows: Sequence[tuple[PromptViews, Sequence[tuple[int, Thumb]]]],
    thumb_height: int,
) -> Image.Image:
    label_height = _line_height(_font(14)) + 6
    caption_font = _font(16)
    caption_height = _line_height(caption_font) + _PAD
    block_height = caption_height + thumb_height + label_height + _PAD

    widths = [sum(_tile_width(thumb, thumb_height) + _PAD for thumb in references)]
    widths += [sum(_tile_width(thumb, thumb_height) + _PAD for _, thumb in tiles) for _, tiles in prompt_rows]
    width = max(_PAD + max(widths), 3 * thumb_height)
    height = (1 + len(prompt_rows)) * block_height + _PAD

    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = _PAD
    title = f"{subject}: references" + (f" (page {page})" if page > 1 else "")
    draw.text((_PAD, y), _fit(caption_font, title, width - 2 * _PAD), fill=_TEXT, font=caption_font)
    x = _PAD
    for number, thumb in enumerate(references, start=1):
        x += _draw_tile(canvas, x, y + caption_height, thumb, f"ref {number}", thumb_height) + _PAD
    y += block_height
    for row, tiles in prompt_rows:
        draw.line([_PAD, y - _PAD // 2, width - _PAD, y - _PAD // 2], fill=_PLACEHOLDER, width=1)
        more = len(row.entries) - len(tiles)
        suffix = f"  (+{more} more)" if more > 0 else ""
        caption = (
            _fit(caption_font, f"#{row.prompt_index:03d}  {row.prompt}", width - 2 * _PAD - 120) + suffix
        )
        draw.text((_PAD, y), caption, fill=_TEXT, font=caption_font)
        x = _PAD
        for seed, thumb in tiles:
            x += _draw_tile(canvas, x, y + caption_height, thumb, f"seed {seed}", thumb_height) + _PAD
        y += block_height
    return canvas


class ReferenceThumbs:
    """Reference thumbnails by (paths, height), made once per subject and size for one drawing pass."""

    def __init__(self) -> None:
        self._thumbs: dict[tuple[tuple[str, ...], int], list[Thumb]] = {}

    def get(self, paths: tuple[str, ...], height: int) -> list[Thumb]:
        key = (paths, height)
        if key not in self._thumbs:
            self._thumbs[key] = [_thumbnail(path, height) for path in paths]
        return self._thumbs[key]

    def of(self, page: PageViews) -> dict[int, list[Thumb]]:
        """The thumbnails `page`'s views need, by height."""
        heights = [GRID_THUMB_HEIGHT] if any(p.grid_inputs is not None for p in page.prompts) else []
        heights += [SHEET_THUMB_HEIGHT] if page.sheet_inputs is not None else []
        return {height: self.get(page.references, height) for height in heights}


def draw_page(
    out_dir: Path, page: PageViews, references: dict[int, list[Thumb]], should_stop: Callable[[], bool]
) -> None:
    """Draw `page`'s stale grids and, when stale, the page itself, decoding each image once."""
    sheet_rows = []
    for prompt in page.prompts:
        if should_stop():
            return
        grid_tiles: list[tuple[int, Thumb]] = []
        sheet_tiles: list[tuple[int, Thumb]] = []
        for column, (seed, path) in enumerate(prompt.entries):
            on_sheet = page.sheet_inputs is not None and column < SHEET_MAX_COLUMNS
            if prompt.grid_inputs is None and not on_sheet:
                break
            image = _decode(path)
            if prompt.grid_inputs is not None:
                grid_tiles.append((seed, _shrink(image, GRID_THUMB_HEIGHT)))
            if on_sheet:
                sheet_tiles.append((seed, _shrink(image, SHEET_THUMB_HEIGHT)))
        if prompt.grid_inputs is not None:
            canvas = _grid_canvas(
                prompt.prompt_index,
                prompt.prompt,
                references[GRID_THUMB_HEIGHT],
                grid_tiles,
                GRID_THUMB_HEIGHT,
                GRID_MAX_COLUMNS,
            )
            grid_file = grid_path(out_dir, page.subject, prompt.prompt_index)
            atomic_write_bytes(grid_file, _encode_plain_png(canvas, prompt.grid_inputs))
        sheet_rows.append((prompt, sheet_tiles))
    if page.sheet_inputs is not None:
        canvas = _sheet_canvas(
            page.subject, page.page, references[SHEET_THUMB_HEIGHT], sheet_rows, SHEET_THUMB_HEIGHT
        )
        sheet_file = contact_sheet_path(out_dir, page.subject, page.page)
        atomic_write_bytes(sheet_file, _encode_plain_png(canvas, page.sheet_inputs))


# ----------------------------------------------------------------------------------------------------
# What a view was drawn from
# ----------------------------------------------------------------------------------------------------


def views_inputs(kind: str, references: Sequence[str], rows: Sequence[tuple[int, str, list]]) -> str:
    """The hash of what a view shows: its kind, the references, and per prompt `(index, text,
    [(seed, job id, PNG sha256 or None)])`. Job ids cover the references' bytes, the PNG hashes the
    pixels."""
    payload = {"format": _VIEW_FORMAT, "kind": kind, "references": list(references), "rows": rows}
    return hashlib.sha256(strict_json_dumps(payload, sort_keys=True).encode()).hexdigest()


def view_inputs(path: Path) -> str | None:
    """The inputs hash recorded in a grid or sheet, or None when the file is missing or does not read
    through to its end with valid chunk checksums (truncated, damaged)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None  # not a file squeeze drew (a link, a FIFO): replaced by the redraw
        with Image.open(path) as image:
            recorded = image.info.get(VIEW_INPUTS_KEY)
            image.verify()  # every chunk's CRC, up to IEND: catches a cut or damaged file without decoding
    except Exception:  # noqa: BLE001 - any failure to read means "draw it again"
        return None
    return recorded if isinstance(recorded, str) else None


# ----------------------------------------------------------------------------------------------------
# The training validation grid
# ----------------------------------------------------------------------------------------------------

VALIDATION_THUMB_HEIGHT = 192  # the training validation grid's images


def write_validation_grid(
    path: Path,
    caption: str,
    rows: Sequence[tuple[Sequence[Image.Image], str, Image.Image]],
    thumb_height: int = VALIDATION_THUMB_HEIGHT,
) -> Path:
    """`squeeze train`'s validation grid: `rows` of (references, instruction, generated image) under a
    caption naming the step, as one labelled PNG at `path`."""

    def thumb(image: Image.Image) -> Image.Image:
        return ImageOps.contain(image, (2 * thumb_height, thumb_height), Image.Resampling.LANCZOS)

    label_font, caption_font = _font(14), _font(18)
    label_height = _line_height(label_font) + 6
    caption_height = _line_height(caption_font) + 2 * _PAD
    row_height = _line_height(label_font) + 4 + thumb_height + label_height + _PAD
    tiles = [([thumb(r) for r in references], text, thumb(image)) for references, text, image in rows]
    width = max(
        [_PAD + sum(t.width + _PAD for t in refs) + _GAP + image.width + _PAD for refs, _, image in tiles]
        + [4 * thumb_height]
    )
    canvas = Image.new("RGB", (width, caption_height + len(tiles) * row_height + _PAD), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((_PAD, _PAD), _fit(caption_font, caption, width - 2 * _PAD), fill=_TEXT, font=caption_font)
    y = caption_height
    for references, text, image in tiles:
        draw.text((_PAD, y), _fit(label_font, text, width - 2 * _PAD), fill=_MUTED, font=label_font)
        top = y + _line_height(label_font) + 4
        x = _PAD
        for number, reference in enumerate(references, start=1):
            x += _draw_tile(canvas, x, top, reference, f"ref {number}", thumb_height) + _PAD
        x += _GAP
        _draw_tile(canvas, x, top, image, "generated", thumb_height)
        y += row_height
    return atomic_write_bytes(path, _encode_plain_png(canvas))
