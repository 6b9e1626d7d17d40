"""Labelled grids (references + every seed of one prompt) and contact sheets (every prompt of a subject)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin

from squeeze_cli.images import load_rgb
from squeeze_cli.outputs.files import atomic_write_bytes, strict_json_dumps
from squeeze_cli.outputs.layout import contact_sheet_path, grid_path, image_path

if TYPE_CHECKING:
    from squeeze_cli.outputs.resume import Finished
    from squeeze_cli.plan import Job


# ----------------------------------------------------------------------------------------------------
# Grids and contact sheets
# ----------------------------------------------------------------------------------------------------

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


@dataclasses.dataclass(frozen=True)
class SheetRow:
    """One prompt of a contact sheet: its index, text, and `(seed, image path or None)` entries."""

    prompt_index: int
    prompt: str
    entries: Sequence[tuple[int, str | os.PathLike | None]]


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


def _thumbnail(path: str | os.PathLike | None, height: int) -> Image.Image | None:
    """A thumbnail `height` pixels high (at most twice as wide), or None when the image is unreadable."""
    if path is None:
        return None
    try:
        image = load_rgb(path, max_side=2 * height)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # a grid is a view of the run; a missing or broken image is shown, not fatal
    return ImageOps.contain(image, (2 * height, height), Image.Resampling.LANCZOS)


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
    image.save(buffer, format="PNG", optimize=False, pnginfo=info)
    return buffer.getvalue()


def write_prompt_grid(
    out_dir: str | os.PathLike,
    subject: str,
    prompt_index: int,
    prompt_text: str,
    reference_paths: Sequence[str | os.PathLike],
    entries: Sequence[tuple[int, str | os.PathLike | None]],
    *,
    thumb_height: int = GRID_THUMB_HEIGHT,
    max_columns: int = GRID_MAX_COLUMNS,
    inputs: str | None = None,
) -> Path:
    """`OUT/<subject>/grid-<prompt_index:03d>.png`: the references, then every seed of one prompt.

    Layout: a caption `#<prompt_index> <prompt>` (cut to the width), then the reference thumbnails
    labelled `ref 1`, `ref 2`, ..., a gap, and the generated thumbnails labelled `seed <seed>`, in rows of
    at most `max_columns`. Thumbnails share one height. Missing or unreadable images are grey tiles.

    Args:
        entries: `(seed, image path)` pairs in the order to show them; the path may be None (failed).
        inputs: the `views_inputs` key of what is drawn, kept in the PNG's `squeeze-view` text chunk.
    """
    label_height = _line_height(_font(14)) + 6
    caption_font = _font(18)
    caption_height = _line_height(caption_font) + 2 * _PAD
    row_height = thumb_height + label_height + _PAD

    references = [_thumbnail(path, thumb_height) for path in reference_paths]
    generated = [(seed, _thumbnail(path, thumb_height)) for seed, path in entries]
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

    return atomic_write_bytes(grid_path(out_dir, subject, prompt_index), _encode_plain_png(canvas, inputs))


def write_contact_sheet(
    out_dir: str | os.PathLike,
    subject: str,
    reference_paths: Sequence[str | os.PathLike],
    rows: Sequence[SheetRow],
    *,
    thumb_height: int = SHEET_THUMB_HEIGHT,
    max_columns: int = SHEET_MAX_COLUMNS,
    inputs: str | None = None,
) -> Path:
    """`OUT/<subject>/contact-sheet.png`: the subject's references once, then one row per prompt.

    Each prompt row has a caption `#<prompt_index> <prompt>` and its images labelled `seed <seed>`; a row
    shows at most `max_columns` images and its caption says how many more there are.
    """
    label_height = _line_height(_font(14)) + 6
    caption_font = _font(16)
    caption_height = _line_height(caption_font) + _PAD
    block_height = caption_height + thumb_height + label_height + _PAD

    references = [_thumbnail(path, thumb_height) for path in reference_paths]
    prompt_rows = [
        (row, [(seed, _thumbnail(path, thumb_height)) for seed, path in list(row.entries)[:max_columns]])
        for row in rows
    ]
    widths = [sum(_tile_width(thumb, thumb_height) + _PAD for thumb in references)]
    widths += [sum(_tile_width(thumb, thumb_height) + _PAD for _, thumb in tiles) for _, tiles in prompt_rows]
    width = max(_PAD + max(widths), 3 * thumb_height)
    height = (1 + len(prompt_rows)) * block_height + _PAD

    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = _PAD
    draw.text(
        (_PAD, y),
        _fit(caption_font, f"{subject}: references", width - 2 * _PAD),
        fill=_TEXT,
        font=caption_font,
    )
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

    return atomic_write_bytes(contact_sheet_path(out_dir, subject), _encode_plain_png(canvas, inputs))


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


# ----------------------------------------------------------------------------------------------------
# Which views to draw
# ----------------------------------------------------------------------------------------------------


def update_views(
    out_dir: Path,
    jobs: Sequence[Job],
    finished: Mapping[str, Finished],
    should_stop: Callable[[], bool],
    *,
    grids: bool = True,
    contact_sheets: bool = True,
) -> None:
    """Draw a grid per (subject, prompt) and a contact sheet per subject where the file is not what this
    plan's finished images make: missing, undecodable, or drawn from other images (its `squeeze-view`
    chunk records the hash of its inputs: the prompt, the references and each image's job id and PNG
    hash). So a view is redrawn after any of its images was made, remade, moved or lost, and after a
    killed or stopped run, and left alone otherwise. Stops early when `should_stop()`.

    Args:
        finished: `{job_id: Finished}` of the finished images, at their positions' names.
    """
    for subject, subject_jobs in groupby(jobs, key=lambda job: job.subject):
        subject_jobs = list(subject_jobs)
        references = subject_jobs[0].references
        rows, sheet_inputs = [], []
        for prompt_index, prompt_jobs in groupby(subject_jobs, key=lambda job: job.prompt_index):
            if should_stop():
                return
            prompt_jobs = list(prompt_jobs)
            prompt = prompt_jobs[0].prompt
            entries = [
                (job.seed, image_path(out_dir, job) if job.job_id in finished else None)
                for job in prompt_jobs
            ]
            rows.append(SheetRow(prompt_index, prompt, entries))
            images = [
                (job.seed, job.job_id, finished[job.job_id].sha256 if job.job_id in finished else None)
                for job in prompt_jobs
            ]
            sheet_inputs.append((prompt_index, prompt, images))
            inputs = views_inputs("grid", references, [(prompt_index, prompt, images)])
            grid = grid_path(out_dir, subject, prompt_index)
            if grids and view_inputs(grid) != inputs:
                write_prompt_grid(out_dir, subject, prompt_index, prompt, references, entries, inputs=inputs)
        sheet = contact_sheet_path(out_dir, subject)
        inputs = views_inputs("contact-sheet", references, sheet_inputs)
        if contact_sheets and view_inputs(sheet) != inputs:
            write_contact_sheet(out_dir, subject, references, rows, inputs=inputs)


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
