"""Channel variants (`output.variants`): copies of every finished image at a channel's size, fit and
format, made from its PNG master, recorded in its sidecar and redone only when their spec changes.

A variant is up to date when its sidecar's `variants.<name>` records the spec it was made with, equal
to the current one, and a file at the current name with the recorded size and sha256. As for the PNG
masters (`resume.py`), a file whose stat is the `mtime_ns` and `inode` recorded beside them is trusted
unread (unless `verify`), and from what the resume scan kept (`Finished.variants`): a rerun with every
variant up to date reads no sidecar again and no variant file. The file is written first (atomically),
then the sidecar: killed in between, the variant is made again.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import struct
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
    png_stamp,
    png_text_chunks,
    published_parameters,
    read_sidecar,
)
from squeeze_cli.outputs.resume import Finished, VariantStamp, file_check, frozen_spec, variant_stamps

if TYPE_CHECKING:
    from ..manifest.schema import MetadataLevel, OutputVariant
    from ..plan import Job

# Bumped when the same spec would give other bytes (resampling, metadata layout): every variant is redone.
RENDER_VERSION = 1
# EXIF UserComment's character-code prefix for UTF-16, as A1111 (piexif's `UserComment.dump`) writes it.
_USER_COMMENT_UNICODE = b"UNICODE\0"
_PIL_FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}
# The ICC header's creation date of `srgb_profile`: year, month, day, hours, minutes, seconds.
_PROFILE_DATE = struct.pack(">6H", 2025, 1, 1, 0, 0, 0)


@functools.cache
def srgb_profile() -> bytes:
    """The sRGB ICC profile every variant embeds, so colour-managed viewers and shops show what we made."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    # lcms dates the profile (header bytes 24-35) when it makes it: a fixed date keeps a variant's bytes the
    # same whichever process or run made it. The header's profile ID, an MD5 that would cover it, is unset.
    return profile[:24] + _PROFILE_DATE + profile[36:]


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
    fitted = ImageOps.contain(image, box, Image.Resampling.LANCZOS)
    if min(fitted.size) > 0:
        return fitted
    # A box far narrower than the image's shape rounds its short side to 0 pixels, which no format holds.
    return image.resize((max(1, fitted.width), max(1, fitted.height)), Image.Resampling.LANCZOS)


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


def _trusted(out_dir: str, stamps: Sequence[VariantStamp], name: str, spec: Any, file: str) -> bool:
    """Whether the scan's stamp of variant `name` vouches for it without reading anything: the current
    spec and file name, and a file whose stat is the recorded one."""
    stamp = next((stamp for stamp in stamps if stamp.name == name), None)
    if stamp is None or stamp.spec != spec or stamp.file != file:
        return False
    # No `safe_join` (a realpath per file): `file` is `variant_name`'s plain names under OUT, whose folders
    # `check_output_tree` refused as links before the run, and this only reads a stat; every write below
    # goes through `safe_join`.
    try:
        info = os.lstat(f"{out_dir}/{file}")
    except OSError:
        return False  # missing or unreadable: the sidecar check below says why and makes it again
    return stamp.matches(info)


def _check(
    out_dir: Path, recorded: Any, spec: Mapping[str, Any], name: str, verify: bool
) -> tuple[bool, dict[str, int] | None]:
    """`(up to date, its stat to record or None)` of a variant from its sidecar entry (`file_check`)."""
    if not isinstance(recorded, Mapping) or recorded.get("spec") != spec or recorded.get("file") != name:
        return False, None
    mismatch, new_stamp = file_check(safe_join(out_dir, *name.split("/")), recorded, verify=verify)
    return mismatch is None, new_stamp


