"""Channel variants (`output.variants`): copies of every finished image at a channel's size, fit and
format, made from its PNG master, recorded in its sidecar and redone only when their spec changes.

A variant is up to date when its sidecar's `variants.<name>` records the spec it was made with, equal
to the current one, and a file at the current name with the recorded size and sha256. The file is
written first (atomically), then the sidecar: killed in between, the variant is made again.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import ExifTags, Image, ImageCms, ImageColor, ImageOps

from squeeze_cli.outputs.files import atomic_write_bytes, atomic_write_json
from squeeze_cli.outputs.index import variant_files
from squeeze_cli.outputs.layout import safe_join, subject_dir, variant_name
from squeeze_cli.outputs.records import (
    PNG_FILE_KEY,
    VARIANTS_KEY,
    png_text_chunks,
    published_parameters,
    read_sidecar,
)
from squeeze_cli.outputs.resume import Finished, file_mismatch

if TYPE_CHECKING:
    from ..manifest.schema import MetadataLevel, OutputVariant
    from ..plan import Job

# Bumped when the same spec would give other bytes (resampling, metadata layout): every variant is redone.
RENDER_VERSION = 1
# EXIF UserComment's character-code prefix for UTF-16, as A1111 (piexif's `UserComment.dump`) writes it.
_USER_COMMENT_UNICODE = b"UNICODE\0"
_PIL_FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}


@functools.cache
def srgb_profile() -> bytes:
    """The sRGB ICC profile every variant embeds, so colour-managed viewers and shops show what we made."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def variant_spec(variant: OutputVariant, metadata: MetadataLevel) -> dict[str, Any]:
    """Everything that decides a variant's bytes: recorded in the sidecar; a change redoes the variant."""
    return {
        **variant.model_dump(mode="json", exclude={"name"}),
        "quality": variant.encoder_quality,
        "metadata": metadata,
        "render": RENDER_VERSION,
    }


def fit_image(master: Image.Image, variant: OutputVariant) -> Image.Image:
    """`master` at the variant's size: `pad` scales it to fit and fills the rest with the background,
    `crop` scales it to cover and cuts the overflow (centred), `contain` scales it to fit, no fill (one
    side may come out shorter than asked)."""
    image = master.convert("RGB")
    box = variant.box
    if variant.fit == "pad":
        return ImageOps.pad(image, box, Image.Resampling.LANCZOS, color=ImageColor.getrgb(variant.background))
    if variant.fit == "crop":
        return ImageOps.fit(image, box, Image.Resampling.LANCZOS)
    return ImageOps.contain(image, box, Image.Resampling.LANCZOS)


def encode_variant(
    master: Image.Image, variant: OutputVariant, record: Mapping[str, Any], metadata: MetadataLevel
) -> bytes:
    """The variant's file: fitted, the sRGB profile embedded, and the generation parameters as A1111
    tools read them at the `metadata` level (PNG: text chunks as the master's; JPEG and WebP: the
    `parameters` text in EXIF UserComment, UTF-16 with the `UNICODE` prefix)."""
    options: dict[str, Any] = {"icc_profile": srgb_profile()}
    if variant.encoder_quality is not None:
        options["quality"] = variant.encoder_quality
    if variant.format == "png":
        options["pnginfo"] = png_text_chunks(record, metadata)
    else:
        parameters = published_parameters(record, metadata)
        if parameters is not None:
            exif = Image.Exif()
            comment = _USER_COMMENT_UNICODE + parameters.encode("utf-16-be")
            exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = comment
            options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    fit_image(master, variant).save(buffer, format=_PIL_FORMATS[variant.format], **options)
    return buffer.getvalue()


def _up_to_date(out_dir: Path, recorded: Any, spec: Mapping[str, Any], name: str) -> bool:
    if not isinstance(recorded, Mapping) or recorded.get("spec") != spec or recorded.get("file") != name:
        return False
    return file_mismatch(safe_join(out_dir, *name.split("/")), recorded) is None


def make_variants(
    out_dir: str | os.PathLike,
    jobs: Sequence[Job],
    finished: Mapping[str, Finished],
    variants: Sequence[OutputVariant],
    metadata: MetadataLevel,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[dict[str, Finished], int]:
    """Make the variants of `jobs`' finished images that are missing, damaged or of another spec.

    Each master is decoded once for all its variants; each variant file is written atomically, then the
    master's sidecar records them (`variants`). Variants of a name no longer in `variants` are left as
    they are. Stops between images when `should_stop()`.

    Returns:
        `(finished, made)`: `finished` with the index lines of the images that got variants, and how many
        variant files were written.

    Raises:
        `OutputWriteError`: a file could not be written.
    """
    out_dir = Path(out_dir)
    result, made = dict(finished), 0
    specs = [(variant, variant_spec(variant, metadata)) for variant in variants]
    for job in jobs if specs else ():
        found = finished.get(job.job_id)
        if found is None:
            continue
        if should_stop():
            break
        sidecar = subject_dir(out_dir, job.subject) / f"{found.stem}.json"
        record = read_sidecar(sidecar)
        if record is None or record.get("job_id") != job.job_id:
            continue  # changed since the resume scan: the next run looks again
        recorded = record.get(VARIANTS_KEY)
        recorded = dict(recorded) if isinstance(recorded, Mapping) else {}
        names = [variant_name(job.subject, found.stem, v.name, v.format) for v, _ in specs]
        todo = [
            (variant, spec, name)
            for (variant, spec), name in zip(specs, names, strict=True)
            if not _up_to_date(out_dir, recorded.get(variant.name), spec, name)
        ]
        if not todo:
            continue
        # What the master's `squeeze` chunk holds: the sidecar without its own fields.
        embedded = {key: value for key, value in record.items() if key not in (PNG_FILE_KEY, VARIANTS_KEY)}
        with Image.open(sidecar.with_suffix(".png")) as master:
            master.load()
            for variant, spec, name in todo:
                data = encode_variant(master, variant, embedded, metadata)
                atomic_write_bytes(safe_join(out_dir, *name.split("/")), data)
                recorded[variant.name] = {
                    "file": name,
                    "spec": spec,
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                made += 1
        record[VARIANTS_KEY] = recorded
        atomic_write_json(sidecar, record)
        entry = {**found.entry, VARIANTS_KEY: variant_files(record)}
        result[job.job_id] = Finished(found.stem, found.sha256, entry)
    return result, made