def make_variants(
    out_dir: str | os.PathLike,
    jobs: Sequence[Job],
    finished: Mapping[str, Finished],
    variants: Sequence[OutputVariant],
    metadata: MetadataLevel,
    should_stop: Callable[[], bool] = lambda: False,
    *,
    verify: bool = False,
) -> tuple[dict[str, Finished], int]:
    """Make the variants of `jobs`' finished images that are missing, damaged or of another spec.

    An image whose variants all match the stamps the resume scan kept (`Finished.variants`) is skipped
    unread; the others' sidecars are read again, and checked as `file_check` checks a PNG (hashed when
    the stat differs, always with `verify`). Each master is decoded once for all its variants; each
    variant file is written atomically, then the master's sidecar records them (`variants`) with the
    file's stat, and the stat of a file that matched by hash alone. Variants of a name no longer in
    `variants` are left as they are. Stops between images when `should_stop()`.

    Returns:
        `(finished, made)`: `finished` with the index lines of the images that got variants, and how many
        variant files were written.

    Raises:
        `OutputWriteError`: a file could not be written.
    """
    out_dir = Path(out_dir)
    root = os.fspath(out_dir)
    result, made = dict(finished), 0
    specs = [(variant, variant_spec(variant, metadata)) for variant in variants]
    frozen = [frozen_spec(spec) for _, spec in specs]
    interned = {key: key for key in frozen if key is not None}  # for the stamps of the images made
    for job in jobs if specs else ():
        found = finished.get(job.job_id)
        if found is None:
            continue
        if should_stop():
            break
        names = [variant_name(job.subject, found.stem, v.name, v.format) for v, _ in specs]
        if not verify and all(
            _trusted(root, found.variants, variant.name, key, name)
            for (variant, _), key, name in zip(specs, frozen, names, strict=True)
        ):
            continue  # the nightly no-op rerun: one stat per variant
        sidecar = subject_dir(out_dir, job.subject) / f"{found.stem}.json"
        record = read_sidecar(sidecar)  # again: it may have changed since the scan, and is rewritten
        if record is None or record.get("job_id") != job.job_id:
            continue  # changed since the resume scan: the next run looks again
        recorded = record.get(VARIANTS_KEY)
        recorded = dict(recorded) if isinstance(recorded, Mapping) else {}
        todo, stamped = [], False
        for (variant, spec), name in zip(specs, names, strict=True):
            facts = recorded.get(variant.name)
            up_to_date, new_stamp = _check(out_dir, facts, spec, name, verify)
            if not up_to_date:
                todo.append((variant, spec, name))
            elif new_stamp is not None and isinstance(facts, Mapping):  # matched by hash alone: stamp it
                recorded[variant.name] = {**facts, **new_stamp}
                stamped = True
        if not todo and not stamped:
            continue
        if todo:
            made += _make(out_dir, sidecar.with_suffix(".png"), todo, record, metadata, recorded)
        record[VARIANTS_KEY] = recorded
        atomic_write_json(sidecar, record)
        entry = {**found.entry, VARIANTS_KEY: variant_files(record)}
        stamps = variant_stamps(record, interned)
        result[job.job_id] = Finished(found.stem, found.sha256, entry, found.new_stamp, stamps)
    return result, made


def _make(
    out_dir: Path,
    png: Path,
    todo: Sequence[tuple[OutputVariant, dict[str, Any], str]],
    record: Mapping[str, Any],
    metadata: MetadataLevel,
    recorded: dict[str, Any],
) -> int:
    """Write `todo`'s variants of the master `png` (its sidecar: `record`) and their entries into
    `recorded`; returns how many."""
    # What the master's `squeeze` chunk holds: the sidecar without its own fields.
    embedded = {key: value for key, value in record.items() if key not in (PNG_FILE_KEY, VARIANTS_KEY)}
    with Image.open(png) as master:
        master.load()
        for variant, spec, name in todo:
            data = encode_variant(master, variant, embedded, metadata)
            path = atomic_write_bytes(safe_join(out_dir, *name.split("/")), data)
            recorded[variant.name] = {
                "file": name,
                "spec": spec,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                **png_stamp(os.lstat(path)),  # so the next run trusts its stat (`resume.file_check`)
            }
    return len(todo)
